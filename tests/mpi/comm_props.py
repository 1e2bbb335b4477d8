"""Exchange properties on real MPI ranks (run by tests/test_mpi.py under mpiexec -n K).

Usage: comm_props.py DIR CASE [CASE ...]. DIR is a directory every rank shares, for the file backend
that some cases compare with. Every rank asserts; any failure makes mpiexec exit non-zero.
"""

import sys
from pathlib import Path

import numpy as np

from hpc_mto.comm import FileComm, MPIComm

comm = MPIComm()
K, ME = comm.size, comm.rank
# Sizes around the edges: empty, fewer elements than tasks, uneven segments, several MiB.
SIZES = (0, 1, K - 1, 1001, 3 << 18)


def blocks(task: int, size: int, dtype=np.float32, salt: int = 0) -> np.ndarray:
    """Task ``task``'s buffer, which every rank can rebuild: magnitudes over 16 decades, so the
    order of a float32 or float64 sum changes its bits."""
    rng = np.random.default_rng([task, size, salt])
    return (rng.standard_normal(size) * 10.0 ** rng.uniform(-8, 8, size)).astype(dtype)


def meta_of(task: int, long: bool) -> dict:
    # long: more metadata than the frame's header holds (it follows in a second message)
    return {"task": task, "finite": True, "lineage": list(range(task, task + (5000 if long else 3))), "x": 0.1 * task}


def check_stream(stream, expected_peers, size, dtype, salt, long):
    seen = []
    for j, buf, m in stream:
        seen.append(j)
        assert buf.dtype == np.dtype(dtype) and np.array_equal(buf, blocks(j, size, dtype, salt)), (j, size, dtype)
        assert m == meta_of(j, long), (j, m)
    assert seen == expected_peers, (seen, expected_peers)


def case_candidates_carry_bits_and_meta():
    """Every task's buffer arrives bit for bit with its metadata, whether packed into the send
    buffer (no copy) or not, and metadata too long for the frame's header still arrives."""
    for size in SIZES:
        for dtype in (np.float32, np.float64):
            for in_place in (True, False):
                for long in (False, True):
                    salt = size + in_place
                    own = comm.send_buffer(size, dtype) if in_place else np.empty(size, dtype)
                    own[...] = blocks(ME, size, dtype, salt)
                    check_stream(comm.candidates("c", own, meta_of(ME, long)), list(range(K)), size, dtype, salt, long)
                    assert np.array_equal(own, blocks(ME, size, dtype, salt))  # the own buffer is left alone


def case_paired_exchange_delivers_exactly_the_drawn_peers():
    """With a pairing each task receives only its m peers (its own first in task order), bit for
    bit, round after round, for every m, and no message of one round is read in another."""
    for m in range(1, K):
        for rnd in range(4):
            draw = np.random.default_rng([m, rnd])  # the same pairing on every rank
            pairs = [sorted(int(j) for j in draw.choice([j for j in range(K) if j != i], m, replace=False))
                     for i in range(K)]
            size, long = 1001 + rnd, rnd == 3
            own = comm.send_buffer(size)
            own[...] = blocks(ME, size, salt=rnd)
            check_stream(comm.candidates("p", own, meta_of(ME, long), pairs), sorted(pairs[ME] + [ME]), size,
                         np.float32, rnd, long)


def case_allreduce_is_the_task_order_float64_sum_and_equals_the_file_backend(root):
    """allreduce_sum gives, on every task, the float64 sum added onto zeros in task order 0..K-1,
    the same bits as the file backend, for float32 and float64 buffers of any size; allreduce_mean
    gives the float32 sum in task order onto zeros, divided in float32, on both backends."""
    files = FileComm(Path(root), ME, K, timeout=120)
    for size in SIZES:
        for dtype in (np.float32, np.float64):
            own = blocks(ME, size, dtype)
            expected = np.zeros(size, np.float64)
            for j in range(K):
                expected += blocks(j, size, dtype)
            total, metas = comm.allreduce_sum("s", own, {"task": ME})
            tag = f"sum-{size}-{np.dtype(dtype).name}"
            on_files, file_metas = files.allreduce_sum(tag, own, {"task": ME})
            assert total.dtype == np.float64 and total.tobytes() == expected.tobytes(), (size, dtype)
            assert on_files.tobytes() == total.tobytes(), (size, dtype)
            assert metas == file_metas == [{"task": j} for j in range(K)]
            if dtype != np.float32:
                continue  # means are of float32 blocks
            # the mean over the tasks a divisor counts: the float32 sum in task order over it, on both
            count = lambda metas: sum(m["task"] != 0 for m in metas)  # any rule on the metas
            mean, _ = comm.allreduce_mean("m", own, {"task": ME}, count)
            file_mean, _ = files.allreduce_mean(tag + "-mean", own, {"task": ME}, count)
            expected_mean = np.zeros(size, np.float32)
            for j in range(K):
                expected_mean += blocks(j, size, dtype)
            expected_mean /= K - 1
            assert mean.dtype == np.float32 and mean.tobytes() == expected_mean.tobytes()
            assert file_mean.tobytes() == mean.tobytes()
            assert comm.allreduce_mean("z", own, {"task": ME}, lambda metas: 0) == (None, metas)
    # The order matters for these values: a sum in another order would not have passed.
    size = SIZES[-1]
    reversed_order = np.zeros(size, np.float64)
    for j in reversed(range(K)):
        reversed_order += blocks(j, size, np.float32)
    assert K < 3 or reversed_order.tobytes() != expected_order(size).tobytes()


def expected_order(size):
    out = np.zeros(size, np.float64)
    for j in range(K):
        out += blocks(j, size, np.float32)
    return out


def case_fetch_hands_out_a_streamed_buffer_again():
    """After a stream (every peer, or paired), each task names one source or none: it receives that
    source's buffer and metadata exactly as streamed (metadata too long for the header too); the
    own task and None give nothing; a source named by several tasks serves them all."""
    for rnd, (pairing, long) in enumerate(((None, False), (None, True), ("paired", False))):
        size = 1001 + rnd
        pairs = [[(i + 1) % K] for i in range(K)] if pairing else None
        own = comm.send_buffer(size)
        own[...] = blocks(ME, size, salt=rnd)
        for _ in comm.candidates("f", own, meta_of(ME, long), pairs):
            pass
        # round 0: the next task; 1: all name the last task (which serves them all, itself
        # included: nothing); 2: the task two ahead, or none for every third task
        source = [(ME + 1) % K, K - 1, None if ME % 3 == 2 else (ME + 2) % K][rnd]
        got = comm.fetch("f", source)
        if source is None or source == ME:
            assert got is None, (source, got)
        else:
            buf, meta = got
            assert np.array_equal(buf, blocks(source, size, salt=rnd)) and meta == meta_of(source, long), source
        assert np.array_equal(own, blocks(ME, size, salt=rnd))  # the own buffer is left alone


def case_broadcast_from_each_root():
    for root in range(K):
        size = 777 + root
        buf = np.empty(size, np.float32)
        if ME == root:
            buf[...] = blocks(root, size)
        meta = comm.broadcast("b", buf, {"task": ME} if ME == root else None, root)
        assert np.array_equal(buf, blocks(root, size)) and meta == {"task": root}


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}

if __name__ == "__main__":
    root = sys.argv[1]
    for spec in sys.argv[2:]:
        try:
            fn = CASES[spec]
            fn(root) if fn.__code__.co_argcount else fn()
        except BaseException:
            import traceback

            traceback.print_exc()
            comm.comm.Abort(1)  # the other ranks would wait for this one in a collective forever
        print(f"rank {ME}: {spec} ok", flush=True)
