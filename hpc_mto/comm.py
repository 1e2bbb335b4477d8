"""The exchange between the K tasks, behind one interface with three backends.

- ``MPIComm``: one MPI world (mpiexec locally, srun --mpi=pmi2 on SLURM). Parameter buffers move
  with buffer-based ``Bcast``/``Allreduce`` on numpy views; only small metadata (scores, flags,
  lineage) uses mpi4py's object calls.
- ``FileComm``: tasks that share no MPI world (SLURM array jobs) publish HDF5 files under
  ``RUN_DIR/exchange/`` and read their peers'. A peer that does not publish within the timeout is
  replaced by what the caller's ``fallback`` returns (its newest checkpoint), and marked stale.
- ``SoloComm``: a single task in-process (K=1, and unit tests).

Streaming: ``candidates`` yields one peer buffer at a time into a reused array, so the memory a task
spends on a transfer does not grow with K.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Iterator

import h5py
import numpy as np

from .atomic import atomic_path, write_json
from .errors import PeerMissing

# fallback(j) -> (buffer, meta) for a peer that never published; meta gets "stale" added.
Fallback = Callable[[int], tuple[np.ndarray, dict]]


class Comm:
    rank: int
    size: int

    def candidates(self, tag: str, own: np.ndarray, meta: dict,
                   fallback: Fallback | None = None) -> Iterator[tuple[int, np.ndarray, dict]]:
        """Every task's buffer and metadata, in task order (the own one included)."""
        raise NotImplementedError

    def allreduce_sum(self, tag: str, buf: np.ndarray, meta: dict,
                      fallback: Fallback | None = None) -> tuple[np.ndarray, list[dict]]:
        """Element-wise float64 sum over the tasks whose meta says ``finite`` (the others pass
        zeros), and every task's meta in task order."""
        raise NotImplementedError

    def allgather(self, tag: str, obj) -> list:
        """A small JSON-able object from every task, in task order."""
        raise NotImplementedError

    def any(self, flag: bool) -> bool:
        """True on every task if any task passes True (stop agreement)."""
        return flag

    def barrier(self) -> None:
        pass

    def abort(self, code: int = 1) -> None:
        os._exit(code)

    @property
    def synchronous(self) -> bool:
        """Whether the tasks move in lockstep (and may rely on each other's checkpoints existing)."""
        return True


class SoloComm(Comm):
    rank, size = 0, 1

    def candidates(self, tag, own, meta, fallback=None):
        yield 0, own, meta

    def allreduce_sum(self, tag, buf, meta, fallback=None):
        return buf.astype(np.float64), [meta]

    def allgather(self, tag, obj):
        return [obj]


class MPIComm(Comm):
    def __init__(self, comm=None):
        from mpi4py import MPI

        self._MPI = MPI
        self.comm = comm or MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self._scratch: np.ndarray | None = None

    def candidates(self, tag, own, meta, fallback=None):
        if self._scratch is None or self._scratch.shape != own.shape:
            self._scratch = np.empty_like(own)
        for j in range(self.size):
            buf = own if j == self.rank else self._scratch
            self.comm.Bcast(buf, root=j)
            yield j, buf, self.comm.bcast(meta if j == self.rank else None, root=j)

    def allreduce_sum(self, tag, buf, meta, fallback=None):
        # Summing in float64 makes the result independent of the reduction order MPI picks in
        # practice, so the file backend (which sums in task order) gives the same bits.
        out = np.empty(buf.shape, np.float64)
        self.comm.Allreduce(buf.astype(np.float64), out, op=self._MPI.SUM)
        return out, self.comm.allgather(meta)

    def allgather(self, tag, obj):
        return self.comm.allgather(obj)

    def any(self, flag):
        out = np.zeros(1, np.int8)
        self.comm.Allreduce(np.array([int(flag)], np.int8), out, op=self._MPI.MAX)
        return bool(out[0])

    def barrier(self):
        self.comm.Barrier()

    def abort(self, code=1):
        self.comm.Abort(code)


class FileComm(Comm):
    """Exchange through HDF5/JSON files in ``root`` (``RUN_DIR/exchange``) on a shared file system."""

    POLL = 0.05

    def __init__(self, root: Path, rank: int, size: int, timeout: float, log=None):
        self.root, self.rank, self.size, self.timeout = Path(root), rank, size, timeout
        self.log = log or (lambda msg: None)

    @property
    def synchronous(self):
        return False

    def _path(self, tag: str, j: int, ext: str = "h5") -> Path:
        return self.root / tag / f"task-{j}.{ext}"

    def publish(self, tag: str, buf: np.ndarray, meta: dict) -> None:
        path = self._path(tag, self.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
            f.create_dataset("blocks", data=buf)
            f.attrs["meta"] = json.dumps(meta)

    def _wait(self, path: Path) -> bool:
        deadline = time.monotonic() + self.timeout
        while not path.exists():
            if time.monotonic() > deadline:
                return False
            time.sleep(self.POLL)
        return True

    def _read(self, tag: str, j: int, out: np.ndarray, fallback: Fallback | None) -> dict:
        path = self._path(tag, j)
        if self._wait(path):
            with h5py.File(path, "r") as f:
                f["blocks"].read_direct(out)
                return json.loads(f.attrs["meta"])
        if fallback is None:
            raise PeerMissing(f"task {j} published nothing for {tag} within {self.timeout:.0f}s")
        buf, meta = fallback(j)
        out[...] = buf
        self.log(f"task {j} did not publish {tag} within {self.timeout:.0f}s: using its checkpoint")
        return {**meta, "stale": True}

    def candidates(self, tag, own, meta, fallback=None):
        self.publish(tag, own, meta)
        scratch = np.empty_like(own)
        for j in range(self.size):
            if j == self.rank:
                yield j, own, meta
            else:
                yield j, scratch, self._read(tag, j, scratch, fallback)

    def allreduce_sum(self, tag, buf, meta, fallback=None):
        # Same order (task 0..K-1) and precision as the MPI backend's float64 reduction.
        total, metas = np.zeros(buf.shape, np.float64), []
        for _, b, m in self.candidates(tag, buf, meta, fallback):
            if m.get("finite", True):  # a stale peer's checkpoint may be non-finite: skip it
                total += b
            metas.append(m)
        return total, metas

    def allgather(self, tag, obj):
        path = self._path(tag, self.rank, "json")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, obj)
        out = []
        for j in range(self.size):
            p = self._path(tag, j, "json")
            if not self._wait(p):
                raise PeerMissing(f"task {j} published nothing for {tag} within {self.timeout:.0f}s")
            out.append(json.loads(p.read_text()))
        return out

    def cleanup(self, tag: str) -> None:
        """Remove this task's own files for ``tag`` (peers have read them or fallen back)."""
        for ext in ("h5", "json"):
            self._path(tag, self.rank, ext).unlink(missing_ok=True)


def mpi_world_size() -> int | None:
    """The size of the MPI world this process was started in, or None outside any launcher."""
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"):
        if var in os.environ:
            return int(os.environ[var])
    return None
