"""The K random train/validation splits of the gross training set, and the selection holdout.

The holdout, carved first and touched by no task, is cut in two halves: ``holdout_select`` chooses the
output, ``holdout_estimate`` only estimates the chosen output's accuracy (an estimate is unbiased only
on data that did not choose what it measures). All are index arrays into the gross training set, derived only from (seed, config), written once to
``RUN_DIR/splits.h5`` and read back by every task, so every task and every resume sees the same ones.
Stratified splits draw the same number of samples of each class for every split, so all K training
sets have the same size and the K tasks run the same number of steps per epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .atomic import atomic_path
from .data import stratified_take
from .errors import ConfigError, RunDirError


@dataclass
class Splits:
    train: list[np.ndarray]
    val: list[np.ndarray]
    holdout_select: np.ndarray
    holdout_estimate: np.ndarray
    test_index: np.ndarray  # positions of the carved test set in the original data (empty if official)
    test_source: str

    @property
    def k(self) -> int:
        return len(self.train)

    @property
    def holdout(self) -> np.ndarray:
        return np.union1d(self.holdout_select, self.holdout_estimate)


def make(y: np.ndarray, k: int, val_fraction: float, holdout_fraction: float, seed: int,
         stratify: bool = True, test_index=None, test_source: str = "official") -> Splits:
    root = np.random.SeedSequence([seed, 0x5E1EC7])
    holdout_rng, halves_rng = (np.random.default_rng(s) for s in root.spawn(2))
    holdout = (stratified_take(y, holdout_fraction, holdout_rng, stratify)
               if holdout_fraction > 0 else np.empty(0, np.int64))
    select = holdout[stratified_take(y[holdout], 0.5, halves_rng, stratify)] if len(holdout) else holdout
    pool = np.setdiff1d(np.arange(len(y)), holdout)
    if stratify:
        classes, counts = np.unique(y[pool], return_counts=True)
        need = max(k, 2)
        if counts.min() < need:
            c = classes[counts.argmin()]
            raise ConfigError(f"class {c} has only {counts.min()} samples left for the splits; a stratified "
                              f"split into {k} splits needs at least {need} per class "
                              "(lower splits, or set data.stratify=false)")
        if val_fraction > 0 and any(int(round(val_fraction * n)) in (0, n) for n in counts):
            raise ConfigError(f"data.val_fraction={val_fraction} leaves a class with no training or no "
                              "validation sample; choose a fraction nearer 0.5 or more data")
    train, val = [], []
    for rng in (np.random.default_rng(s) for s in np.random.SeedSequence([seed, 0xC0FFEE]).spawn(k)):
        v = pool[stratified_take(y[pool], val_fraction, rng, stratify)] if val_fraction > 0 else pool[:0]
        val.append(np.sort(v))
        train.append(np.setdiff1d(pool, v))
    if min(len(t) for t in train) == 0:
        raise ConfigError("the splits leave a task with no training samples: lower data.val_fraction")
    return Splits(train, val, np.sort(select), np.setdiff1d(holdout, select),
                  np.asarray(test_index if test_index is not None else [], np.int64), test_source)


def write(path: Path, s: Splits, attrs: dict) -> None:
    if path.exists():
        raise RunDirError(f"{path} already exists: splits are written once and never rewritten")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("holdout_select", data=s.holdout_select)
        f.create_dataset("holdout_estimate", data=s.holdout_estimate)
        f.create_dataset("test_index", data=s.test_index)
        for i, (tr, va) in enumerate(zip(s.train, s.val)):
            f.create_dataset(f"split-{i}/train", data=tr)
            f.create_dataset(f"split-{i}/val", data=va)
        f.attrs["k"] = s.k
        f.attrs["test_source"] = s.test_source
        for key, value in attrs.items():
            f.attrs[key] = value


def read(path: Path) -> tuple[Splits, dict]:
    try:
        with h5py.File(path, "r") as f:
            k = int(f.attrs["k"])
            s = Splits([f[f"split-{i}/train"][()] for i in range(k)],
                       [f[f"split-{i}/val"][()] for i in range(k)],
                       f["holdout_select"][()], f["holdout_estimate"][()], f["test_index"][()],
                       str(f.attrs["test_source"]))
            return s, {key: f.attrs[key] for key in f.attrs}
    except (OSError, KeyError) as exc:
        raise RunDirError(f"cannot read splits file {path}: {exc}") from None
