"""The per-task process: what every MPI rank (or array job) runs.

    python -m hpc_mto.worker RUN_DIR [--task K]

It trains its task, runs a transfer round every ``transfer.interval`` epochs, checkpoints at every
round and on a stop signal (every rank at the same step), and finally takes part in the selection.
Task 0 writes the result; the owner of the selected model writes it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from pathlib import Path

import h5py
import numpy as np
import torch

from . import checkpoint, data, select, transfer
from . import splits as splits_mod
from .atomic import atomic_path, write_json
from .blocks import BlockLayout
from .comm import Comm, FileComm, MPIComm, SoloComm, mpi_world_size
from .config import Config
from .errors import DataError, PeerMissing, TaskFailed, UserError
from .rundir import RunDir
from .faults import Faults
from .signals import EXIT_REQUEUE, StopFlag
from .task import Arrays, Task


# How often (in training steps) the ranks agree on a pending stop signal: one collective each time.
STOP_CHECK_STEPS = 10


def prepare(run: RunDir, cfg: Config) -> None:
    """Create the run directory: config, data check, splits. Runs once, in the launcher."""
    ds = data.load(cfg.data)  # before anything is written: a data error leaves no half-made run
    s = splits_mod.make(ds.y, cfg.splits, cfg.data.val_fraction, cfg.data.selection_holdout, cfg.seed,
                        cfg.data.stratify, ds.test_index, ds.test_source)
    from . import models

    models.build(cfg.model, ds.input_shape, ds.num_classes)  # shape errors before any job starts
    run.create(cfg)
    splits_mod.write(run.splits_file, s, {"data_fingerprint": data.fingerprint(ds), "seed": cfg.seed,
                                          "num_classes": ds.num_classes,
                                          "input_shape": list(ds.input_shape)})


def pick_device(name: str) -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DataError("train.device=cuda but no CUDA device is visible to this task")
    # Several ranks on one node share its GPUs: spread them by local rank.
    local = int(os.environ.get("SLURM_LOCALID", os.environ.get("MPI_LOCALRANKID",
                                                                  os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", 0))))
    return torch.device("cuda", local % torch.cuda.device_count())


def make_comm(cfg: Config, run: RunDir, task: int | None, log) -> Comm:
    if cfg.transfer.backend == "file":
        if task is None:
            raise UserError("transfer.backend=file needs --task K (one process per split)")
        return FileComm(run.exchange, task, cfg.splits, cfg.transfer.peer_timeout, log)
    if cfg.splits == 1 and not mpi_world_size():
        return SoloComm()
    comm = MPIComm()
    if comm.size != cfg.splits:
        raise UserError(f"the MPI world has {comm.size} ranks but the run has splits={cfg.splits}: "
                        f"start it with mpiexec -n {cfg.splits}")
    return comm


class Worker:
    def __init__(self, run_dir: Path, task_index: int | None = None):
        self.run = RunDir(run_dir).require()
        self.cfg = cfg = self.run.config()
        torch.set_num_threads(cfg.train.threads)  # part of exactness: thread count changes the bits
        self.comm = make_comm(cfg, self.run, task_index, self.log)
        self.k = self.comm.rank
        s, attrs = splits_mod.read(self.run.splits_file)
        ds = data.load(cfg.data)
        if data.fingerprint(ds) != attrs["data_fingerprint"]:
            raise DataError(f"the dataset {cfg.data.name} differs from the one this run was started on "
                            "(fingerprint mismatch): a run must continue on the same data")
        dev = pick_device(cfg.train.device)
        tr, va = s.train[self.k], s.val[self.k]
        if cfg.transfer.fitness == "val":
            fit = va
        else:  # a fixed probe of the task's own training set, drawn once from (seed, task)
            rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, self.k, 0x9B0BE]))
            fit = np.sort(rng.choice(tr, min(cfg.transfer.probe_size, len(tr)), replace=False))
        self.holdout = Arrays.of(ds.x[s.holdout], ds.y[s.holdout], dev)
        self.test = Arrays.of(ds.x_test, ds.y_test, dev)
        self.task = Task(cfg, self.k, Arrays.of(ds.x[tr], ds.y[tr], dev), Arrays.of(ds.x[va], ds.y[va], dev),
                         Arrays.of(ds.x[fit], ds.y[fit], dev), ds.input_shape, ds.num_classes, dev)
        self.metrics, self.transfers = self.run.metrics(self.k), self.run.transfers(self.k)
        self.fingerprint = attrs["data_fingerprint"]
        self.num_classes = int(attrs["num_classes"])
        self.times = {"train": 0.0, "transfer": 0.0, "eval": 0.0, "checkpoint": 0.0}

    def log(self, msg: str) -> None:
        print(f"[task {getattr(self, 'k', '?')}] {msg}", file=sys.stderr, flush=True)

    # -- checkpoints -------------------------------------------------------------------------
    def save(self) -> None:
        t0 = time.perf_counter()
        extra = {"metrics_pos": self.metrics.position(), "transfers_pos": self.transfers.position(),
                 "data_fingerprint": self.fingerprint, "times": self.times}
        checkpoint.save(self.run.checkpoints, self.task, extra)
        # Prune only once every task holds the new checkpoint, so the newest common one survives.
        self.comm.barrier()
        checkpoint.prune(self.run.checkpoints, self.k, self.cfg.checkpoint.keep)
        self.times["checkpoint"] += time.perf_counter() - t0

    def restore(self) -> None:
        root = self.run.checkpoints
        if self.comm.synchronous:
            step, notes = checkpoint.newest_common(root, self.comm.size)
        else:  # array jobs resume on their own: each from its own newest intact checkpoint
            intact = [s for s in checkpoint.steps(root, self.k)
                      if checkpoint.verify(checkpoint.path_for(root, self.k, s)) is None]
            step, notes = (max(intact) if intact else None), []
        if self.k == 0 or not self.comm.synchronous:
            for note in notes:
                self.log(note)
        if step is None:
            if checkpoint.steps(root, self.k):
                self.log("no intact checkpoint that every task reached: starting from the beginning")
            self.metrics.truncate(0)  # nothing trustworthy to continue from: start over
            self.transfers.truncate(0)
            return
        extra = checkpoint.load(checkpoint.path_for(root, self.k, step), self.task)
        self.metrics.truncate(extra["metrics_pos"])
        self.transfers.truncate(extra["transfers_pos"])
        self.times = extra["times"]
        self.log(f"resumed at epoch {self.task.epoch} step {self.task.step} (global step {step})")

    def peer_fallback(self, j: int, layout: BlockLayout):
        """A peer's blocks from its newest intact checkpoint (file backend, peer too late)."""
        for s in reversed(checkpoint.steps(self.run.checkpoints, j)):
            path = checkpoint.path_for(self.run.checkpoints, j, s)
            if checkpoint.verify(path) is None:
                named, counters = checkpoint.read_named(path)
                buf = layout.from_named(named)
                behind = (self.task.epoch - int(counters["epoch"])) // self.cfg.transfer.interval
                return buf, {"task": j, "finite": transfer.finite(buf), "lineage": counters["lineage"],
                             "rounds_behind": behind}
        return np.zeros(layout.size, np.float32), {"task": j, "finite": False, "lineage": [j], "missing": True}

    # -- the run -----------------------------------------------------------------------------
    def train(self, stop: StopFlag) -> bool:
        """Train to the last epoch; False if stopped by a signal (checkpoint written)."""
        cfg, task = self.cfg, self.task
        faults = Faults(self.k, stop.send_to_self)

        def should_stop() -> bool:
            faults.fire("step", task.global_step)
            # The ranks agree every STOP_CHECK_STEPS steps, at the same global steps on every rank,
            # so they still all stop at one step; agreeing after every step cost up to 46% of the
            # training loop with small models (bench/RESULTS.md). Epoch ends check too.
            if task.global_step % STOP_CHECK_STEPS:
                return False
            return self.comm.any(stop.is_set)

        while not task.done:
            t0 = time.perf_counter()
            completed = task.train_steps(should_stop)
            self.times["train"] += time.perf_counter() - t0
            if not completed:
                self.save()
                return False
            t0 = time.perf_counter()
            record = task.finish_epoch()
            self.times["eval"] += time.perf_counter() - t0
            is_round = task.epoch % cfg.transfer.interval == 0
            if is_round and cfg.transfer.policy != "none" and not task.done:
                t0 = time.perf_counter()
                faults.fire("transfer", task.epoch // cfg.transfer.interval)
                decision = transfer.run_round(task, self.comm, cfg.transfer, task.epoch // cfg.transfer.interval,
                                              self.peer_fallback)
                self.transfers.append(decision)
                self.times["transfer"] += time.perf_counter() - t0
                record["adopted"] = decision["accepted"]
                self._clean_exchange(task.epoch // cfg.transfer.interval)
            record.update({"adopted_total": task.adopted, "lineage": task.lineage,
                           "times": {k: round(v, 4) for k, v in self.times.items()}})
            self.metrics.append(record)
            stopping = self.comm.any(stop.is_set)
            if is_round or task.done or stopping:
                faults.fire("checkpoint", task.global_step)
                self.save()
            if stopping:
                return False
        return True

    def _clean_exchange(self, round_index: int) -> None:
        if isinstance(self.comm, FileComm) and round_index >= 2:
            # Two rounds back: every live peer has read it by now, or has fallen back to checkpoints.
            self.comm.cleanup(f"round-{round_index - 2:05d}")

    def finish(self) -> dict:
        t0 = time.perf_counter()
        result = select.run(self.task, self.comm, self.holdout, self.test, self.cfg.selection.rule)
        self.times["eval"] += time.perf_counter() - t0
        times = self.comm.allgather("final-times", self.times)
        state = select.selected_state(self.task, result)
        if state is not None:
            with atomic_path(self.run.model_file) as tmp:
                torch.save(state, tmp)
            write_json(self.run.model_info, {"model": self.cfg.model.__dict__, "candidate": result["selected"]["id"],
                                             "input_shape": list(self.task.train.x.shape[1:]),
                                             "num_classes": self.num_classes})
        if self.k == 0:
            result["timing"] = {"per_task": times,
                                "total": {key: sum(t[key] for t in times) for key in times[0]}}
            with atomic_path(self.run.result_h5) as tmp, h5py.File(tmp, "w") as f:
                f.create_dataset("cv_acc", data=np.asarray(result["cv_acc"]))
                f.create_dataset("cv_loss", data=np.asarray([[math.inf if x is None else x for x in row]
                                                             for row in result["cv_loss"]]))
            write_json(self.run.result_file, result)  # last: its presence means "finished"
        return result


def run(run_dir: Path, task_index: int | None = None) -> int:
    worker = None
    try:
        # Handlers first: a signal during start-up (data loading, MPI init) must take the same
        # every-rank checkpoint path, not submitit's rank-0-only handler.
        stop = StopFlag(RunDir(run_dir).require().config().checkpoint.signals)
        worker = Worker(run_dir, task_index)
        worker.restore()
        if not worker.train(stop):
            worker.log(f"stopped by signal {stop.received}: checkpoint written, exiting (status {EXIT_REQUEUE})")
            return EXIT_REQUEUE
        worker.finish()
        return 0
    except (UserError, PeerMissing) as exc:
        print(f"hpc-mto: task {task_index if worker is None else worker.k}: {exc}"
              + ("; resume the run once that task is back" if isinstance(exc, PeerMissing) else ""),
              file=sys.stderr, flush=True)
        code = exc.exit_code
    except Exception as exc:
        who = task_index if worker is None else worker.k
        traceback.print_exc()
        print(f"hpc-mto: {TaskFailed(who if who is not None else -1, f'{type(exc).__name__}: {exc}')}",
              file=sys.stderr, flush=True)
        code = 1
    # One failed rank must end the whole MPI job promptly instead of leaving its peers blocked in a
    # collective forever.
    if worker is not None and isinstance(worker.comm, MPIComm) and worker.comm.size > 1:
        worker.comm.abort(code)
    return code


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--task", type=int, default=None, help="task index (file backend: one process per task)")
    a = p.parse_args(argv)
    return run(a.run_dir, a.task)


if __name__ == "__main__":
    sys.exit(main())
