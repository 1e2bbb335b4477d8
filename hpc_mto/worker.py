"""The per-task process: what every MPI rank (or array job) runs.

    python -m hpc_mto.worker RUN_DIR [--task K]

It trains its task, runs a transfer round every ``transfer.interval`` epochs, checkpoints every
``checkpoint.every`` seconds (at an epoch end), at the end and on a stop signal (every rank at the same
step), and finally takes part in the selection. Checkpoints are written in the background while
training goes on; a stop and the end wait for the write.
Task 0 writes the result; the owner of the selected model writes it.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import torch

from . import checkpoint, data, gate, log, provenance, selection, transfer
from . import splits as splits_mod
from .atomic import atomic_path
from .comm import connect
from .errors import DataError, PeerMissing, UserError
from .faults import Faults, attempt_from_env, rank_from_env
from .heartbeat import Heartbeat
from .live import LiveMetrics
from .model_io import write_weights
from .records import MetricsLine, ModelInfo, Timing
from .rundir import RunDir
from .signals import EXIT_REQUEUE, StopFlag
from .state import State
from .task import Task

logger = logging.getLogger("hpc_mto.worker")  # not __name__: run as __main__ by `python -m`

# How often (in training steps) the ranks agree on a pending stop signal: one collective each time.
STOP_CHECK_STEPS = 10


def pick_device(name: str) -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DataError("train.device=cuda but no CUDA device is visible to this task")
    # Several ranks on one node share its GPUs: spread them by local rank.
    local = int(os.environ.get("SLURM_LOCALID", os.environ.get("MPI_LOCALRANKID",
                                                                  os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", 0))))
    return torch.device("cuda", local % torch.cuda.device_count())


class Worker:
    def __init__(self, run_dir: Path, task_index: int | None = None, on_world_up: Callable[[], None] | None = None):
        self.run = RunDir(run_dir).require()
        self.cfg = cfg = self.run.config()
        self.run.code.check_unchanged()  # a requeue after an edit of the user's model must not go on silently
        torch.set_num_threads(cfg.train.threads)  # part of exactness: thread count changes the bits
        fallback = transfer.CheckpointFallback(self.run.checkpoints, cfg.transfer)
        self.comm = connect(cfg.transfer.backend, cfg.splits, task_index, self.run.exchange,
                            cfg.transfer.peer_timeout, fallback)
        self.index = self.comm.rank
        log.setup(self.index)
        if on_world_up is not None and self.comm.synchronous:
            self.comm.barrier()  # every rank has joined: a failure from here on is not a start-up failure
            if self.index == 0:
                on_world_up()
        self.heartbeat = None
        if self.comm.synchronous and self.comm.size > 1 and cfg.transfer.heartbeat_timeout > 0:
            # The latest start time of the ranks names this launch: every rank computes the same one.
            incarnation = repr(max(self.comm.allgather("heartbeat-start", time.time())))
            self.heartbeat = Heartbeat(self.run.heartbeats, self.index, cfg.splits, cfg.transfer.heartbeat_timeout,
                                       incarnation).start()
        s, attrs = splits_mod.read(self.run.splits_file)
        ds = data.load(cfg.data)
        if data.fingerprint(ds) != attrs["data_fingerprint"]:
            raise DataError(f"the dataset {cfg.data.name} differs from the one this run was started on "
                            "(fingerprint mismatch): a run must continue on the same data")
        dev = pick_device(cfg.train.device)
        tr, va = s.train[self.index], s.val[self.index]
        if cfg.transfer.fitness == "train":  # a fixed probe of the task's own training set, from (seed, task)
            rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, self.index, 0x9B0BE]))
            fit = np.sort(rng.choice(tr, min(cfg.transfer.probe_size, len(tr)), replace=False))
        else:  # val; unseen judges on intersections of validation sets instead (transfer.UnseenJudge)
            fit = va
        # The pool (every sample outside the holdout) is needed at the end only by a student or a soup.
        pool = np.union1d(tr, va) if cfg.selection.distill_output or cfg.model.shared_init else tr[:0]
        of = lambda idx: ds.samples(idx, dev, cfg)
        self.sets = selection.EvalSets(select=of(s.holdout_select), estimate=of(s.holdout_estimate),
                                       test=ds.test_samples(dev, cfg), pool=of(pool))
        self.task = Task(cfg, self.index, of(tr), of(va), of(fit), ds.input_shape, ds.num_classes, dev)
        fallback.bind(self.task)
        judge = (transfer.UnseenJudge(of, s.val, cfg.transfer.min_samples)
                 if cfg.transfer.fitness == "unseen" else transfer.FixedJudge(self.task.fitness))
        self.exchange = transfer.Exchange(self.task, self.comm, cfg.transfer, judge)
        self.metrics, self.transfers = self.run.metrics(self.index), self.run.transfers(self.index)
        self.live = (LiveMetrics(cfg.log, self.run.tensorboard_dir(self.index), self.run.mlflow_ids, self.index)
                     if cfg.log.tensorboard or cfg.log.mlflow else None)
        self.fingerprint = attrs["data_fingerprint"]
        self.preprocessing = ds.preprocessing
        self.num_classes = int(attrs["num_classes"])
        self.times = {"train": 0.0, "transfer": 0.0, "eval": 0.0, "checkpoint": 0.0}
        self.saved_at = time.monotonic()  # of the newest checkpoint (or the start): checkpoint.every
        self.writer = checkpoint.BackgroundWriter()

    def leave(self, finished: bool = False) -> None:
        """This task is done with the run (finished, stopped or failed): peers stop watching it."""
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None
        if self.live is not None:
            self.live.close(finished)
            self.live = None
        try:
            self.writer.wait()  # a failed task still finishes the checkpoint it began (or says why not)
        except Exception as exc:
            logger.warning(f"the checkpoint being written when the task ended failed: {exc}")

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> State:
        """The task's exact state plus this process's bookkeeping: log positions and time spent."""
        state = self.task.state_dict()
        state.meta["run"] = {"metrics_pos": self.metrics.position(), "transfers_pos": self.transfers.position(),
                             "data_fingerprint": self.fingerprint, "times": self.times}
        return state

    def checkpoint_due(self) -> bool:
        """checkpoint.every: at the first epoch end that long after the previous checkpoint, so a
        crash loses at most that time or one epoch, whichever is larger (0: every epoch end)."""
        every = self.cfg.checkpoint.every
        return every == 0 or time.monotonic() - self.saved_at >= every

    def save(self, wait: bool = False) -> None:
        """Checkpoint the current step: snapshot now, write in the background (``wait``: the stop
        and the end, which must leave it durable before going on). Every task calls it at the same
        step, so the barriers in ``settle`` pair up."""
        t0 = time.perf_counter()
        self.settle()
        self.writer.start(self.run.checkpoints, self.index, self.task.global_step, self.state_dict())
        if wait:
            self.settle()
        self.times["checkpoint"] += time.perf_counter() - t0
        self.saved_at = time.monotonic()

    def settle(self) -> None:
        """The write in flight is durable here, then on every task; only then go the checkpoints
        older than the newest ``keep``, so the newest common one always survives (while the next
        is written too)."""
        self.writer.wait()
        self.comm.barrier()
        checkpoint.prune(self.run.checkpoints, self.index, self.cfg.checkpoint.keep)

    def restore(self) -> None:
        root = self.run.checkpoints
        if self.comm.synchronous:
            step, notes = checkpoint.newest_common(root, self.comm.size)
        else:  # array jobs resume on their own: each from its own newest intact checkpoint
            step, notes = checkpoint.newest_intact(root, self.index), []
        if self.index == 0 or not self.comm.synchronous:
            for note in notes:
                logger.warning(note)
        if step is None:
            if checkpoint.steps(root, self.index):
                logger.warning("no intact checkpoint that every task reached: starting from the beginning")
            self.metrics.truncate(0)  # nothing trustworthy to continue from: start over
            self.transfers.truncate(0)
            return
        state = checkpoint.load(checkpoint.path_for(root, self.index, step))
        self.task.load_state_dict(state)
        bookkeeping = state.meta["run"]
        self.metrics.truncate(bookkeeping["metrics_pos"])
        self.transfers.truncate(bookkeeping["transfers_pos"])
        self.times = bookkeeping["times"]
        logger.info(f"resumed at epoch {self.task.epoch} step {self.task.step} (global step {step})")

    # -- the run -----------------------------------------------------------------------------
    def train(self, stop: StopFlag) -> bool:
        """Train to the last epoch; False if stopped by a signal (checkpoint written)."""
        task = self.task
        faults = Faults(self.index, stop.send_to_self)

        def should_stop() -> bool:
            self.exchange.after_step()
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
                self.save(wait=True)
                return False
            t0 = time.perf_counter()
            scores = task.finish_epoch()
            self.times["eval"] += time.perf_counter() - t0
            adopted = None
            if self.exchange.round_due():
                t0 = time.perf_counter()
                round_index = self.exchange.round_index()
                faults.fire("transfer", round_index)
                decision = self.exchange.run_round()
                self.transfers.append(decision)
                self.times["transfer"] += time.perf_counter() - t0
                adopted = decision.accepted
                if round_index >= 2:
                    # Two rounds back: every live peer has read it by now, or has fallen back to checkpoints.
                    self.exchange.release_round(round_index - 2)
            line = MetricsLine(**scores, adopted=adopted, adopted_total=task.adopted, lineage=task.lineage,
                               times={k: round(v, 4) for k, v in self.times.items()})
            self.metrics.append(line)
            if self.live is not None:
                self.live.epoch(line)
            stopping = self.comm.any(stop.is_set)
            # On the file exchange a late peer is stood in for by its checkpoints: they follow the rounds.
            round_copy = adopted is not None and not self.comm.synchronous
            if self.comm.any(self.checkpoint_due()) or round_copy or task.done or stopping:
                faults.fire("checkpoint", task.global_step)
                self.save(wait=task.done or stopping)
            if stopping:
                return False
        return True

    def finish(self) -> None:
        t0 = time.perf_counter()
        scored = selection.run(self.task, self.comm, self.sets)
        write_weights(self.run.member_file(self.index), scored.member)
        self.times["eval"] += time.perf_counter() - t0
        # Also a barrier: past it every member file is written, so result.json never precedes one.
        gathered = self.comm.allgather("final-times", {"times": self.times, "host": socket.gethostname()})
        if self.index != 0:
            return
        times = [g["times"] for g in gathered]
        t0 = time.perf_counter()
        concluded = selection.conclude(self.task, self.sets, scored)
        times[0]["eval"] += time.perf_counter() - t0
        result = concluded.result
        write_weights(self.run.model_file, concluded.network)
        ModelInfo(model=dict(vars(self.cfg.model)), candidate=concluded.network_id,
                  input_shape=list(self.task.train.input_shape), num_classes=self.num_classes, output=result.output,
                  ensemble=[str(self.run.member_file(t).relative_to(self.run.path)) for t in range(self.cfg.splits)],
                  preprocessing=self.preprocessing).write(self.run.model_info)
        result.timing = Timing(per_task=times, total={key: sum(t[key] for t in times) for key in times[0]})
        result.provenance = provenance.finished(self.run.provenance_file, [g["host"] for g in gathered],
                                                self.run.code.factories())
        with atomic_path(self.run.result_h5) as tmp, h5py.File(tmp, "w") as f:
            f.create_dataset("cv_acc", data=np.asarray(result.cv_acc))
            f.create_dataset("cv_loss", data=np.asarray([[math.inf if x is None else x for x in row]
                                                         for row in result.cv_loss]))
        result.write(self.run.result_file)  # last: its presence means "finished"


def run(run_dir: Path, task_index: int | None = None, on_world_up: Callable[[], None] | None = None) -> int:
    """One task's whole life; the exit status. ``on_world_up`` is called on rank 0 once every rank of
    an MPI world has joined (a SLURM gang's batch script starts the tasks again if that never happens)."""
    log.setup(task_index)
    worker = None
    try:
        # Handlers first: a signal during start-up (data loading, MPI init) must take the same
        # every-rank checkpoint path, not submitit's rank-0-only handler.
        stop = StopFlag(RunDir(run_dir).require().config().checkpoint.signals)
        Faults(rank_from_env(task_index), stop.send_to_self).fire("start", attempt_from_env())
        worker = Worker(run_dir, task_index, on_world_up)
        worker.restore()
        if not worker.train(stop):
            why = f"signal {stop.received}" if stop.received is not None else "a peer's stop signal"
            logger.info(f"stopped by {why}: checkpoint written, exiting (status {EXIT_REQUEUE})")
            worker.leave()
            return EXIT_REQUEUE
        worker.finish()
        worker.leave(finished=True)
        return 0
    except (UserError, PeerMissing) as exc:
        logger.error(f"{exc}" + ("; resume the run once that task is back" if isinstance(exc, PeerMissing) else ""))
        code = exc.exit_code
    except Exception as exc:
        logger.exception(f"{type(exc).__name__}: {exc}")
        code = 1
    # One failed rank must end the whole MPI job promptly instead of leaving its peers blocked in a
    # collective forever.
    if worker is not None:
        worker.leave()
        worker.comm.abort(code)
    return code


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--task", type=int, default=None, help="task index (file backend: one process per task)")
    a = p.parse_args(argv)
    if not gate.wait():
        return 0  # the launch failed before the run directory was written: the launcher says why
    return run(a.run_dir, a.task)


if __name__ == "__main__":
    sys.exit(main())
