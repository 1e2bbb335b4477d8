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


def mpiexec(k: int, *args: str) -> None:
    from hpc_mto.launchers.local import find_mpiexec

    run_cli([find_mpiexec(), "-n", str(k), sys.executable, __file__, *args], env={"PYTHONUNBUFFERED": "1"})


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
    rounds, peak, real_round = [], [memory_kib("VmHWM")], transfer.run_round

    def measured_round(task, *args, **kwargs):
        peak.append(memory_kib("VmHWM"))  # the peak so far (training), before the reset drops it
        reset_peak()
        rss = memory_kib("VmRSS")
        out = real_round(task, *args, **kwargs)
        layout = transfer.layout_of(task, w.cfg.transfer)
        rounds.append({"extra_kib": memory_kib("VmHWM") - rss, "buffer_kib": layout.size * 4 / 1024})
        return out

    transfer.run_round = measured_round
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
            "gpu": (gpu, render_gpu, "GPU case")}


def render(saved: dict) -> str:
    out = [f"Machine: {machine_line(saved['machine'])}.", ""]
    for name, (_, show, title) in SECTIONS.items():
        if name in saved:
            out += [f"**{title}** ({saved['section_wall_s'][name]:.0f} s)", ""] + show(saved[name]) + [""]
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument("rank", nargs="*", help=argparse.SUPPRESS)  # rank-worker RUN_DIR | rank-bandwidth OUT
    args = p.parse_args(argv)
    if args.rank:
        in_rank({"rank-worker": rank_worker, "rank-bandwidth": rank_bandwidth}[args.rank[0]], Path(args.rank[1]))
        return
    be_nice()
    saved = read_json(OUT, {})
    saved["machine"] = machine()
    for name in args.sections:
        print(f"systems: {name} ...", flush=True)
        t0 = perf()
        saved[name] = SECTIONS[name][0]()
        saved.setdefault("section_wall_s", {})[name] = perf() - t0
        write_json(OUT, saved)  # keep what we have if a later section fails
    text = render(saved)
    update_results("systems", text)
    print(text)


if __name__ == "__main__":
    main()
