"""The built-in datasets (their names are listed in ``registry.DATASETS``). Every dataset is offline:
bundled, generated locally, or read from files the user staged. A dataset is returned as numpy
arrays; the official test split is kept apart, and a dataset without one gets a fixed test split
carved off here (the same for every run and seed, so runs with different seeds are compared on the
same test set).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
import numpy as np

from .config import DataConfig
from .errors import DataError
from .registry import DATASETS

# Seed of the carved test split of datasets without an official one: fixed on purpose (see above).
CARVED_TEST_SEED = 20200701


@dataclass
class Dataset:
    x: np.ndarray  # gross training set, float32, (N, *input_shape)
    y: np.ndarray  # int64 labels in [0, num_classes)
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    test_source: str  # "official" or "carved"
    test_index: np.ndarray | None = None  # positions in the original array when carved
    # How x was made from the dataset's stored values (in the network's layout): (raw / divide - mean) / std
    # in float32, mean and std per channel (axis 1) or None. In model.json, so that predict takes raw samples.
    preprocessing: dict = field(default_factory=lambda: {"divide": 1.0, "mean": None, "std": None})

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])


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


def _carve_test(x, y, fraction, num_classes) -> Dataset:
    test = stratified_take(y, fraction, np.random.default_rng(CARVED_TEST_SEED))
    keep = np.setdiff1d(np.arange(len(y)), test)
    return Dataset(x[keep], y[keep], x[test], y[test], num_classes, "carved", test)


def digits(cfg: DataConfig) -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    ds = _carve_test(x, d.target.astype(np.int64), cfg.test_fraction, 10)
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
    ds = from_factory(cfg) if cfg.factory else DATASETS.get(cfg.name)(cfg)
    for name, arr in (("inputs", ds.x), ("test inputs", ds.x_test)):
        if not np.all(np.isfinite(arr)):
            bad = int(np.sum(~np.isfinite(arr)))
            raise DataError(f"dataset {cfg.factory or cfg.name}: {bad} non-finite values (NaN/Inf) in the {name}")
    return ds


def from_factory(cfg: DataConfig) -> Dataset:
    """The user's map-style dataset(s), read once into memory (the same fast path as the built-ins):
    ``data.factory(**data.kwargs)`` returns a train Dataset, or (train, test). Each item is
    ``(sample, label)``; the labels are read from ``.targets`` (or ``.labels``) without touching the
    samples, and a dataset without a test split gets one carved off like the built-ins."""
    from .factories import resolve

    key = f"data.factory={cfg.factory!r}"
    try:
        made = resolve("data.factory", cfg.factory)(**cfg.kwargs)
    except TypeError as exc:
        raise DataError(f"{key} failed when called with **{cfg.kwargs}: {exc}") from None
    train, test = made if isinstance(made, tuple) and len(made) == 2 else (made, None)
    (x, y) = _materialize(key, "train", train)
    test_arrays = None if test is None else _materialize(key, "test", test)
    num_classes = max(len(getattr(train, "classes", []) or []), int(y.max()) + 1)
    if test_arrays is None:
        return _carve_test(x, y, cfg.test_fraction, num_classes)
    xt, yt = test_arrays
    if xt.shape[1:] != x.shape[1:] or yt.max() >= num_classes:
        raise DataError(f"{key}: the test set's samples {xt.shape[1:]} / labels up to {yt.max()} do not match the "
                        f"train set's {x.shape[1:]} / {num_classes} classes")
    return Dataset(x, y, xt, yt, num_classes, "official")


def _materialize(key: str, which: str, ds) -> tuple[np.ndarray, np.ndarray]:
    if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
        raise DataError(f"{key} returned a {type(ds).__name__} as the {which} set; it must return a map-style "
                        "torch.utils.data.Dataset (with __getitem__ and __len__), or a (train, test) pair of them")
    labels = getattr(ds, "targets", getattr(ds, "labels", None))
    if labels is None:
        raise DataError(f"{key}: the {which} set has no .targets (or .labels): hpc-mto draws stratified splits from "
                        "the labels without reading every sample")
    y = np.asarray(labels)
    if len(ds) == 0 or y.shape != (len(ds),) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise DataError(f"{key}: the {which} set's .targets must be {len(ds)} integer labels 0..C-1, "
                        f"got shape {y.shape}, dtype {y.dtype}")
    first = ds[0]
    if not (isinstance(first, (tuple, list)) and len(first) >= 2):
        raise DataError(f"{key}: an item of the {which} set is a {type(first).__name__}; it must be (sample, label)")
    x = np.stack([np.asarray(ds[i][0], dtype=np.float32) for i in range(len(ds))])
    return np.ascontiguousarray(x), y.astype(np.int64)


def fingerprint(ds: Dataset) -> str:
    """A short hash of the arrays: a resume or a peer must train on the very same data."""
    h = hashlib.sha256()
    for arr in (ds.x, ds.y, ds.x_test, ds.y_test):
        h.update(json.dumps([arr.shape, str(arr.dtype)]).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]
