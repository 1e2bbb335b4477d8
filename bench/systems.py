"""Systems benchmark (issue 6): what the exchange costs, how memory scales with K, resume, start-up.

    .venv/bin/python bench/systems.py [--sections ...]        (make bench-systems)

- overhead: share of the training loop's wall time spent in transfer rounds at the default interval,
  K=2 and K=4, split into waiting for peers, moving buffers and scoring candidates (the real Worker
  under mpiexec, with a stopwatch around its comm and its fitness evaluation);
- bandwidth: MPIComm's Bcast/Allreduce and FileComm's publish+read for 1, 10, 100 MiB, each as a
  ratio to a plain memory copy of the same buffer timed in the same process;
- memory: peak resident memory per rank and the extra memory of a transfer round for K=2,4,8;
- resume: steps redone and restart-to-first-step after an injected preemption signal and crash;
- startup: ``hpc-mto launch`` to the first training step;
- gpu: K tasks sharing one GPU (resnet18, synthetic 3x32x32); skipped without CUDA.

Issue 12 (``--before DIR``: the same measurements also on the code in DIR, e.g. an export of commit
aad41b4, run through PYTHONPATH):
- exchange12: a ``best`` round's cost per candidate next to a raw MPI ``Bcast`` of the same buffer,
  and ``allreduce_sum`` next to a raw float32 ``Allreduce``, 1/10/100 MiB, 2 ranks;
- rounds12: one round's exchange (no scoring) for K = 2, 4, 8, 16 ranks, oversubscribed on this
  machine, with every peer and with ``transfer.candidates``: bytes received per task and time;
- loop12: shares of each task's time spent in transfer rounds and in checkpoints, from
  ``result.json`` of whole runs (the default config, and checkpoints at every epoch end).

The instrumented parts run as ``mpiexec -n K python bench/systems.py rank-worker|rank-bandwidth``.
Figures are printed, merged into bench/results/systems.json and written into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections import defaultdict
from pathlib import Path

import numpy as np

from _common import (HPC_MTO, RESULTS_DIR, ROOT, be_nice, launch_command, machine, machine_line, read_json, run_cli,
                     update_results, write_json)

OUT = RESULTS_DIR / "systems.json"
SCRATCH = Path("/tmp/bench-systems")
SIZES_MIB = (1, 10, 100)
DTYPES = ("float32", "float64")
INJECT_TASK, INJECT_STEP = 1, 45  # digits: 31 steps per epoch, so step 45 is mid-way through round 2
perf = time.perf_counter


# -- measuring helpers ---------------------------------------------------------------------------
def timed(op, reps: int, sync=lambda: None) -> float:
    """Fastest seconds of ``op`` over ``reps`` after one warm-up (page touches, MPI connection set-up):
    the fastest sees through the other work on a shared machine, for the op and its copy baseline.
    ``sync`` brackets each repetition: a barrier makes a collective start and end together."""
    times = []
    for _ in range(reps + 1):
        sync()
        t0 = perf()
        op()
        sync()
        times.append(perf() - t0)
    return min(times[1:])


def reps_for(nbytes: int) -> int:
    return max(5, min(20, (200 << 20) // nbytes))


def memory_kib(field: str) -> int:
    """VmRSS / VmHWM of this process from /proc, in KiB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def reset_peak() -> None:
    # Linux: "5" resets VmHWM to the current RSS, so the next peak is the transfer round's own.
    Path("/proc/self/clear_refs").write_text("5")


def mpiexec(k: int, *args: str, env: dict | None = None) -> None:
    from hpc_mto.launchers.local import find_mpiexec

    run_cli([find_mpiexec(), "-n", str(k), sys.executable, __file__, *args], env={"PYTHONUNBUFFERED": "1", **(env or {})})


# --before DIR: the code the issue-12 sections also measure, as "before" (None: only this tree)
BEFORE: Path | None = None


def code_versions() -> list[tuple[str, dict]]:
    """(label, environment) of each code version to measure: this tree, and --before's."""
    versions = [("after", {"PYTHONPATH": str(ROOT)})]
    if BEFORE is not None:
        versions.append(("before", {"PYTHONPATH": str(BEFORE)}))
    return versions


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join(map(str, r)) + " |" for r in rows]


# -- inside an MPI rank: the real worker with stopwatches ------------------------------------------
@contextlib.contextmanager
def stopwatch(clocks: dict, key: str):
    t0 = perf()
    try:
        yield
    finally:
        clocks[key] += perf() - t0


class TimedComm:
    """The worker's MPIComm with stopwatches: waiting for peers, moving buffers, stop agreement.

    A barrier before each exchange absorbs the ranks' skew (they finish an epoch at different
    times, more so with more ranks than cores), so "comm" is the transfer itself, not the waiting.
    """

    def __init__(self, inner, clocks: dict):
        self.inner, self.rank, self.size, self.synchronous = inner, inner.rank, inner.size, True
        self.clocks = clocks

    def candidates(self, tag, own, meta):
        with stopwatch(self.clocks, "wait"):
            self.inner.barrier()
        stream = self.inner.candidates(tag, own, meta)
        while True:
            with stopwatch(self.clocks, "comm"):
                item = next(stream, None)
            if item is None:
                return
            yield item

    def allreduce_sum(self, tag, buf, meta):
        with stopwatch(self.clocks, "wait"):
            self.inner.barrier()
        with stopwatch(self.clocks, "comm"):
            return self.inner.allreduce_sum(tag, buf, meta)

    def any(self, flag):
        with stopwatch(self.clocks, "stop_agreement"):
            return self.inner.any(flag)

    def __getattr__(self, name):  # barrier, allgather, release, abort: unchanged
        return getattr(self.inner, name)


def in_rank(fn, path: Path) -> None:
    """A failing rank must end the MPI job: otherwise its peers wait in a collective forever."""
    try:
        fn(path)
    except BaseException:
        traceback.print_exc()
        from mpi4py import MPI

        MPI.COMM_WORLD.Abort(1)


def rank_worker(run_dir: Path) -> None:
    """Train one task of a prepared run like hpc_mto.worker does, measuring every transfer round."""
    from hpc_mto import transfer, worker
    from hpc_mto.signals import StopFlag

    w = worker.Worker(run_dir)
    clocks = defaultdict(float, {"wait": 0.0, "comm": 0.0, "scoring": 0.0, "stop_agreement": 0.0})
    w.comm = TimedComm(w.comm, clocks)
    real_fitness = w.task.fitness_loss

    def fitness_loss():
        with stopwatch(clocks, "scoring"):
            return real_fitness()

    w.task.fitness_loss = fitness_loss
    rounds, peak, real_round = [], [memory_kib("VmHWM")], transfer.Exchange.run_round

    def measured_round(exchange, *args, **kwargs):
        peak.append(memory_kib("VmHWM"))  # the peak so far (training), before the reset drops it
        reset_peak()
        rss = memory_kib("VmRSS")
        out = real_round(exchange, *args, **kwargs)
        layout = transfer.layout_of(exchange.task, w.cfg.transfer)
        rounds.append({"extra_kib": memory_kib("VmHWM") - rss, "buffer_kib": layout.size * 4 / 1024})
        return out

    transfer.Exchange.run_round = measured_round  # (the worker's Exchange was built already: patch the class)
    w.restore()
    t0 = perf()
    w.train(StopFlag(w.cfg.checkpoint.signals))
    wall = perf() - t0
    peak.append(memory_kib("VmHWM"))
    write_json(run_dir / f"bench-rank-{w.index}.json",
               {"wall_s": wall, "times": w.times, "clocks": clocks, "rounds": rounds, "peak_kib": max(peak)})


def rank_bandwidth(out: Path) -> None:
    """Bcast/Allreduce through MPIComm next to a memory copy of the same buffer, on rank 0's clock."""
    from mpi4py import MPI

    from hpc_mto.comm import MPIComm

    comm = MPIComm()
    raw, meta = comm.comm, {"task": comm.rank, "finite": True}
    rows = []
    for mib in SIZES_MIB:
        for dtype in DTYPES:
            buf = np.full((mib << 20) // np.dtype(dtype).itemsize, comm.rank + 1, dtype)
            dst, reps = np.empty_like(buf), reps_for(buf.nbytes)

            def stream():
                for _ in comm.candidates("bench", buf, meta):
                    pass

            ops = {"MPI Bcast": lambda: raw.Bcast(buf, root=0),
                   "MPI Allreduce": lambda: raw.Allreduce(buf, dst, op=MPI.SUM),
                   # K Bcasts, one per task's buffer: the cost per buffer is the round over K
                   "MPIComm.candidates, per buffer": stream,
                   "MPIComm.allreduce_sum (float64)": lambda: comm.allreduce_sum("bench", buf, meta)}
            copy = timed(lambda: np.copyto(dst, buf), reps)
            rows.append(bandwidth_row(mib, dtype, "memory copy (MPI rank)", copy, copy, buf.nbytes))
            for name, op in ops.items():
                seconds = timed(op, reps, raw.Barrier) / (comm.size if "per buffer" in name else 1)
                rows.append(bandwidth_row(mib, dtype, name, seconds, copy, buf.nbytes))
    if comm.rank == 0:
        write_json(out, rows)


def rank_exchange(out: Path) -> None:
    """Issue 12: what a round pays per candidate next to a raw Bcast of the same float32 buffer,
    and allreduce_sum next to a raw float32 Allreduce (2 ranks; times on rank 0's clock)."""
    from mpi4py import MPI

    from hpc_mto.comm import MPIComm

    comm = MPIComm()
    raw = comm.comm
    meta = {"task": comm.rank, "finite": True, "lineage": [comm.rank], "trained_on": [comm.rank]}
    rows = []
    for mib in SIZES_MIB:
        n = (mib << 20) // 4
        # packed where the exchange sends from, as transfer.Exchange does (when the code has it)
        own = comm.send_buffer(n) if hasattr(comm, "send_buffer") else np.empty(n, np.float32)
        own[...] = comm.rank + 1
        dst, scratch, reps = np.empty_like(own), np.empty_like(own), reps_for(own.nbytes)

        def stream():
            for _ in comm.candidates("bench", own, meta):
                pass

        def raw_round():  # the same pattern with nothing else: each task's buffer broadcast in turn
            for j in range(comm.size):
                raw.Bcast(own if j == comm.rank else scratch, root=j)

        def average():  # what policy average (rate 1) pays for the mean of the blocks
            if hasattr(comm, "allreduce_mean"):
                comm.allreduce_mean("bench", own, meta, len)
            else:  # before: a float64 sum, divided and cast by the caller
                total, metas = comm.allreduce_sum("bench", own, meta)
                (total / len(metas)).astype(np.float32)

        bcast = timed(raw_round, reps, raw.Barrier) / comm.size
        candidate = timed(stream, reps, raw.Barrier) / comm.size  # K Bcasts: a round over K
        allreduce = timed(lambda: raw.Allreduce(own, dst, op=MPI.SUM), reps, raw.Barrier)
        mean = timed(average, reps, raw.Barrier)
        summed = timed(lambda: comm.allreduce_sum("bench", own, meta), reps, raw.Barrier)
        rows.append({"mib": mib, "bcast_ms": 1e3 * bcast, "candidate_ms": 1e3 * candidate,
                     "allreduce_ms": 1e3 * allreduce, "average_ms": 1e3 * mean, "allreduce_sum_ms": 1e3 * summed})
    if comm.rank == 0:
        write_json(out, rows)


ROUND_MIB, ROUND_REPS = 1, 5


def rank_rounds(out: Path, m: str) -> None:
    """Issue 12: one round's exchange of a 1 MiB float32 buffer, no scoring, every peer or m of them
    (transfer.candidates): the slowest rank's time per round, and the bytes each rank received."""
    from hpc_mto.comm import MPIComm

    comm = MPIComm()
    m = None if m == "all" else int(m)
    meta = {"task": comm.rank, "finite": True, "lineage": [comm.rank], "trained_on": [comm.rank]}
    n = (ROUND_MIB << 20) // 4
    own = comm.send_buffer(n) if hasattr(comm, "send_buffer") else np.empty(n, np.float32)
    own[...] = comm.rank
    received = []

    def one_round(round_index=[0]):
        pairs = None
        if m is not None:
            from hpc_mto import transfer  # (imports torch: only where the pairing is needed)

            pairs = transfer.pairing(0, round_index[0], comm.size, m)
        round_index[0] += 1
        got = 0
        stream = comm.candidates("bench", own, meta, pairs) if pairs else comm.candidates("bench", own, meta)
        for j, buf, _ in stream:
            if j != comm.rank:
                got += buf.nbytes + (comm._recv.header if getattr(comm, "_recv", None) is not None else 0)
        received.append(got)

    seconds = timed(one_round, ROUND_REPS, comm.comm.Barrier)
    slowest = max(comm.comm.allgather(seconds))
    per_rank = comm.comm.allgather(statistics.fmean(received))
    if comm.rank == 0:
        write_json(out, {"k": comm.size, "m": m, "round_ms": 1e3 * slowest,
                         "mib_received_per_task": statistics.fmean(per_rank) / 2**20,
                         "mib_moved_per_round": sum(per_rank) / 2**20})


def bandwidth_row(mib, dtype, op, seconds, copy_seconds, nbytes) -> dict:
    return {"mib": mib, "dtype": dtype, "op": op, "ms": 1e3 * seconds, "gb_s": nbytes / seconds / 1e9,
            "ratio_to_copy": copy_seconds / seconds}


# -- sections ------------------------------------------------------------------------------------
def prepared_run(name: str, overrides: list[str]) -> Path:
    from hpc_mto import config
    from hpc_mto.rundir import RunDir
    from hpc_mto.prepare import prepare

    path = SCRATCH / name
    shutil.rmtree(path, ignore_errors=True)
    prepare(RunDir(path), config.load(None, overrides))
    return path


def instrumented(name: str, k: int, overrides: list[str]) -> list[dict]:
    run_dir = prepared_run(name, [f"splits={k}"] + overrides)
    mpiexec(k, "rank-worker", str(run_dir))
    return [read_json(run_dir / f"bench-rank-{r}.json") for r in range(k)]


def overhead() -> list[dict]:
    """The default config (digits, MLP 128, policy best, interval 1, 30 epochs) at K=2 and K=4."""
    rows = []
    for k in (2, 4):
        ranks = instrumented(f"overhead-k{k}", k, [])
        # each rank's seconds by part, as a share of that rank's training loop; mean over ranks
        parts = [{**r["times"], **r["clocks"]} for r in ranks]
        share = {key: statistics.fmean(p[key] / r["wall_s"] for p, r in zip(parts, ranks)) for key in parts[0]}
        share["pack_apply"] = share["transfer"] - share["wait"] - share["comm"] - share["scoring"]
        rows.append({"k": k, "wall_s": statistics.fmean(r["wall_s"] for r in ranks),
                     "rounds": len(ranks[0]["rounds"]), **share})
    return rows


def bandwidth() -> list[dict]:
    SCRATCH.mkdir(parents=True, exist_ok=True)
    mpiexec(2, "rank-bandwidth", str(SCRATCH / "bandwidth.json"))
    return read_json(SCRATCH / "bandwidth.json") + file_bandwidth()


def file_bandwidth() -> list[dict]:
    """FileComm between two tasks of one node: the peer has published; we publish and read."""
    from hpc_mto.comm import FileComm

    rows = []
    for where in [SCRATCH / "exchange"] + ([Path("/dev/shm/hpc-mto-bench")] if Path("/dev/shm").is_dir() else []):
        label = "tmpfs" if str(where).startswith("/dev/shm") else "disk"
        for mib in SIZES_MIB:
            for dtype in DTYPES:
                buf = np.ones((mib << 20) // np.dtype(dtype).itemsize, dtype)
                reps = min(reps_for(buf.nbytes), 5)
                dst = np.empty_like(buf)
                copy = timed(lambda: np.copyto(dst, buf), reps)
                publish, read = [], []
                for i in range(reps):
                    tag = f"bench-{i}"
                    FileComm(where, 1, 2, timeout=10).publish(tag, buf, {"task": 1})
                    stream = FileComm(where, 0, 2, timeout=10).candidates(tag, buf, {"task": 0})
                    t0 = perf()
                    next(stream)  # publishes our own buffer (write, fsync, rename)
                    t1 = perf()
                    next(stream)  # reads the peer's
                    publish.append(t1 - t0)
                    read.append(perf() - t1)
                    shutil.rmtree(where / tag)
                p, r = min(publish), min(read)
                for op, s in ((f"FileComm publish ({label})", p), (f"FileComm read ({label})", r),
                              (f"FileComm publish+read ({label})", p + r)):
                    rows.append(bandwidth_row(mib, dtype, op, s, copy, buf.nbytes))
                rows.append(bandwidth_row(mib, dtype, f"memory copy (file test, {label})", copy, copy, buf.nbytes))
        shutil.rmtree(where, ignore_errors=True)
    return rows


EXCHANGE_RUNS = 3


def exchange12() -> list[dict]:
    """EXCHANGE_RUNS runs per code version, interleaved (after, before, after, …): the machine's
    load moves between runs, so each figure is the median over the runs of each one's fastest."""
    runs = defaultdict(list)
    SCRATCH.mkdir(parents=True, exist_ok=True)
    for i in range(EXCHANGE_RUNS):
        for label, env in code_versions():
            out = SCRATCH / f"exchange12-{label}-{i}.json"
            mpiexec(2, "rank-exchange", str(out), env=env)
            for r in read_json(out):
                runs[(label, r["mib"])].append(r)
    return [{"code": label, "mib": mib, "runs": len(rs),
             **{key: statistics.median(r[key] for r in rs) for key in rs[0] if key.endswith("_ms")},
             # the ratios per run (a run's raw op and ours ran under the same load), then their median
             "candidate_x": statistics.median(r["bcast_ms"] / r["candidate_ms"] for r in rs),
             "mean_x": statistics.median(r["allreduce_ms"] / r["average_ms"] for r in rs),
             "sum_x": statistics.median(r["allreduce_ms"] / r["allreduce_sum_ms"] for r in rs)}
            for (label, mib), rs in runs.items()]


ROUND_KS, ROUND_M = (2, 4, 8, 16), 1


def rounds12() -> list[dict]:
    rows = []
    for label, env in code_versions():
        for k in ROUND_KS:
            for m in ("all", str(ROUND_M)) if label == "after" else ("all",):  # before: no transfer.candidates
                out = SCRATCH / f"rounds12-{label}-{k}-{m}.json"
                mpiexec(k, "rank-rounds", str(out), m, env=env)
                rows.append({**read_json(out), "code": label})
    return rows


LOOP_REPS = 2
LOOP_RUNS = {"default config (distill, interval 5, checkpoint.every 60 s)": [],
             "checkpoint at every epoch end (checkpoint.every 0), policy best, interval 1":
                 ["checkpoint.every=0", "transfer.policy=best", "transfer.interval=1"]}


def loop12() -> list[dict]:
    """Whole runs (digits, K=4, 30 epochs): each task's seconds by part from result.json, as shares
    of its training loop (train + eval + transfer + checkpoint; eval includes the final selection)."""
    rows = []
    versions = [(rep, label, env) for rep in range(LOOP_REPS) for label, env in code_versions()]
    for rep, label, env in versions:  # interleaved: after, before, after, before
        for name, overrides in LOOP_RUNS.items():
            run_dir = SCRATCH / f"loop12-{label}-{len(overrides)}-{rep}"
            shutil.rmtree(run_dir, ignore_errors=True)
            t0 = perf()
            run_cli(launch_command(run_dir, None, overrides), env=env)
            wall = perf() - t0
            per_task = read_json(run_dir / "result.json")["timing"]["per_task"]
            share = {key: statistics.fmean(t[key] / sum(t.values()) for t in per_task)
                     for key in ("transfer", "checkpoint")}
            rows.append({"code": label, "run": name, "rep": rep, "wall_s": wall, "loop_s": statistics.fmean(
                sum(t.values()) for t in per_task), **share})
    return rows


WALL_PAIRS = 5
WALL_RUNS = {"digits": (None, []), "mnist1d": ("configs/mnist1d.yaml", ["train.epochs=20"])}


def wall12() -> list[dict]:
    """The whole command's wall time of the default MTO run against the same run with policy none,
    K=4, WALL_PAIRS interleaved pairs (MTO, none, MTO, none, ...) per dataset: the ratio per pair."""
    rows = []
    for data_name, (config, overrides) in WALL_RUNS.items():
        for pair in range(WALL_PAIRS):
            walls = {}
            for policy in ("default", "none"):
                run_dir = SCRATCH / f"wall12-{data_name}-{policy}"
                shutil.rmtree(run_dir, ignore_errors=True)
                extra = [] if policy == "default" else ["transfer.policy=none"]
                t0 = perf()
                run_cli(launch_command(run_dir, config, ["splits=4", *overrides, *extra]))
                walls[policy] = perf() - t0
            rows.append({"data": data_name, "pair": pair, "mto_s": walls["default"], "none_s": walls["none"],
                         "ratio": walls["default"] / walls["none"]})
    return rows


STARTUP_REPS = 3


def startup12() -> list[dict]:
    """Launch to the first training step, K=1 and K=4, each code version in turn, STARTUP_REPS times."""
    rows = []
    for rep in range(STARTUP_REPS):
        for label, env in code_versions():
            for k in (1, 4):
                run_dir = SCRATCH / f"startup12-{label}-k{k}"
                shutil.rmtree(run_dir, ignore_errors=True)
                watched = timeline(launch_command(run_dir, None, [f"splits={k}", "train.epochs=1"]), env=env,
                                   watch=run_dir / "metrics" / "task-0.jsonl")
                rows.append({"code": label, "k": k, "rep": rep, **first_step(run_dir, watched)})
    return rows


def memory12() -> list[dict]:
    """A round's extra memory against the block bytes: MLP 1024 (~13 MB of blocks with Adam state), 4
    epochs = 3 rounds, policy best at K=2, 4, 8 (what issue 6 measured) and the default distill at K=4."""
    rows = []
    for policy, ks in (("best", (2, 4, 8)), ("distill", (4,))):
        for k in ks:
            ranks = instrumented(f"memory12-{policy}-k{k}", k,
                                 ["model.width=1024", "train.epochs=4", "transfer.interval=1",
                                  f"transfer.policy={policy}"])
            buffer_kib = ranks[0]["rounds"][0]["buffer_kib"]
            extra = [[rd["extra_kib"] for rd in r["rounds"]] for r in ranks]
            rows.append({"policy": policy, "k": k, "buffer_mib": buffer_kib / 1024,
                         "first_x": max(e[0] for e in extra) / buffer_kib,
                         "later_x": max(max(e[1:]) for e in extra) / buffer_kib})
    return rows


def memory() -> list[dict]:
    """A wider MLP (1024 units: ~1.1M parameters, with Adam state ~13 MB of blocks), 3 rounds."""
    rows = []
    for k in (2, 4, 8):
        ranks = instrumented(f"memory-k{k}", k, ["model.width=1024", "train.epochs=4"])
        extra = [rd["extra_kib"] for r in ranks for rd in r["rounds"]]
        rows.append({"k": k, "peak_rss_mib": max(r["peak_kib"] for r in ranks) / 1024,
                     "buffer_mib": ranks[0]["rounds"][0]["buffer_kib"] / 1024,
                     "round_extra_mib_max": max(extra) / 1024,
                     "round_extra_mib_later": max(rd["extra_kib"] for r in ranks for rd in r["rounds"][1:]) / 1024})
    return rows


def timeline(cmd: list[str], env: dict | None = None, watch: Path | None = None) -> dict:
    """Run ``cmd``; note when each output line arrived and when ``watch`` got its first line."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []

    def read():
        for line in proc.stdout:
            lines.append((time.monotonic() - t0, line.rstrip()))

    reader = threading.Thread(target=read)
    reader.start()
    first = None
    while proc.poll() is None:
        if first is None and watch is not None and watch.exists() and watch.stat().st_size > 0:
            first = time.monotonic() - t0
        time.sleep(0.01)
    reader.join()
    return {"code": proc.returncode, "wall_s": time.monotonic() - t0, "lines": lines, "watch_first_s": first}


def first_step(run_dir: Path, watched: dict) -> dict:
    """When training began: the first metrics line's arrival less the time its epoch took."""
    from hpc_mto.rundir import RunDir

    first = RunDir(run_dir).metrics(0).read()[0]
    ready = next(t for t, line in watched["lines"] if line.startswith("run directory:"))
    spent = sum(v for key, v in first.times.items() if key != "checkpoint")
    return {"run_dir_ready_s": ready, "first_metrics_line_s": watched["watch_first_s"],
            "first_step_s": watched["watch_first_s"] - spent, "wall_s": watched["wall_s"]}


def startup() -> list[dict]:
    rows = []
    for k in (1, 4):
        run_dir = SCRATCH / f"startup-k{k}"
        shutil.rmtree(run_dir, ignore_errors=True)
        watched = timeline(launch_command(run_dir, None, [f"splits={k}", "train.epochs=1"]),
                           watch=run_dir / "metrics" / "task-0.jsonl")
        rows.append({"k": k, **first_step(run_dir, watched)})
    return rows


RESUMED = re.compile(r"resumed at epoch \d+ step \d+ \(global step (\d+)\)")


def resume() -> list[dict]:
    """digits default, K=4, 3 epochs; task 1 gets a preemption signal, or crashes, after step 45.

    A signal makes every rank checkpoint at that step; a crash loses what followed the newest
    checkpoint, which is written at each transfer round (every epoch by default).
    """
    from hpc_mto import splits
    from hpc_mto.rundir import RunDir

    rows = []
    for fault in ("signal", "crash"):
        run_dir = SCRATCH / f"resume-{fault}"
        shutil.rmtree(run_dir, ignore_errors=True)
        first = timeline(launch_command(run_dir, None, ["splits=4", "train.epochs=3"]),
                         env={"HPC_MTO_INJECT": f"{fault}@step:{INJECT_TASK}:{INJECT_STEP}"})
        again = timeline([HPC_MTO, "resume", str(run_dir), "--no-progress"])
        resumed = [(t, int(m.group(1))) for t, line in again["lines"] if (m := RESUMED.search(line))]
        step = min(g for _, g in resumed)
        result = read_json(run_dir / "result.json")
        train = RunDir(run_dir).config().train
        steps = train.epochs * -(-len(splits.read(run_dir / "splits.h5")[0].train[0]) // train.batch_size)
        step_s = result["timing"]["total"]["train"] / result["k"] / steps
        rows.append({"fault": fault, "launch_exit": first["code"], "stopped_after_step": INJECT_STEP,
                     "resumed_at_step": step, "steps_redone": INJECT_STEP - step,
                     "seconds_lost": (INJECT_STEP - step) * step_s,
                     "restart_to_first_step_s": max(t for t, _ in resumed), "resume_wall_s": again["wall_s"],
                     "finished": again["code"] == 0})
    return rows


def gpu(device: str = "cuda", k: int = 4, n: int = 4096, epochs: int = 3) -> dict:
    """K tasks sharing one GPU: resnet18 on synthetic 3x32x32 data (random labels: speed only)."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        return {"skipped": "no CUDA device visible"}
    from hpc_mto import splits

    rng = np.random.default_rng(0)
    data = SCRATCH / "synthetic-3x32x32.npz"
    SCRATCH.mkdir(parents=True, exist_ok=True)
    np.savez(data, x=rng.standard_normal((n, 3, 32, 32), np.float32), y=rng.integers(0, 10, n),
             x_test=rng.standard_normal((512, 3, 32, 32), np.float32), y_test=rng.integers(0, 10, 512))
    run_dir = SCRATCH / f"gpu-k{k}"
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = perf()
    run_cli(launch_command(run_dir, None, ["data.name=npz", f"data.path={data}", "model.name=resnet18",
                                           f"splits={k}", f"train.epochs={epochs}", "train.batch_size=128",
                                           f"train.device={device}"]))
    wall = perf() - t0
    times = read_json(run_dir / "result.json")["timing"]["per_task"]
    n_train = len(splits.read(run_dir / "splits.h5")[0].train[0])
    return {"device": torch.cuda.get_device_name(0) if device == "cuda" else device, "k": k, "epochs": epochs,
            "train_samples_per_task": n_train, "wall_s": wall,
            # the tasks train at the same time on one device: together they are as fast as the slowest
            "samples_per_s": k * n_train * epochs / max(t["train"] for t in times),
            "transfer_share": statistics.fmean(t["transfer"] / sum(t.values()) for t in times)}


# -- report --------------------------------------------------------------------------------------
def pct(x: float) -> str:
    return f"{100 * x:.1f}"


OVERHEAD_COLUMNS = {"transfer": "transfer rounds %", "wait": "↳ waiting for peers %", "comm": "↳ moving buffers %",
                    "scoring": "↳ scoring candidates %", "pack_apply": "↳ pack/unpack/apply %",
                    "checkpoint": "checkpoints %", "train": "training steps %",
                    "stop_agreement": "↳ per-step stop agreement %", "eval": "epoch eval %"}


def render_overhead(rows) -> list[str]:
    return table(["K", "train-loop wall s", "rounds"] + list(OVERHEAD_COLUMNS.values()),
                 [[r["k"], f"{r['wall_s']:.1f}", r["rounds"]] + [pct(r[k]) for k in OVERHEAD_COLUMNS] for r in rows])


def render_bandwidth(rows) -> list[str]:
    cells = defaultdict(dict)
    for r in filter(None, rows):
        cells[(r["op"], r["dtype"])][r["mib"]] = f"{r['gb_s']:.2f} ({r['ratio_to_copy']:.2f}×)"
    return table(["operation", "dtype"] + [f"{m} MiB: GB/s (× copy)" for m in SIZES_MIB],
                 [[op, dt] + [c.get(m, "—") for m in SIZES_MIB] for (op, dt), c in cells.items()])


def render_memory(rows) -> list[str]:
    return table(["K", "peak RSS per rank MiB", "block buffer MiB", "round extra MiB (first round)",
                  "round extra MiB (later rounds)"],
                 [[r["k"], f"{r['peak_rss_mib']:.0f}", f"{r['buffer_mib']:.1f}", f"{r['round_extra_mib_max']:.1f}",
                   f"{r['round_extra_mib_later']:.1f}"] for r in rows])


def render_resume(rows) -> list[str]:
    return table(["fault at step 45 (task 1)", "launch exit", "resumed at step", "steps redone", "≈ s lost",
                  "restart → first step s", "resume wall s", "finished"],
                 [[r["fault"], r["launch_exit"], r["resumed_at_step"], r["steps_redone"], f"{r['seconds_lost']:.2f}",
                   f"{r['restart_to_first_step_s']:.1f}", f"{r['resume_wall_s']:.1f}", r["finished"]] for r in rows])


def render_startup(rows) -> list[str]:
    return table(["K", "run dir ready s", "first training step s", "first metrics line s", "run wall s (1 epoch)"],
                 [[r["k"], f"{r['run_dir_ready_s']:.1f}", f"{r['first_step_s']:.1f}",
                   f"{r['first_metrics_line_s']:.1f}", f"{r['wall_s']:.1f}"] for r in rows])


def render_exchange12(rows) -> list[str]:
    out = []
    for r in rows:
        out.append([r["code"], r["mib"], f"{r['bcast_ms']:.2f}", f"{r['candidate_ms']:.2f}",
                    f"{r['candidate_x']:.2f}×", f"{r['allreduce_ms']:.2f}",
                    f"{r['average_ms']:.2f}", f"{r['mean_x']:.2f}×",
                    f"{r['allreduce_sum_ms']:.2f}", f"{r['sum_x']:.2f}×"])
    return table(["code", "MiB", "raw Bcast ms (per buffer, a round of K)", "per candidate ms",
                  "candidate × raw Bcast (target ≥ 0.8)", "raw f32 Allreduce ms", "average's mean ms",
                  "mean × raw Allreduce (target ≥ 0.8)", "allreduce_sum (float64) ms", "sum × raw Allreduce"], out)


def render_rounds12(rows) -> list[str]:
    return table(["code", "K", "peers scored", "round ms (slowest rank)", "MiB received per task",
                  "MiB moved per round (all tasks)"],
                 [[r["code"], r["k"], "all (K−1)" if r["m"] is None else r["m"], f"{r['round_ms']:.1f}",
                   f"{r['mib_received_per_task']:.2f}", f"{r['mib_moved_per_round']:.1f}"] for r in rows])


def render_loop12(rows) -> list[str]:
    return table(["code", "run", "repetition", "launch wall s", "loop s per task", "transfer rounds % (target ≤ 3)",
                  "checkpoints % (target ≤ 3)"],
                 [[r["code"], r["run"], r.get("rep", 0) + 1, f"{r['wall_s']:.0f}", f"{r['loop_s']:.1f}",
                   pct(r["transfer"]), pct(r["checkpoint"])]
                  for r in sorted(rows, key=lambda r: (r["run"], r["code"], r.get("rep", 0)))])


def render_wall12(rows) -> list[str]:
    out = table(["dataset", "pair", "MTO (default) s", "policy none s", "ratio"],
                [[r["data"], r["pair"] + 1, f"{r['mto_s']:.1f}", f"{r['none_s']:.1f}", f"{r['ratio']:.3f}"]
                 for r in rows])
    for data_name in dict.fromkeys(r["data"] for r in rows):
        ratios = [r["ratio"] for r in rows if r["data"] == data_name]
        out.append(f"| {data_name} | median | | | **{statistics.median(ratios):.3f}** (target ≤ 1.03) |")
    return out


def render_startup12(rows) -> list[str]:
    out = []
    for label in dict.fromkeys(r["code"] for r in rows):
        for k in (1, 4):
            mine = [r for r in rows if r["code"] == label and r["k"] == k]
            steps = sorted(r["first_step_s"] for r in mine)
            out.append([label, k, " / ".join(f"{x:.1f}" for x in steps), f"**{statistics.median(steps):.1f}**",
                        "8" if k == 1 else "12"])
    return table(["code", "K", "launch → first step s (each run)", "median", "target ≤ s"], out)


def render_memory12(rows) -> list[str]:
    return table(["policy", "K", "block buffer MiB", "round extra ÷ block bytes, first round",
                  "later rounds (target ≤ 2)"],
                 [[r["policy"], r["k"], f"{r['buffer_mib']:.1f}", f"{r['first_x']:.2f}×", f"{r['later_x']:.2f}×"]
                  for r in rows])


def render_gpu(row) -> list[str]:
    if "skipped" in row:
        return [f"GPU case skipped: {row['skipped']}."]
    return [f"{row['k']} tasks sharing one {row['device']}, resnet18, synthetic 3×32×32, "
            f"{row['train_samples_per_task']} samples per task, {row['epochs']} epochs: "
            f"{row['samples_per_s']:.0f} training samples/s together; transfer rounds "
            f"{pct(row['transfer_share'])}% of each task's time; run wall {row['wall_s']:.0f} s."]


SECTIONS = {"overhead": (overhead, render_overhead,
                         "Transfer overhead: default config (digits, MLP 128, policy best, interval 1, 30 epochs); "
                         "shares of each rank's training-loop wall time, mean over ranks"),
            "bandwidth": (bandwidth, render_bandwidth,
                          "Exchange bandwidth (2 MPI ranks; GB/s = buffer bytes / time; × copy = speed relative "
                          "to a memory copy of the same buffer in the same process)"),
            "memory": (memory, render_memory,
                       "Memory per rank, MLP 1024 (fixed model), 4 epochs = 3 transfer rounds; round extra = "
                       "VmHWM during the round − VmRSS before it"),
            "resume": (resume, render_resume, "Resume after a preemption (digits default, K=4, 3 epochs)"),
            "startup": (startup, render_startup, "Start-up: seconds after `hpc-mto launch` starts (digits default)"),
            "gpu": (gpu, render_gpu, "GPU case"),
            "exchange12": (exchange12, render_exchange12,
                           "Issue 12, exchange: a `best` round's cost per candidate against raw MPI Bcasts of the "
                           "same float32 buffers (each task's in turn), and `average`'s mean (rate 1) and the "
                           "float64 sum against a raw float32 Allreduce (2 ranks; fastest of 5–20 repetitions in a "
                           f"run, median of {EXCHANGE_RUNS} interleaved runs per code version; × = raw time / our "
                           "time, per run)"),
            "rounds12": (rounds12, render_rounds12,
                         f"Issue 12, cost per round against K: one round's exchange of a {ROUND_MIB} MiB buffer "
                         f"(no scoring), K ranks oversubscribed on this machine's cores; every peer, or "
                         f"transfer.candidates={ROUND_M}; fastest of {ROUND_REPS} rounds"),
            "wall12": (wall12, render_wall12,
                       f"Issue 12, whole command: `hpc-mto launch` of the default MTO run against the same run "
                       f"with transfer.policy=none, K=4 (digits: the default config; mnist1d: configs/mnist1d.yaml "
                       f"at 20 epochs), {WALL_PAIRS} interleaved pairs"),
            "startup12": (startup12, render_startup12,
                          "Issue 12, start: `hpc-mto launch` to the first training step (digits default, 1 epoch; "
                          "first step = first metrics line less the epoch's own time)"),
            "memory12": (memory12, render_memory12,
                         "Issue 12, memory: a transfer round's extra resident memory (VmHWM during the round − VmRSS "
                         "before it, worst rank) against the block bytes; MLP 1024, interval 1, 3 rounds"),
            "loop12": (loop12, render_loop12,
                       "Issue 12, shares of each task's loop time (digits, K=4, 30 epochs, whole runs; mean over "
                       "tasks; loop = train + eval + transfer + checkpoint from result.json)")}


# Generated blocks of RESULTS.md beyond issue 6's, each with its own machine line (measured apart).
BLOCKS = {"systems12": ("exchange12", "rounds12", "loop12"), "systems12b": ("wall12", "startup12", "memory12")}
ISSUE12 = BLOCKS["systems12"] + BLOCKS["systems12b"]


def render(saved: dict, names) -> str:
    names = [n for n in names if n in saved]
    if not names:
        return ""
    where = saved.get("machine_of", {}).get(names[0], saved["machine"])
    out = [f"Machine: {machine_line(where)}.", ""]
    for name in names:
        _, show, title = SECTIONS[name]
        out += [f"**{title}** ({saved['section_wall_s'][name]:.0f} s)", ""] + show(saved[name]) + [""]
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument("--before", type=Path, default=None,
                   help="issue-12 sections: also measure the hpc_mto package in this directory (before)")
    p.add_argument("rank", nargs="*", help=argparse.SUPPRESS)  # rank-worker RUN_DIR | rank-bandwidth OUT | ...
    args = p.parse_args(argv)
    if args.rank:
        fn = {"rank-worker": rank_worker, "rank-bandwidth": rank_bandwidth, "rank-exchange": rank_exchange,
              "rank-rounds": lambda out: rank_rounds(out, args.rank[2])}[args.rank[0]]
        in_rank(fn, Path(args.rank[1]))
        return
    global BEFORE
    BEFORE = args.before
    be_nice()
    saved = read_json(OUT, {})
    saved["machine"] = machine()
    for name in args.sections:
        print(f"systems: {name} ...", flush=True)
        t0 = perf()
        saved[name] = SECTIONS[name][0]()
        saved.setdefault("section_wall_s", {})[name] = perf() - t0
        saved.setdefault("machine_of", {})[name] = saved["machine"]
        write_json(OUT, saved)  # keep what we have if a later section fails
    older = [n for n in SECTIONS if n not in ISSUE12]
    if any(n in older for n in args.sections):
        update_results("systems", render(saved, older))
    for block, names in BLOCKS.items():
        if any(n in names for n in args.sections):
            update_results(block, render(saved, names))
    print(render(saved, args.sections))


if __name__ == "__main__":
    main()
