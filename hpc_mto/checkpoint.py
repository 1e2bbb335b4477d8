"""Exact task checkpoints in HDF5: everything a resume needs to continue bit for bit, no pickle.

One file per task per point in training, ``checkpoints/task-<k>/step-<global step>.h5``, written to a
temporary name, fsynced and renamed; a SHA-256 over every dataset and the state attributes is stored
last, so a truncated or corrupted file is detected on load. Old files are pruned only after the new
one is durable.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from pathlib import Path

import h5py
import numpy as np
import torch

from .atomic import atomic_path
from .errors import CheckpointError
from .task import Task

FORMAT = 1
NAME = re.compile(r"^step-(\d{9})\.h5$")


def task_dir(root: Path, task: int) -> Path:
    return Path(root) / f"task-{task}"


def path_for(root: Path, task: int, step: int) -> Path:
    return task_dir(root, task) / f"step-{step:09d}.h5"


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state().numpy(),
        "numpy_keys": np_state[1],
        "numpy_rest": json.dumps([np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]),
        "python": json.dumps(random.getstate(), default=list),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().numpy()
    return state


def _set_rng_state(f: h5py.File) -> None:
    torch.set_rng_state(torch.from_numpy(f["rng/torch"][()]))
    if "rng/cuda" in f and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.from_numpy(f["rng/cuda"][()]))
    name, pos, has_gauss, gauss = json.loads(f.attrs["numpy_rest"])
    np.random.set_state((name, f["rng/numpy_keys"][()], pos, has_gauss, gauss))
    version, internal, gauss_next = json.loads(f.attrs["python"])
    random.setstate((version, tuple(internal), gauss_next))


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


def _write_tensors(group: h5py.Group, tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        group.create_dataset(name.replace("/", "|"), data=t.detach().cpu().numpy())


def _read_tensors(group: h5py.Group) -> dict[str, torch.Tensor]:
    return {name.replace("|", "/"): torch.from_numpy(np.asarray(group[name][()])) for name in group}


def save(root: Path, task: Task, extra: dict, keep: int | None = None) -> Path:
    """Write the task's exact state; ``extra`` holds run bookkeeping (log positions, fingerprints)."""
    path = path_for(root, task.task, task.global_step)
    path.parent.mkdir(parents=True, exist_ok=True)
    opt = task.optimizer.state_dict()
    names = [n for n, _ in task.model.named_parameters()]
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            _write_tensors(f.create_group("model"), task.model.state_dict())
            _write_tensors(f.create_group("best"), task.best)
            og = f.create_group("optimizer")
            for idx, state in opt["state"].items():
                _write_tensors(og.create_group(names[idx].replace("/", "|")),
                               {k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
            for key, value in _rng_state().items():
                if isinstance(value, str):
                    f.attrs[key] = value
                else:
                    f.create_dataset(f"rng/{key}", data=value)
            f.attrs["format"] = FORMAT
            f.attrs["task"] = task.task
            f.attrs["global_step"] = task.global_step
            f.attrs["param_groups"] = json.dumps(opt["param_groups"])
            f.attrs["param_names"] = json.dumps(names)
            f.attrs["counters"] = json.dumps(task.counters())
            f.attrs["threads"] = torch.get_num_threads()
            f.attrs["extra"] = json.dumps(extra)
            f.attrs["sha256"] = _digest(f)
    if keep is not None:
        prune(root, task.task, keep)
    return path


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
                return f"unknown format {f.attrs.get('format')!r}"
            if f.attrs.get("sha256") != _digest(f):
                return "checksum mismatch (corrupted)"
    except (OSError, KeyError, ValueError) as exc:
        return f"unreadable ({str(exc).splitlines()[0]})"
    return None


def load(path: Path, task: Task) -> dict:
    """Restore ``task`` (weights, optimizer, best snapshot, counters, RNGs); returns ``extra``."""
    problem = verify(path)
    if problem:
        raise CheckpointError(f"checkpoint {path} is {problem}")
    with h5py.File(path, "r") as f:
        task.model.load_state_dict(_read_tensors(f["model"]))
        task.best = _read_tensors(f["best"])
        names = json.loads(f.attrs["param_names"])
        index = {n.replace("/", "|"): i for i, n in enumerate(names)}
        state = {index[g]: _read_tensors(f["optimizer"][g]) for g in f["optimizer"]}
        task.optimizer.load_state_dict({"state": state, "param_groups": json.loads(f.attrs["param_groups"])})
        task.load_counters(json.loads(f.attrs["counters"]))
        threads = int(f.attrs["threads"])
        if threads != torch.get_num_threads():
            raise CheckpointError(f"checkpoint {path} was written with {threads} torch threads, this process "
                                  f"has {torch.get_num_threads()}: exact resume needs the same (train.threads)")
        _set_rng_state(f)
        return json.loads(f.attrs["extra"])


def read_named(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """A checkpoint's tensors keyed like ``BlockLayout`` entries, and its counters (for stale peers)."""
    with h5py.File(path, "r") as f:
        named = {f"model:{k.replace('|', '/')}": f["model"][k][()] for k in f["model"]}
        for g in f["optimizer"]:
            for key in f["optimizer"][g]:
                named[f"opt:{g.replace('|', '/')}:{key}"] = f["optimizer"][g][key][()]
        return named, json.loads(f.attrs["counters"])


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
