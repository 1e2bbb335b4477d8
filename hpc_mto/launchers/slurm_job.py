"""What runs inside a SLURM job: the task (worker), then the decision to requeue it, and the clean-up
MPICH needs before a requeued gang can start again. submitit pickles ``SlurmTask`` into the job."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from .. import log
from ..errors import LaunchError
from ..signals import EXIT_REQUEUE
from .slurm_queries import job_states, slurm_command

logger = logging.getLogger(__name__)

# Set by a gang's batch script (slurm_request.mpi_start_retry): the file that says the MPI world is up.
MPI_UP_ENV = "HPC_MTO_MPI_UP"


@dataclass(frozen=True)
class SlurmTask:
    """What every SLURM task runs (pickled by submitit): the worker, then the requeue decision."""

    run_dir: str
    task: int | None  # array job: its split; gang: None, the task's rank decides
    max_requeues: int

    def __call__(self) -> int:
        import submitit

        from .. import worker

        env = submitit.JobEnvironment()
        log.setup(self.task)
        if self.task is None:
            drop_stale_mpich_segments(Path(self.run_dir))
        # A stop signal that lands before the worker installs its handler reaches submitit's: rank 0
        # requeues the job, which restarts from the newest checkpoint; no training is lost.
        world_up = os.environ.get(MPI_UP_ENV)
        code = worker.run(Path(self.run_dir), self.task if self.task is not None else env.global_rank,
                          on_world_up=(lambda: Path(world_up).touch()) if world_up else None)
        if code == EXIT_REQUEUE and env.global_rank == 0:
            self.requeue(env.job_id)
        if code != 0:
            # SystemExit escapes submitit's `except Exception`, so it records no result: a requeued
            # job must not look finished, and a failed task has already said why.
            raise SystemExit(code)
        return code

    def requeue(self, job_id: str) -> None:
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", 0))
        resume = f"continue with: hpc-mto resume {self.run_dir}"
        if restarts >= self.max_requeues:
            return logger.info(f"job {job_id} was requeued {restarts} times (--max-requeues): not again; {resume}")
        # scancel and the time limit mark the job COMPLETING before the TERM arrives; requeueing it
        # then would undo a user's cancel. Preemption and the time-out warning leave it RUNNING.
        state = job_states([job_id])[job_id].state
        if state != "RUNNING":
            return logger.info(f"job {job_id} is {state}: not requeued (cancelled or ended by SLURM); {resume}")
        try:
            slurm_command("scontrol", "requeue", job_id)
        except LaunchError as exc:
            return logger.info(f"could not requeue job {job_id}: {exc}; {resume}")
        logger.info(f"requeued job {job_id} (requeue {restarts + 1} of at most {self.max_requeues})")


def drop_stale_mpich_segments(run_dir: Path) -> None:
    """Remove the MPICH shared-memory files that a killed earlier run of this job step left behind.

    MPICH >= 4 names its node-local segment mpich_{shm,vci}_<FNV-1a of the PMI kvsname>_<node>,
    and SLURM's kvsname is "<job id>.<step id>": the same again after a requeue. MPICH unlinks the
    file in MPI_Finalize, so a killed incarnation leaves it, and the next one attaches to stale
    memory and hangs in MPI_Init. Only files older than the job's start go, and those of the job's
    earlier steps (the batch script starts a step again when MPI did not come up, and they run one
    after another, so an earlier step has certainly ended). The first task of this
    incarnation on the node does it, under a lock its other tasks wait on: none of them starts MPI
    while another may still be deleting. (Other MPIs make no such files.)
    """
    job, step = os.environ["SLURM_JOB_ID"], os.environ.get("SLURM_STEP_ID", "0")
    incarnation = f"{job}.{step}.{os.environ.get('SLURM_RESTART_COUNT', '0')}"
    # Per host: /dev/shm is the node's own, so its tasks share one record of what was cleaned.
    with open(run_dir / "slurm" / f".shm-cleanup-{socket.gethostname()}", "a+") as record:
        fcntl.flock(record, fcntl.LOCK_EX)  # released when the file closes
        record.seek(0)
        if incarnation in record.read().split():
            return
        for earlier in range(int(step)):
            for path in Path("/dev/shm").glob(f"mpich_*_{fnv1a32(f'{job}.{earlier}'):x}_*"):
                path.unlink(missing_ok=True)
                logger.info(f"removed {path}, left by step {job}.{earlier}")
        stale = list(Path("/dev/shm").glob(f"mpich_*_{fnv1a32(f'{job}.{step}'):x}_*"))
        if stale:
            started = time.mktime(time.strptime(slurm_command("squeue", "-h", "-j", job, "-o", "%S").strip(),
                                                "%Y-%m-%dT%H:%M:%S"))
            for path in stale:
                if path.stat().st_mtime < started:
                    path.unlink()
                    logger.info(f"removed {path}, left by a killed earlier run of job {job}")
        record.write(incarnation + "\n")


def fnv1a32(text: str) -> int:
    h = 0x811C9DC5
    for byte in text.encode():
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h
