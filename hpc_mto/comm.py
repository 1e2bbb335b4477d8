"""The exchange between the K tasks: one abstract interface, three backends.

- ``MPIComm``: one MPI world (mpiexec locally, srun --mpi=pmi2 on SLURM). Parameter buffers move
  with buffer-based calls on numpy views, each in one message with its metadata in front of it (a
  ``Frame``: no separate pickled call per candidate); only small gathers (scores, proposals) use
  mpi4py's object calls.
- ``FileComm``: tasks that share no MPI world (SLURM array jobs) publish HDF5 files under
  ``RUN_DIR/exchange/`` and read their peers'. A peer that does not publish within the timeout is
  replaced by what the backend's ``fallback`` supplies (its newest checkpoint), marked stale.
- ``SoloComm``: a single task in-process (K=1, and unit tests).

Streaming: ``candidates`` yields one peer buffer at a time into a reused array, so the memory a task
spends on a transfer does not grow with K. With a ``pairing`` (who scores whom, ``transfer.candidates``)
a task receives only the m peers it scores: point-to-point on MPI, so a round's traffic per task does
not grow with K. Sums (``allreduce_sum``) are float64 sums in task order 0..K-1 on every backend, and
means (``allreduce_mean``) float32 sums in that order divided in float32, so MPI and files give the
same bits. Callers use only the ``Comm`` interface; which backend runs is
decided once, by ``connect``.
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
    # Whether ``fetch`` can hand out a peer's buffer of the last ``candidates`` stream again, so a
    # round need not keep a copy of its leading candidate while it scores the others.
    refetches: bool = False

    def send_buffer(self, size: int, dtype=np.float32) -> np.ndarray:
        """An array to pack this task's blocks into before ``candidates``/``broadcast``: the MPI
        backend hands out the payload of its send frame, so the own buffer is never copied."""
        return np.empty(size, dtype)

    @abc.abstractmethod
    def candidates(self, tag: str, own: np.ndarray, meta: dict,
                   pairing: list[list[int]] | None = None) -> Iterator[tuple[int, np.ndarray, dict]]:
        """Every task's buffer and metadata, in task order (the own one included); with a
        ``pairing`` (``pairing[i]``: the peers task i scores, the same list on every task) only this
        task's own and its ``pairing[rank]`` peers'. A yielded buffer is valid until the next one is
        requested; the stream must be consumed to its end."""

    def fetch(self, tag: str, source: int | None) -> tuple[np.ndarray, dict] | None:
        """After a ``candidates`` stream (where ``refetches``), called by every task: ``source``'s
        buffer and meta as that stream carried them (None for None or the own task), valid until
        the next stream; this task's own buffer goes to the tasks that name it."""
        raise NotImplementedError(f"{type(self).__name__} keeps no stream to fetch from")

    @abc.abstractmethod
    def broadcast(self, tag: str, buf: np.ndarray, meta: dict, root: int) -> dict:
        """Task ``root``'s buffer into ``buf`` on every task (the same shape everywhere); returns
        its meta."""

    @abc.abstractmethod
    def allreduce_sum(self, tag: str, buf: np.ndarray, meta: dict) -> tuple[np.ndarray, list[dict]]:
        """Element-wise float64 sum of every task's buffer, added in task order 0..K-1 onto zeros
        (a task passes zeros to stay out of it), and every task's meta in task order. The sum may
        live in a buffer the backend reuses: it is valid until the next call."""

    def allreduce_mean(self, tag: str, buf: np.ndarray, meta: dict, divisor) -> tuple[np.ndarray | None, list[dict]]:
        """The float32 mean of every task's float32 buffer: added onto zeros in float32 in task order
        0..K-1 (a task passes zeros to stay out of it), then divided by ``divisor(metas)`` in float32
        (None where that is 0); and every task's meta. Float32, like MPI's own Allreduce: a float64
        accumulator costs as much as the whole exchange at 1 MiB, and the mean replaces float32
        weights anyway. Every backend adds in the same order, so they give the same bits. Valid until
        the next call."""
        total, metas = self._sum_in_order(tag, buf, meta, np.float32)
        d = divisor(metas)
        if not d:
            return None, metas
        total /= d
        return total, metas

    def _sum_in_order(self, tag: str, buf: np.ndarray, meta: dict, dtype) -> tuple[np.ndarray, list[dict]]:
        """Every task's buffer added onto zeros of ``dtype`` in task order, streamed; the metas."""
        total, metas = np.zeros(buf.shape, dtype), []
        for _, b, m in self.candidates(tag, buf, meta):
            if m.get("finite", True):  # a stale peer's checkpoint may be non-finite: skip it
                total += b
            metas.append(m)
        return total, metas

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

    def candidates(self, tag, own, meta, pairing=None):
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


class Frame:
    """One message: a header (metadata as JSON, its length first) and the payload right behind it,
    in one contiguous byte array, so a buffer and its metadata travel in a single MPI call.

    The header has a fixed capacity that every task derives from K alone, so a receiver knows the
    message size in advance; metadata longer than that (lineages of a very large K) follows in a
    second message of the length the header gives.
    """

    ALIGN = 64  # the payload starts on a cache line (and satisfies any dtype's alignment)

    def __init__(self, size: int, dtype, k: int):
        self.header = -(-(4096 + 16 * k) // self.ALIGN) * self.ALIGN
        self.dtype = np.dtype(dtype)
        self.bytes = np.empty(self.header + size * self.dtype.itemsize, np.uint8)
        self.payload = self.bytes[self.header:].view(self.dtype)
        self.overflow: bytes | None = None

    def fits(self, size: int, dtype) -> bool:
        return self.payload.size == size and self.dtype == np.dtype(dtype)

    def holds(self, buf: np.ndarray) -> bool:
        """Whether ``buf`` is this frame's payload (packed in place: nothing to copy)."""
        return buf.dtype == self.dtype and buf.size == self.payload.size and \
            buf.__array_interface__["data"][0] == self.payload.__array_interface__["data"][0]

    def put_meta(self, meta: dict) -> bytes | None:
        """Write ``meta`` into the header; the encoded bytes when they do not fit (sent after, and
        kept as ``overflow`` for as long as the frame holds this metadata)."""
        text = json.dumps(meta, separators=(",", ":")).encode()
        self.bytes[:8] = np.frombuffer(len(text).to_bytes(8, "little"), np.uint8)
        self.overflow = None if len(text) <= self.header - 8 else text
        if self.overflow is None:
            self.bytes[8:8 + len(text)] = np.frombuffer(text, np.uint8)
        return self.overflow

    def meta_length(self) -> int:
        return int.from_bytes(self.bytes[:8].tobytes(), "little")

    def overflows(self) -> bool:
        return self.meta_length() > self.header - 8

    def get_meta(self, overflow: bytes | None = None) -> dict:
        n = self.meta_length()
        return json.loads(overflow if overflow is not None else self.bytes[8:8 + n].tobytes())


class MPIComm(Comm):
    # Point-to-point messages of a paired exchange: the frame, then (rarely) the metadata overflow;
    # the segments of a sum; a fetched frame and its overflow.
    TAG_FRAME, TAG_META, TAG_SUM, TAG_FETCH, TAG_FETCH_META = 0x4D54, 0x4D55, 0x4D56, 0x4D57, 0x4D58
    # The own frame of the last stream stays as it was sent until the next one packs into it.
    refetches = True

    def __init__(self, comm=None):
        from mpi4py import MPI

        self._MPI = MPI
        self.comm = comm or MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        # Kept between rounds (the same size every round): the own blocks' frame and one to receive into.
        self._send: Frame | None = None
        self._recv: Frame | None = None
        # The sums' receive and result buffers, kept too: fresh pages per call (first-touch faults,
        # MPI re-registering the memory) cost more than the whole sum at 1 MiB.
        self._kept: dict[str, np.ndarray] = {}

    def _keep(self, name: str, size: int, dtype) -> np.ndarray:
        array = self._kept.get(name)
        if array is None or array.size != size or array.dtype != np.dtype(dtype):
            array = self._kept[name] = np.empty(size, dtype)
        return array

    def _frame(self, which: str, size: int, dtype) -> Frame:
        frame = getattr(self, which)
        if frame is None or not frame.fits(size, dtype):
            frame = Frame(size, dtype, self.size)
            setattr(self, which, frame)
        return frame

    def send_buffer(self, size, dtype=np.float32):
        return self._frame("_send", size, dtype).payload

    def _outgoing(self, own: np.ndarray, meta: dict) -> tuple[Frame, bytes | None]:
        frame = self._frame("_send", own.size, own.dtype)
        if not frame.holds(own):
            frame.payload[...] = own.reshape(-1)  # not packed in place: one copy
        return frame, frame.put_meta(meta)

    def _bcast_frame(self, frame: Frame, root: int, overflow: bytes | None) -> dict | None:
        """The root's meta on the other tasks (None on the root, which has it)."""
        self.comm.Bcast(frame.bytes, root=root)
        if root == self.rank and overflow is None:
            return None
        if frame.overflows():
            extra = bytearray(overflow) if root == self.rank else bytearray(frame.meta_length())
            self.comm.Bcast(extra, root=root)
            return frame.get_meta(bytes(extra))
        return frame.get_meta()

    def candidates(self, tag, own, meta, pairing=None):
        if pairing is not None:
            yield from self._paired(own, meta, pairing)
            return
        send, overflow = self._outgoing(own, meta)
        recv = self._frame("_recv", own.size, own.dtype)
        for j in range(self.size):
            if j == self.rank:
                self._bcast_frame(send, j, overflow)
                yield j, own, meta
            else:
                yield j, recv.payload, self._bcast_frame(recv, j, None)

    def _paired(self, own, meta, pairing):
        """Each task sends its frame only to the tasks that score it, all sends posted before any
        receive (so no order of receives can deadlock), and receives its own peers one at a time."""
        send, overflow = self._outgoing(own, meta)
        recv = self._frame("_recv", own.size, own.dtype)
        readers = [i for i in range(self.size) if i != self.rank and self.rank in pairing[i]]
        requests = self._isend_frame(send, overflow, readers, self.TAG_FRAME, self.TAG_META)
        for j in sorted(set(pairing[self.rank]) | {self.rank}):
            if j == self.rank:
                yield j, own, meta
                continue
            yield j, recv.payload, self._recv_frame(recv, j, self.TAG_FRAME, self.TAG_META)
        # The own frame is reused next round. Not in a ``finally``: a stream abandoned by an error
        # must not wait here for readers that may never come (the job is aborted instead).
        self._MPI.Request.Waitall(requests)

    def fetch(self, tag, source):
        """The tasks that name a source receive its frame point to point, into the receive frame;
        every send is posted before any receive."""
        sources = self.comm.allgather(source)
        readers = [i for i, s in enumerate(sources) if s == self.rank and i != self.rank]
        send = self._send  # as the stream sent it: nothing packs into it until the next stream
        requests = self._isend_frame(send, send.overflow, readers, self.TAG_FETCH, self.TAG_FETCH_META)
        out = None
        if source is not None and source != self.rank:
            out = self._recv.payload, self._recv_frame(self._recv, source, self.TAG_FETCH, self.TAG_FETCH_META)
        self._MPI.Request.Waitall(requests)
        return out

    def _isend_frame(self, frame: Frame, overflow: bytes | None, readers: list[int], tag: int, meta_tag: int) -> list:
        """``frame`` (then its metadata overflow) to each of ``readers``, posted, not waited for."""
        requests = [self.comm.Isend(frame.bytes, dest=i, tag=tag) for i in readers]
        if overflow is not None:
            requests += [self.comm.Isend(overflow, dest=i, tag=meta_tag) for i in readers]
        return requests

    def _recv_frame(self, frame: Frame, source: int, tag: int, meta_tag: int) -> dict:
        """A frame from ``source`` into ``frame``; its metadata (and overflow, when there is one)."""
        self.comm.Recv(frame.bytes, source=source, tag=tag)
        if not frame.overflows():
            return frame.get_meta()
        extra = bytearray(frame.meta_length())
        self.comm.Recv(extra, source=source, tag=meta_tag)
        return frame.get_meta(bytes(extra))

    def broadcast(self, tag, buf, meta, root):
        frame = self._frame("_send" if root == self.rank else "_recv", buf.size, buf.dtype)
        overflow = None
        if root == self.rank:
            frame, overflow = self._outgoing(buf, meta)
        out = self._bcast_frame(frame, root, overflow)
        if root != self.rank:
            buf.reshape(-1)[...] = frame.payload
        return meta if root == self.rank else out

    def allreduce_sum(self, tag, buf, meta):
        """A reduce-scatter, then an allgather of the sums: the float64 sums travel (twice the
        bytes of that half)."""
        return self._allreduce(buf, np.float64, None).reshape(buf.shape), self.comm.allgather(meta)

    def allreduce_mean(self, tag, buf, meta, divisor):
        """The metas first (they decide the divisor), then a reduce-scatter; each segment is
        summed and divided in float32 where it lands, and the means are gathered: float32 on the
        wire both ways and in the arithmetic, like MPI's own float32 Allreduce, but in task order."""
        metas = self.comm.allgather(meta)
        d = divisor(metas)
        if not d:
            return None, metas
        return self._allreduce(buf, np.float32, d).reshape(buf.shape), metas

    # Elements summed at a time in float64: the accumulator (512 KiB) stays in cache while the K
    # parts stream through it once, so the sum reads each part once and writes the result once.
    CHUNK = 1 << 16

    def _allreduce(self, buf: np.ndarray, dtype, divisor: int | None) -> np.ndarray:
        """The sum of every task's buffer on every task, in a result buffer kept between calls.

        Task s owns segment s: it receives every task's part of it as it is (float32 on the wire),
        pairwise, and adds the parts onto zeros in task order 0..K-1, as the file backend does, so
        the two give the same bits (MPI's own reduction picks its order). ``dtype`` float64: the
        sum, accumulated in float64 a chunk at a time (no float64 copy of the buffer). float32: the
        sum in float32 divided by ``divisor`` in float32 (``allreduce_mean``). Each task writes its
        segment straight into the result, and the segments then travel pairwise into the others'
        results: MPICH's Allgatherv took 4x a Sendrecv of the same bytes here."""
        flat, k, me = buf.reshape(-1), self.size, self.rank
        bounds = [s * flat.size // k for s in range(k + 1)]
        seg = lambda a, s: a[bounds[s]:bounds[s + 1]]
        mine = bounds[me + 1] - bounds[me]
        received = self._keep("parts", k * mine, flat.dtype).reshape(k, mine)
        for d in range(1, k):  # round d: send to the task d ahead, receive from the one d behind
            to, frm = (me + d) % k, (me - d) % k
            self.comm.Sendrecv(seg(flat, to), dest=to, sendtag=self.TAG_SUM,
                               recvbuf=received[frm], source=frm, recvtag=self.TAG_SUM)
        parts = [seg(flat, me) if j == me else received[j] for j in range(k)]
        out = self._keep(f"result-{np.dtype(dtype).name}", flat.size, dtype)
        segment = seg(out, me)
        if np.dtype(dtype) == np.float32:
            np.add(parts[0], 0.0, out=segment)  # 0 + part 0, as onto zeros (-0.0 becomes 0.0), in one pass
            for part in parts[1:]:
                segment += part
            segment /= divisor
        else:
            acc = self._keep("accumulator", min(self.CHUNK, mine), np.float64)
            for lo in range(0, mine, self.CHUNK):
                hi = min(lo + self.CHUNK, mine)
                total = acc[:hi - lo]
                total.fill(0.0)
                for part in parts:
                    total += part[lo:hi]  # upcast element by element
                segment[lo:hi] = total
        for d in range(1, k):  # the same pairing: my segment to the task d ahead, theirs from behind
            to, frm = (me + d) % k, (me - d) % k
            self.comm.Sendrecv(segment, dest=to, sendtag=self.TAG_SUM,
                               recvbuf=seg(out, frm), source=frm, recvtag=self.TAG_SUM)
        return out

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

    def candidates(self, tag, own, meta, pairing=None):
        self.publish(tag, own, meta)
        scratch = np.empty_like(own)
        peers = range(self.size) if pairing is None else sorted(set(pairing[self.rank]) | {self.rank})
        for j in peers:
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
        return self._sum_in_order(tag, buf, meta, np.float64)

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
