"""Run the K tasks on SLURM through submitit: submit, follow, cancel (the launcher's side).

Gang mode (default): one job of K tasks started by srun with the MPI plugin, so the tasks form one
MPI world, one GPU each. Array mode: one job per split; the tasks exchange through HDF5 files
(transfer.backend=file), so each job runs, stops and is requeued on its own.

Preemption and time-out: SLURM signals every task (USR2 ``--signal``ed by submitit before the time
limit, or ``scancel --signal``); hpc_mto.worker checkpoints every rank at the same step and returns
EXIT_REQUEUE; then rank 0 of a gang job, or each array job for itself, requeues its job, which
resumes from the newest complete round. submitit's own handler is not used for this: it checkpoints
rank 0 only, and the K models differ.

RUN_DIR/slurm/ holds submitit's files and logs, and jobs.json (``records.JobsRecord``): the request,
the exact submitit parameters (so ``resume`` asks for the same) and the job ids of the latest
submission.

Modules by where their code runs, imports one way: this one (launcher) -> ``slurm_request`` (the
request and its sbatch script), ``slurm_job`` (inside the job) -> ``slurm_queries`` (SLURM's
client commands).
"""

from __future__ import annotations

import dataclasses
import time

from ..config import Config
from ..errors import LaunchError
from ..records import JobsRecord, JobSubmission
from ..rundir import RunDir
from .progress import Progress
from .slurm_job import SlurmTask
from .slurm_queries import FINAL_STATES, JobState, alive, job_states, one_line, slurm_command, state_line
from .slurm_request import Request, checked_parameters


def submit(run: RunDir, record: JobsRecord) -> list[str]:
    """Submit the run's job(s) as ``record`` (jobs.json) describes; record and return the job ids."""
    import submitit
    from submitit.core.utils import FailedJobError

    req, k = Request(**record.request), run.config().splits
    executor = submitit.SlurmExecutor(folder=run.slurm_dir.absolute())
    executor.update_parameters(**record.parameters)
    path = str(run.path.absolute())
    tasks = [SlurmTask(path, t, req.max_requeues) for t in range(k)] if req.array else \
        [SlurmTask(path, None, req.max_requeues)]
    try:
        jobs = executor.submit_array(tasks)
    except FailedJobError as exc:
        raise LaunchError(f"sbatch refused the job: {one_line(str(exc))}") from None
    ids = [job.job_id for job in jobs]
    record.jobs = ids
    record.history.append(JobSubmission(ids, time.strftime("%Y-%m-%dT%H:%M:%S")))
    run.write_jobs(record)
    return ids


def start(run: RunDir, cfg: Config, req: Request) -> list[str]:
    """Check the request with SLURM, create the run directory and submit; returns the job ids."""
    params = checked_parameters(cfg, req, run.path)
    from ..prepare import prepare  # imports torch: seconds, so only once SLURM has said yes

    prepare(run, cfg)
    record = JobsRecord(mode="array" if req.array else "gang", request=dataclasses.asdict(req), parameters=params)
    run.write_jobs(record)  # first: should sbatch still fail, `hpc-mto resume` submits the run later
    with run.lock():
        return submit(run, record)


def refuse_if_live(run: RunDir, record: JobsRecord) -> None:
    live = alive(job_states(record.jobs))
    if live:
        raise LaunchError(f"run {run.path} still has SLURM job {', '.join(live)} pending or running: wait for "
                          f"it, or stop it with hpc-mto cancel {run.path}")


def cancel(record: JobsRecord) -> list[str]:
    """scancel the run's live jobs (every task checkpoints on the TERM); returns the ids cancelled."""
    ids = alive(job_states(record.jobs))
    if ids:
        slurm_command("scancel", *ids)
    return ids


def follow(run: RunDir, ids: list[str], show_progress: bool | None) -> dict[str, JobState]:
    """Show progress until no job of the run is pending or running; return their final states."""
    progress = Progress(run, run.config().splits, show_progress)
    seen: dict[str, JobState] = {}
    next_poll, left_queue = 0.0, None
    while True:
        progress.draw()
        # Poll SLURM every few seconds (schedulers dislike tight squeue loops), but at once when
        # the result appears or the jobs have left the queue, so that the end is reported promptly.
        if time.monotonic() >= next_poll or run.finished or left_queue is not None:
            states = job_states(ids)
            for jid in ids:
                if states[jid] != seen.get(jid):
                    progress.note(state_line(jid, states[jid]))
            seen = states
            if not alive(states):
                left_queue = left_queue or time.monotonic()
                # sacct hears of the end a moment after squeue drops the job: wait for its verdict.
                if all(s.state in FINAL_STATES for s in states.values()) or \
                        time.monotonic() - left_queue > ACCOUNTING_LAG_S:
                    return states
            next_poll = time.monotonic() + FOLLOW_POLL_S
        time.sleep(0.5)


FOLLOW_POLL_S = 3.0
ACCOUNTING_LAG_S = 30.0
