"""Checkpoint files: a ``State`` stored in HDF5, verified on the way back, no pickle.

One file per task per point in training, ``checkpoints/task-<t>/step-<global step>.h5``, written to a
temporary name, fsynced and renamed; a SHA-256 over every dataset and the attributes is stored last,
so a truncated or corrupted file is detected on load. Old files are pruned only after the new one is
durable. What goes into a state is decided by its owners (``Task.state_dict`` and the worker's
bookkeeping); this module only stores, verifies and finds files.

``BackgroundWriter`` takes the write off the training path: the state is copied to host memory
(``snapshot``), then written, fsynced, renamed and checksummed in a thread while training goes on.
A kill during that write leaves a hidden temporary file and the previous checkpoint intact, as with
a write in the foreground.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from pathlib import Path

import h5py
import numpy as np

from .atomic import atomic_path
from .errors import CheckpointError
from .state import State, from_hdf5, split, to_hdf5

# 2: one "state" group of entries named as in hpc_mto.state (1: per-kind groups, hpc-mto 0.1).
FORMAT = 2
NAME = re.compile(r"^step-(\d{9})\.h5$")


def task_dir(root: Path, task: int) -> Path:
    return Path(root) / f"task-{task}"


def path_for(root: Path, task: int, step: int) -> Path:
    return task_dir(root, task) / f"step-{step:09d}.h5"


def _digest(f: h5py.File) -> str:
    h = hashlib.sha256()

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            h.update(name.encode())
            h.update(np.ascontiguousarray(obj[()]).tobytes())

    f.visititems(visit)
    for key in sorted(k for k in f.attrs if k != "sha256"):
        h.update(key.encode())
        h.update(str(f.attrs[key]).encode())
    return h.hexdigest()


def save(root: Path, task: int, step: int, state: State) -> Path:
    """Write ``state`` as task ``task``'s checkpoint at global step ``step``; returns its path."""
    path = path_for(root, task, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            group = f.create_group("state")
            for name, array in state.arrays.items():
                group.create_dataset(to_hdf5(name), data=array)
            f.attrs["format"] = FORMAT
            f.attrs["task"] = task
            f.attrs["global_step"] = step
            f.attrs["meta"] = json.dumps(state.meta)
            f.attrs["sha256"] = _digest(f)
    return path


def snapshot(state: State) -> State:
    """A copy of ``state`` that training can no longer change: on CPU a task's arrays are views of
    its live tensors, which the next optimizer step overwrites."""
    return State({name: np.array(array, copy=True) for name, array in state.arrays.items()},
                 json.loads(json.dumps(state.meta)))


class BackgroundWriter:
    """One checkpoint write at a time, in a thread: ``start`` snapshots the state and returns;
    ``wait`` returns once the write in flight is durable (its path), raising what made it fail."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._written: Path | None = None

    def start(self, root: Path, task: int, step: int, state: State) -> None:
        self.wait()  # one write at a time: a second would race the first's pruning and temporary name
        frozen = snapshot(state)
        self._thread = threading.Thread(target=self._write, args=(root, task, step, frozen),
                                        name=f"checkpoint-{step}")
        self._thread.start()

    def _write(self, root: Path, task: int, step: int, state: State) -> None:
        try:
            self._written = save(root, task, step, state)
        except BaseException as exc:  # raised in the training thread, at its next wait
            self._error = exc

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> Path | None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self._written


def prune(root: Path, task: int, keep: int) -> None:
    for old in steps(root, task)[:-keep]:
        path_for(root, task, old).unlink(missing_ok=True)
    # Temporary files of writers that were killed mid-write (each task writes only its own directory).
    for tmp in task_dir(root, task).glob(".step-*.h5.tmp-*"):
        if not tmp.name.endswith(f"-{os.getpid()}"):
            tmp.unlink(missing_ok=True)


def steps(root: Path, task: int) -> list[int]:
    d = task_dir(root, task)
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for p in d.iterdir() if (m := NAME.match(p.name)))


def verify(path: Path) -> str | None:
    """None if the file is a complete, intact checkpoint; otherwise what is wrong with it."""
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                return (f"in checkpoint format {f.attrs.get('format')!r}, not {FORMAT} (written by another "
                        "hpc-mto release: finish the run with that release)")
            if f.attrs.get("sha256") != _digest(f):
                return "checksum mismatch (corrupted)"
    except (OSError, KeyError, ValueError) as exc:
        return f"unreadable ({str(exc).splitlines()[0]})"
    return None


def load(path: Path, kinds: tuple[str, ...] | None = None) -> State:
    """A verified checkpoint's state (only the entries of ``kinds``, when given)."""
    problem = verify(path)
    if problem:
        raise CheckpointError(f"checkpoint {path} is {problem}")
    with h5py.File(path, "r") as f:
        arrays = {}
        for key, dataset in f["state"].items():
            name = from_hdf5(key)
            if kinds is None or split(name)[0] in kinds:
                arrays[name] = dataset[()]
        return State(arrays, json.loads(f.attrs["meta"]))


def newest_intact(root: Path, task: int, at_most: int | None = None) -> int | None:
    """The newest step (not after ``at_most``) of this task's intact checkpoints."""
    for step in reversed(steps(root, task)):
        if (at_most is None or step <= at_most) and verify(path_for(root, task, step)) is None:
            return step
    return None


def newest_common(root: Path, k: int) -> tuple[int | None, list[str]]:
    """The newest global step every task has an intact checkpoint for, and notes on what was skipped.

    Files newer than that step (an incomplete round) or damaged are reported, never trusted.
    """
    notes, intact = [], []
    for t in range(k):
        good = set()
        for s in steps(root, t):
            problem = verify(path_for(root, t, s))
            if problem:
                notes.append(f"task {t}: ignoring checkpoint step {s}: {problem}")
            else:
                good.add(s)
        intact.append(good)
    common = set.intersection(*intact) if intact else set()
    best = max(common) if common else None
    for t, good in enumerate(intact):
        newer = sorted(s for s in good if best is None or s > best)
        if newer:
            notes.append(f"task {t}: ignoring checkpoint step(s) {newer}: not every task reached them")
    return best, notes
