"""The exchange between the K tasks: one abstract interface, three backends.

- ``MPIComm``: one MPI world (mpiexec locally, srun --mpi=pmi2 on SLURM). Parameter buffers move
  with buffer-based ``Bcast``/``Allreduce`` on numpy views; only small metadata (scores, flags,
  lineage) uses mpi4py's object calls.
- ``FileComm``: tasks that share no MPI world (SLURM array jobs) publish HDF5 files under
  ``RUN_DIR/exchange/`` and read their peers'. A peer that does not publish within the timeout is
  replaced by what the backend's ``fallback`` supplies (its newest checkpoint), marked stale.
- ``SoloComm``: a single task in-process (K=1, and unit tests).

Streaming: ``candidates`` yields one peer buffer at a time into a reused array, so the memory a task
spends on a transfer does not grow with K. Callers use only the ``Comm`` interface; which backend
runs is decided once, by ``connect``.
"""

from __future__ import annotations

import abc
import json
import logging
import os
import time
from pathlib import Path
from typing import Iterator, Protocol

import h5py
import numpy as np

from .atomic import atomic_path, write_json
from .errors import PeerMissing, UserError

log = logging.getLogger(__name__)

class Fallback(Protocol):
    """What stands in for a peer that did not publish in time (file backend)."""

    def covers(self, tag: str) -> bool:
        """Whether a late peer may be stood in for in this exchange (else it is missing)."""

    def ahead(self, peer: int, tag: str) -> bool:
        """Whether the peer is already past this exchange (so it will not publish it any more)."""

    def __call__(self, peer: int, tag: str) -> tuple[np.ndarray, dict]:
        """Blocks and meta standing in for the peer's."""


class Comm(abc.ABC):
    rank: int
    size: int
    # Whether the tasks move in lockstep (and may rely on each other's checkpoints existing).
    synchronous: bool = True

    @abc.abstractmethod
    def candidates(self, tag: str, own: np.ndarray, meta: dict) -> Iterator[tuple[int, np.ndarray, dict]]:
        """Every task's buffer and metadata, in task order (the own one included). A yielded
        buffer is valid until the next one is requested."""

    @abc.abstractmethod
    def broadcast(self, tag: str, buf: np.ndarray, meta: dict, root: int) -> dict:
        """Task ``root``'s buffer into ``buf`` on every task (the same shape everywhere); returns
        its meta."""

    @abc.abstractmethod
    def allreduce_sum(self, tag: str, buf: np.ndarray, meta: dict) -> tuple[np.ndarray, list[dict]]:
        """Element-wise float64 sum of every task's buffer (a task passes zeros to stay out of
        it), and every task's meta in task order."""

    @abc.abstractmethod
    def allgather(self, tag: str, obj) -> list:
        """A small JSON-able object from every task, in task order (None for a late peer where the
        file backend's fallback covers the exchange)."""

    @abc.abstractmethod
    def any(self, flag: bool) -> bool:
        """True on every task if any task passes True (stop agreement)."""

    @abc.abstractmethod
    def barrier(self) -> None:
        """Return once every task has called it."""

    def release(self, tag: str) -> None:
        """Every peer is done with this exchange: drop what it left behind (files, for the file
        backend; nothing to do elsewhere)."""

    def abort(self, code: int) -> None:
        """This task failed: end its peers too where they would otherwise wait for it forever
        (one MPI world); a no-op where tasks are independent jobs."""


class SoloComm(Comm):
    rank, size = 0, 1

    def candidates(self, tag, own, meta):
        yield 0, own, meta

    def broadcast(self, tag, buf, meta, root):
        return meta

    def allreduce_sum(self, tag, buf, meta):
        return buf.astype(np.float64), [meta]

    def allgather(self, tag, obj):
        return [obj]

    def any(self, flag):
        return flag

    def barrier(self):
        pass


class MPIComm(Comm):
    def __init__(self, comm=None):
        from mpi4py import MPI

        self._MPI = MPI
        self.comm = comm or MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self._scratch: np.ndarray | None = None

    def candidates(self, tag, own, meta):
        if self._scratch is None or self._scratch.shape != own.shape:
            self._scratch = np.empty_like(own)
        for j in range(self.size):
            buf = own if j == self.rank else self._scratch
            self.comm.Bcast(buf, root=j)
            yield j, buf, self.comm.bcast(meta if j == self.rank else None, root=j)

    def broadcast(self, tag, buf, meta, root):
        self.comm.Bcast(buf, root=root)
        return self.comm.bcast(meta if root == self.rank else None, root=root)

    def allreduce_sum(self, tag, buf, meta):
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

    def abort(self, code):
        if self.size > 1:
            self.comm.Abort(code)


class FileComm(Comm):
    """Exchange through HDF5/JSON files in ``root`` (``RUN_DIR/exchange``) on a shared file system."""

    POLL = 0.05
    synchronous = False

    def __init__(self, root: Path, rank: int, size: int, timeout: float, fallback: Fallback | None = None):
        self.root, self.rank, self.size, self.timeout = Path(root), rank, size, timeout
        self.fallback = fallback
        # Peers that let an exchange time out: until they publish again, waiting for them costs nothing,
        # or a peer that stays away would cost a full timeout at every round.
        self.absent: set[int] = set()

    def _path(self, tag: str, j: int, ext: str = "h5") -> Path:
        return self.root / tag / f"task-{j}.{ext}"

    def publish(self, tag: str, buf: np.ndarray, meta: dict) -> None:
        path = self._path(tag, self.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
            f.create_dataset("blocks", data=buf)
            f.attrs["meta"] = json.dumps(meta)

    def _covered(self, tag: str) -> bool:
        return self.fallback is not None and self.fallback.covers(tag)

    def _wait(self, path: Path, tag: str, j: int) -> bool:
        """Whether the peer's file for ``tag`` appears; a known-absent peer, or one already past this
        exchange, is not waited for where the fallback can stand in."""
        patient = not (self._covered(tag) and (j in self.absent or self.fallback.ahead(j, tag)))
        deadline = time.monotonic() + (self.timeout if patient else 0.0)
        while not path.exists():
            if time.monotonic() > deadline:
                self.absent.add(j)
                return False
            time.sleep(self.POLL)
        self.absent.discard(j)
        return True

    def _read(self, tag: str, j: int, out: np.ndarray) -> dict:
        path = self._path(tag, j)
        if self._wait(path, tag, j):
            with h5py.File(path, "r") as f:
                f["blocks"].read_direct(out)
                return json.loads(f.attrs["meta"])
        if not self._covered(tag):
            raise PeerMissing(f"task {j} published nothing for {tag} within {self.timeout:.0f}s")
        buf, meta = self.fallback(j, tag)
        out[...] = buf
        log.warning(f"task {j} did not publish {tag}: using its newest checkpoint from no later than this round")
        return {**meta, "stale": True}

    def candidates(self, tag, own, meta):
        self.publish(tag, own, meta)
        scratch = np.empty_like(own)
        for j in range(self.size):
            if j == self.rank:
                yield j, own, meta
            else:
                yield j, scratch, self._read(tag, j, scratch)

    def broadcast(self, tag, buf, meta, root):
        if root == self.rank:
            self.publish(tag, buf, meta)
            return meta
        return self._read(tag, root, buf)

    def allreduce_sum(self, tag, buf, meta):
        # Same order (task 0..K-1) and precision as the MPI backend's float64 reduction.
        total, metas = np.zeros(buf.shape, np.float64), []
        for _, b, m in self.candidates(tag, buf, meta):
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
            if j == self.rank or self._wait(p, tag, j):
                out.append(json.loads(p.read_text()))
            elif self._covered(tag):
                log.warning(f"task {j} did not publish {tag}: going on without it")
                out.append(None)  # a late peer has no say in this round
            else:
                raise PeerMissing(f"task {j} published nothing for {tag} within {self.timeout:.0f}s")
        return out

    def any(self, flag):
        return flag  # array jobs stop (and are requeued) each on its own

    def barrier(self):
        pass  # nothing waits on a peer's checkpoint: each array job resumes from its own

    def release(self, tag):
        for ext in ("h5", "json"):
            self._path(tag, self.rank, ext).unlink(missing_ok=True)


def connect(backend: str, splits: int, task: int | None, exchange_dir: Path, peer_timeout: float,
            fallback: Fallback | None) -> Comm:
    """The backend a task process uses: files (one process per task, ``task`` given), a single
    in-process task, or the MPI world it was started in (which must have ``splits`` ranks)."""
    if backend == "file":
        if task is None:
            raise UserError("transfer.backend=file needs --task K (one process per split)")
        return FileComm(exchange_dir, task, splits, peer_timeout, fallback)
    if splits == 1 and not mpi_world_size():
        return SoloComm()
    comm = MPIComm()
    if comm.size != splits:
        raise UserError(f"the MPI world has {comm.size} ranks but the run has splits={splits}: "
                        f"start it with mpiexec -n {splits}")
    return comm


def mpi_world_size() -> int | None:
    """The size of the MPI world this process was started in, or None outside any launcher."""
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"):
        if var in os.environ:
            return int(os.environ[var])
    return None
