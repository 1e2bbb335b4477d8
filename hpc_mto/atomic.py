"""Write, fsync, rename: nothing another rank, a peer job or a resume reads is ever half written."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    # Hidden, pid-tagged, in the same directory: the rename stays on one file system (atomic), and
    # readers that list the directory never mistake it for a finished file.
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path to write; on success fsync it and rename it to ``path``."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb"):
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f
        f.flush()


def write_json(path: str | Path, obj) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)
