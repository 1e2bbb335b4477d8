"""The datasets: the built-ins (their names are listed in ``registry.DATASETS``) and a user's
``data.factory``. Every dataset is offline: bundled, generated locally, or read from files the user
staged. A built-in is held as numpy arrays (moved to the device as tensors); a factory's map-style
datasets stay where they are and are read through a DataLoader (``samples.Streamed``). The official
test split is kept apart, and a dataset without one gets a fixed test split carved off here (the same
for every run and seed, so runs with different seeds are compared on the same test set).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import Config, DataConfig
from .errors import DataError
from .registry import DATASETS
from .samples import Arrays, Crop, Samples, Streamed

# Seed of the carved test split of datasets without an official one: fixed on purpose (see above).
CARVED_TEST_SEED = 20200701

# data.augment=standard, per built-in image dataset: (crop padding in pixels, horizontal flip). Digits
# and MNIST-like images are not flipped: a mirrored digit is another symbol (or none).
STANDARD_AUGMENTATION = {"digits": (1, False), "mnist": (2, False), "fashion_mnist": (2, False),
                         "cifar10": (4, True), "cifar100": (4, True)}


@dataclass
class UserDatasets:
    """A ``data.factory``'s map-style datasets: what training reads (``train``, which may augment), what
    scoring reads (``plain``), the test set, and which positions of them form the gross training set
    and the test set (a test set carved off ``plain`` when the factory gives none)."""

    train: Any
    plain: Any
    test: Any
    index: np.ndarray
    test_index: np.ndarray
    labels: np.ndarray  # of every item of train/plain
    test_labels: np.ndarray  # of every item of test
    input_shape: tuple[int, ...]


@dataclass
class Dataset:
    x: np.ndarray | None  # gross training set, float32, (N, *input_shape); None for a data.factory
    y: np.ndarray  # int64 labels in [0, num_classes)
    x_test: np.ndarray | None
    y_test: np.ndarray
    num_classes: int
    test_source: str  # "official" or "carved"
    test_index: np.ndarray | None = None  # positions in the original array when carved
    # How x was made from the dataset's stored values (in the network's layout): (raw / divide - mean) / std
    # in float32, mean and std per channel (axis 1) or None. In model.json, so that predict takes raw samples.
    preprocessing: dict = field(default_factory=lambda: {"divide": 1.0, "mean": None, "std": None})
    user: UserDatasets | None = None  # a data.factory's datasets (then x and x_test are None)
    augment: Crop | None = None  # data.augment=standard on in-memory images

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.user.input_shape if self.user is not None else tuple(self.x.shape[1:])

    def samples(self, positions: np.ndarray, device, cfg: Config) -> Samples:
        """The samples at ``positions`` of the gross training set, ready for a task on ``device``."""
        if self.user is None:
            return Arrays.of(self.x[positions], self.y[positions], device, self.augment)
        u = self.user
        return Streamed(u.train, u.plain, u.index[positions], u.labels, u.input_shape, device, cfg.train.num_workers)

    def test_samples(self, device, cfg: Config) -> Samples:
        if self.user is None:
            return Arrays.of(self.x_test, self.y_test, device)
        u = self.user
        return Streamed(u.test, u.test, u.test_index, u.test_labels, u.input_shape, device, cfg.train.num_workers)


def stratified_take(y: np.ndarray, fraction: float, rng: np.random.Generator, stratify: bool = True):
    """Indices (sorted) of a random ``fraction`` of ``y``, the same fraction of every class."""
    if not stratify:
        n = int(round(fraction * len(y)))
        return np.sort(rng.permutation(len(y))[:n])
    picked = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        n = int(round(fraction * len(members)))
        picked.append(rng.permutation(members)[:n])
    return np.sort(np.concatenate(picked))


def carve_test(y: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(kept, test) positions: the fixed, stratified test split of a dataset without one."""
    test = stratified_take(y, fraction, np.random.default_rng(CARVED_TEST_SEED))
    return np.setdiff1d(np.arange(len(y)), test), test


def _carve_test(x, y, fraction, num_classes) -> Dataset:
    keep, test = carve_test(y, fraction)
    return Dataset(x[keep], y[keep], x[test], y[test], num_classes, "carved", test)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (values 0..16, labels), as ``sklearn.datasets.load_digits`` gives them,
    read from the file scikit-learn bundles: importing sklearn.datasets costs ~3 s per process, paid by
    the launcher and by every rank."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(next(iter(spec.submodule_search_locations or []), "")) / "datasets" / "data" / "digits.csv.gz" \
        if spec else None
    if path is None or not path.is_file():  # another scikit-learn layout: ask it
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.data, d.target
    raw = np.loadtxt(path, delimiter=",")  # what load_digits does
    return raw[:, :-1], raw[:, -1].astype(int)


def digits(cfg: DataConfig) -> Dataset:
    data, target = digits_arrays()
    x = (data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    ds = _carve_test(x, target.astype(np.int64), cfg.test_fraction, 10)
    ds.preprocessing["divide"] = 16.0
    return ds


def _cache_dir() -> Path:
    return Path(os.environ.get("HPC_MTO_CACHE", Path.home() / ".cache" / "hpc-mto"))


def mnist1d(cfg: DataConfig) -> Dataset:
    # make_dataset builds the data from templates locally (~9 s); get_dataset would try to download
    # and drop a pickle in the working directory. Cache the arrays so K ranks do not each rebuild it.
    from .atomic import atomic_write

    cache = _cache_dir() / "mnist1d-v1.npz"
    if not cache.is_file():
        from mnist1d.data import get_dataset_args, make_dataset

        d = make_dataset(get_dataset_args())
        arrays = {k: np.asarray(d[k]) for k in ("x", "y", "x_test", "y_test")}
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(cache) as f:
            np.savez(f, **arrays)
    with np.load(cache, allow_pickle=False) as d:
        x, y, xt, yt = (d[k] for k in ("x", "y", "x_test", "y_test"))
    as_input = lambda a: a.astype(np.float32).reshape(len(a), 1, -1)
    return Dataset(as_input(x), y.astype(np.int64), as_input(xt), yt.astype(np.int64), 10, "official")


def _torchvision(cls_name: str, channels_mean_std: bool):
    def load(cfg: DataConfig) -> Dataset:
        import torchvision

        if not cfg.data_root:
            raise DataError(f"dataset {cfg.name} is read from a pre-staged directory: set data.data_root "
                            "(torchvision layout, e.g. DATA_ROOT/MNIST/raw/); add data.download=true to fetch it")
        root = Path(cfg.data_root)
        if not root.is_dir() and not cfg.download:
            raise DataError(f"data.data_root {root} does not exist (dataset {cfg.name})")
        cls = getattr(torchvision.datasets, cls_name)
        try:
            train = cls(str(root), train=True, download=cfg.download)
            test = cls(str(root), train=False, download=cfg.download)
        except (RuntimeError, OSError) as exc:
            raise DataError(f"dataset {cfg.name} not found under {root}: {exc}".splitlines()[0]) from None
        x, xt = (np.asarray(d.data, dtype=np.float32) / 255.0 for d in (train, test))
        y, yt = (np.asarray(d.targets, dtype=np.int64) for d in (train, test))
        if x.ndim == 3:  # MNIST-like: (N, H, W) -> (N, 1, H, W)
            x, xt = x[:, None], xt[:, None]
        else:  # CIFAR: (N, H, W, C) -> (N, C, H, W)
            x, xt = x.transpose(0, 3, 1, 2), xt.transpose(0, 3, 1, 2)
        if channels_mean_std:  # per-channel statistics of the training split only
            mean = x.mean(axis=(0, 2, 3), keepdims=True)
            std = x.std(axis=(0, 2, 3), keepdims=True)
            x, xt = (x - mean) / std, (xt - mean) / std
        num_classes = len(getattr(train, "classes", [])) or int(y.max()) + 1
        preprocessing = {"divide": 255.0, "mean": mean.ravel().tolist() if channels_mean_std else None,
                         "std": std.ravel().tolist() if channels_mean_std else None}
        return Dataset(np.ascontiguousarray(x), y, np.ascontiguousarray(xt), yt, num_classes, "official",
                       preprocessing=preprocessing)

    return load


def read_arrays(path: Path, kind: str) -> dict[str, np.ndarray]:
    """Every array in an npz (``kind`` "npz"; never unpickled) or HDF5 file, by name."""
    try:
        if kind == "npz":
            with np.load(path, allow_pickle=False) as f:  # never unpickle a user's file
                return {k: np.asarray(f[k]) for k in f.files}
        import h5py

        with h5py.File(path, "r") as f:
            return {k: np.asarray(f[k]) for k in f.keys() if isinstance(f[k], h5py.Dataset)}
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {kind} file {path}: {exc}".splitlines()[0]) from None


def user_arrays(cfg: DataConfig) -> Dataset:
    if not cfg.path:
        raise DataError(f"dataset {cfg.name} needs data.path: a file with arrays x and y")
    if not Path(cfg.path).is_file():
        raise DataError(f"data.path {cfg.path} does not exist")
    arrays = read_arrays(Path(cfg.path), cfg.name)
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise DataError(f"{cfg.path} lacks array(s) {', '.join(missing)}; it must hold x and y "
                        f"(optionally x_test and y_test); found: {', '.join(sorted(arrays)) or 'none'}")
    has_test = "x_test" in arrays and "y_test" in arrays
    pairs = [("x", "y")] + ([("x_test", "y_test")] if has_test else [])
    for xk, yk in pairs:
        x, y = arrays[xk], arrays[yk]
        if len(x) == 0:
            raise DataError(f"{cfg.path}: {xk} is empty")
        if len(x) != len(y):
            raise DataError(f"{cfg.path}: {xk} has {len(x)} samples but {yk} has {len(y)}")
        if not np.issubdtype(x.dtype, np.number):
            raise DataError(f"{cfg.path}: {xk} must be numeric, got dtype {x.dtype}")
        if not (np.issubdtype(y.dtype, np.integer) or
                (np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0))):
            raise DataError(f"{cfg.path}: {yk} must hold integer class labels, got dtype {y.dtype}")
        if y.ndim != 1:
            raise DataError(f"{cfg.path}: {yk} must be one label per sample (1-D), got shape {y.shape}")
        if np.any(y < 0):
            raise DataError(f"{cfg.path}: {yk} has negative labels; labels must be 0..num_classes-1")
    y = arrays["y"].astype(np.int64)
    num_classes = int(y.max()) + 1
    x = arrays["x"].astype(np.float32)
    if x.ndim == 1:
        x = x[:, None]
    if has_test:
        yt = arrays["y_test"].astype(np.int64)
        if yt.max() >= num_classes:
            raise DataError(f"{cfg.path}: y_test has label {yt.max()} but y only has labels "
                            f"0..{num_classes - 1}")
        xt = arrays["x_test"].astype(np.float32)
        if xt.shape[1:] != x.shape[1:]:
            raise DataError(f"{cfg.path}: x_test samples have shape {xt.shape[1:]} but x samples "
                            f"have {x.shape[1:]}")
        return Dataset(x, y, xt.reshape(len(xt), *x.shape[1:]), yt, num_classes, "official")
    return _carve_test(x, y, cfg.test_fraction, num_classes)


mnist = _torchvision("MNIST", channels_mean_std=False)
fashion_mnist = _torchvision("FashionMNIST", channels_mean_std=False)
cifar10 = _torchvision("CIFAR10", channels_mean_std=True)
cifar100 = _torchvision("CIFAR100", channels_mean_std=True)


def load(cfg: DataConfig) -> Dataset:
    if cfg.augment != "none" and (cfg.factory or cfg.name not in STANDARD_AUGMENTATION):
        raise DataError(f"data.augment={cfg.augment} is for the built-in image datasets "
                        f"({', '.join(STANDARD_AUGMENTATION)}), not {cfg.factory or cfg.name}; a data.factory "
                        "dataset augments in its own __getitem__ (see the README)")
    ds = from_factory(cfg) if cfg.factory else DATASETS.get(cfg.name)(cfg)
    if cfg.augment == "standard":
        pad, flip = STANDARD_AUGMENTATION[cfg.name]
        mean, std = ds.preprocessing["mean"], ds.preprocessing["std"]
        ds.augment = Crop(pad, flip, None if mean is None else [-m / s for m, s in zip(mean, std)])
    for name, arr in (("inputs", ds.x), ("test inputs", ds.x_test)):
        if arr is not None and not np.all(np.isfinite(arr)):
            bad = int(np.sum(~np.isfinite(arr)))
            raise DataError(f"dataset {cfg.factory or cfg.name}: {bad} non-finite values (NaN/Inf) in the {name}")
    return ds


def from_factory(cfg: DataConfig) -> Dataset:
    """The user's map-style dataset(s): ``data.factory(**data.kwargs)`` returns a train Dataset, or
    (train, test). Each item is ``(sample, label)``; the labels are read from ``.targets`` (or
    ``.labels``) without touching the samples. A factory with an ``augment`` parameter is called twice:
    ``augment=True`` for what training reads, ``augment=False`` for what is scored. A dataset without a
    test split gets one carved off like the built-ins."""
    from .factories import resolve

    key = f"data.factory={cfg.factory!r}"
    factory = resolve("data.factory", cfg.factory)
    try:
        takes_augment = "augment" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        takes_augment = False

    def call(**extra):
        try:
            made = factory(**cfg.kwargs, **extra)
        except TypeError as exc:
            raise DataError(f"{key} failed when called with **{dict(cfg.kwargs, **extra)}: {exc}") from None
        return made if isinstance(made, tuple) and len(made) == 2 else (made, None)

    plain, test = call(augment=False) if takes_augment else call()
    train = call(augment=True)[0] if takes_augment else plain
    y, shape = _check_user_dataset(key, "train", plain)
    if takes_augment and (len(train) != len(plain) or not np.array_equal(_labels(train), y)):
        raise DataError(f"{key}: augment=True and augment=False must give the same samples and labels in the same "
                        "order")
    num_classes = max(len(getattr(plain, "classes", []) or []), int(y.max()) + 1)
    if test is None:
        index, test_index = carve_test(y, cfg.test_fraction)
        user = UserDatasets(train, plain, plain, index, test_index, y, y, shape)
        return Dataset(None, y[index], None, y[test_index], num_classes, "carved", test_index, user=user)
    yt, test_shape = _check_user_dataset(key, "test", test)
    if test_shape != shape or yt.max() >= num_classes:
        raise DataError(f"{key}: the test set's samples {test_shape} / labels up to {yt.max()} do not match the "
                        f"train set's {shape} / {num_classes} classes")
    user = UserDatasets(train, plain, test, np.arange(len(y)), np.arange(len(yt)), y, yt, shape)
    return Dataset(None, y, None, yt, num_classes, "official", user=user)


def _labels(ds) -> np.ndarray | None:
    labels = getattr(ds, "targets", getattr(ds, "labels", None))
    return None if labels is None else np.asarray(labels)


def _check_user_dataset(key: str, which: str, ds) -> tuple[np.ndarray, tuple[int, ...]]:
    """(labels, sample shape) of a user's dataset, or one clear error."""
    if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
        raise DataError(f"{key} returned a {type(ds).__name__} as the {which} set; it must return a map-style "
                        "torch.utils.data.Dataset (with __getitem__ and __len__), or a (train, test) pair of them")
    y = _labels(ds)
    if y is None:
        raise DataError(f"{key}: the {which} set has no .targets (or .labels): hpc-mto draws stratified splits from "
                        "the labels without reading every sample")
    if len(ds) == 0 or y.shape != (len(ds),) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise DataError(f"{key}: the {which} set's .targets must be {len(ds)} integer labels 0..C-1, "
                        f"got shape {y.shape}, dtype {y.dtype}")
    first = ds[0]
    if not (isinstance(first, (tuple, list)) and len(first) >= 2):
        raise DataError(f"{key}: an item of the {which} set is a {type(first).__name__}; it must be (sample, label)")
    try:
        sample = np.asarray(first[0], dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{key}: a sample of the {which} set is not numeric: {exc}".splitlines()[0]) from None
    return y.astype(np.int64), tuple(sample.shape)


def fingerprint(ds: Dataset) -> str:
    """A short hash of the data: a resume or a peer must train on the very same data. In-memory arrays
    are hashed whole; a data.factory's datasets by their labels, sizes and 16 evenly spaced samples
    each (reading every sample of a large dataset at every start would cost more than the check is
    worth; the factory's source is checked separately, see factories.CodeRecord)."""
    h = hashlib.sha256()
    if ds.user is None:
        arrays = [ds.x, ds.y, ds.x_test, ds.y_test]
    else:
        arrays, u = [ds.y, ds.y_test], ds.user
        for dataset, index in ((u.plain, u.index), (u.test, u.test_index)):
            picks = index[np.linspace(0, len(index) - 1, min(16, len(index))).astype(int)]
            arrays += [np.stack([np.asarray(dataset[int(i)][0], dtype=np.float32) for i in picks])]
    for arr in arrays:
        h.update(json.dumps([arr.shape, str(arr.dtype)]).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]
