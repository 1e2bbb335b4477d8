"""Run the K tasks on SLURM through submitit.

Gang mode (default): one job of K tasks started by srun with the MPI plugin, so the tasks form one
MPI world, one GPU each. Array mode: one job per split; the tasks exchange through HDF5 files
(transfer.backend=file), so each job runs, stops and is requeued on its own.

Preemption and time-out: SLURM signals every task (USR2 ``--signal``ed by submitit before the time
limit, or ``scancel --signal``); hpc_mto.worker checkpoints every rank at the same step and returns
EXIT_REQUEUE; then rank 0 of a gang job, or each array job for itself, requeues its job, which
resumes from the newest complete round. submitit's own handler is not used for this: it checkpoints
rank 0 only, and the K models differ.

RUN_DIR/slurm/ holds submitit's files and logs, and jobs.json: the request, the exact submitit
parameters (so ``resume`` asks for the same) and the job ids of the latest submission.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from ..atomic import write_json
from ..config import Config
from ..errors import LaunchError
from ..rundir import RunDir
from ..signals import EXIT_REQUEUE, parse_signal
from .progress import Progress

# Everything that reaches an #SBATCH line. submitit shell-quotes values, but a newline would still
# end the comment line and run the rest in bash, so only plain names get through.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
# SLURM feature expressions: features joined by & | , with optional [ ] ( ) *N and !.
SAFE_CONSTRAINT = re.compile(r"[A-Za-z0-9_.+\-&|,*\[\]()!:]{1,256}")
SAFE_MEM = re.compile(r"[0-9]+[KMGT]?")


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Request:
    """What a user asks SLURM for: the CLI options of ``launch`` (one per field, help included).

    Kept in jobs.json, so status and resume see what was asked for.
    """

    partition: str | None = _opt(None, "partition (default: the cluster's default one)")
    array: bool = _opt(False, "one job per split (file exchange) instead of one gang job of K tasks")
    gpus_per_task: int = _opt(1, "GPUs per task (0 for CPU partitions)")
    cpus_per_task: int | None = _opt(None, "CPUs per task (default: train.threads)")
    mem: str | None = _opt(None, "memory per node, e.g. 16G")
    time: int = _opt(60, "time limit per job in minutes; a job at its limit checkpoints and requeues")
    nodes: int | None = _opt(None, "nodes of the gang job (default: as few as the tasks fit on)")
    tasks_per_node: int | None = _opt(None, "tasks per node (default: as many as a node's GPUs and CPUs hold)")
    account: str | None = _opt(None, "account to charge")
    qos: str | None = _opt(None, "quality of service")
    constraint: str | None = _opt(None, "node feature constraint, e.g. a100")
    mpi: str = _opt("pmi2", "srun MPI plugin that joins the gang's tasks into one MPI world")
    max_requeues: int = _opt(10, "stop requeueing a job after this many checkpoint-and-requeue cycles")

    def __post_init__(self):
        for name in ("partition", "account", "qos", "mpi"):
            check_value(name, getattr(self, name), SAFE_NAME, "letters, digits and _ . + -")
        check_value("constraint", self.constraint, SAFE_CONSTRAINT, "feature names joined by & | ,")
        check_value("mem", self.mem, SAFE_MEM, "a number with an optional K, M, G or T suffix")
        for name in ("gpus_per_task", "max_requeues"):
            if getattr(self, name) < 0:
                raise LaunchError(f"--{dashed(name)} must be >= 0")
        for name in ("cpus_per_task", "time", "nodes", "tasks_per_node"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise LaunchError(f"--{dashed(name)} must be >= 1")


def dashed(name: str) -> str:
    return name.replace("_", "-")


def check_value(name: str, value: str | None, pattern: re.Pattern, rule: str) -> None:
    if value is not None and not pattern.fullmatch(value):
        raise LaunchError(f"invalid --{dashed(name)} {value!r}: use {rule}")


def job_name(run_path: Path) -> str:
    """``hpc-mto-<run dir name>``, with anything outside the safe set replaced: it names jobs in squeue."""
    return "hpc-mto-" + re.sub(r"[^A-Za-z0-9_.+-]", "_", Path(run_path).absolute().name)[:100]


# -- the cluster -----------------------------------------------------------------------------------
def require(command: str) -> None:
    if shutil.which(command) is None:
        raise LaunchError(f"{command} not found on PATH: no SLURM here (use --executor local)")


def slurm_command(*args: str, stdin: str | None = None) -> str:
    """Run a SLURM client command; its error becomes one LaunchError line."""
    require(args[0])
    proc = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise LaunchError(f"{args[0]} failed: {one_line(proc.stderr or proc.stdout)}")
    return proc.stdout


def one_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return "; ".join(lines[-2:]) if lines else "no message"


@dataclass(frozen=True)
class NodeKind:
    """One group of identical nodes of a partition, as sinfo reports it."""

    cpus: int
    gpus: int


def parse_gpus(gres: str) -> int:
    """GPUs in a sinfo %G field: "gpu:2", "gpu:a100:4(S:0-1)", "gpu:a:2,gpu:b:2", "(null)"."""
    return sum(int(n) for n in re.findall(r"(?:^|,)gpu(?::[^:,(]+)?:(\d+)", gres))


def partition_nodes(partition: str | None) -> list[NodeKind]:
    """The node kinds of a partition (None: the cluster's default one); unknown names list the valid."""
    kinds: dict[str, list[NodeKind]] = {}
    default = None
    for line in slurm_command("sinfo", "-h", "-o", "%P|%c|%G").splitlines():
        name, cpus, gres = line.split("|")
        if name.endswith("*"):
            name = default = name[:-1]
        kinds.setdefault(name, []).append(NodeKind(int(re.match(r"\d+", cpus).group()), parse_gpus(gres)))
    wanted = partition or default
    if wanted not in kinds:
        valid = ", ".join(sorted(kinds)) or "none"
        what = f"unknown partition {partition!r}" if partition else "the cluster has no default partition"
        raise LaunchError(f"{what}; partitions: {valid}")
    return kinds[wanted]


def layout(k: int, req: Request, cpus_per_task: int, kinds: list[NodeKind] | None) -> tuple[int, int]:
    """(nodes, tasks per node) of a gang of k tasks: as given, or as many tasks per node as the
    partition's largest node holds (by GPUs and CPUs), so the gang spans as few nodes as it can."""
    if req.array:
        return 1, 1
    if req.tasks_per_node:
        nodes, per_node = req.nodes or math.ceil(k / req.tasks_per_node), req.tasks_per_node
    elif req.nodes:
        nodes, per_node = req.nodes, math.ceil(k / req.nodes)
    else:
        fits = max(min(kind.gpus // req.gpus_per_task if req.gpus_per_task else k, kind.cpus // cpus_per_task)
                   for kind in kinds)
        if fits < 1:
            biggest = max(kinds, key=lambda kind: (kind.gpus, kind.cpus))
            raise LaunchError(f"no node of partition {req.partition or '(default)'} holds one task of "
                              f"{req.gpus_per_task} GPU and {cpus_per_task} CPU (largest node: "
                              f"{biggest.gpus} GPU, {biggest.cpus} CPU)")
        per_node = min(k, fits)
        nodes = math.ceil(k / per_node)
    if nodes * per_node < k:
        raise LaunchError(f"--nodes {nodes} x --tasks-per-node {per_node} holds fewer than the {k} tasks")
    return nodes, per_node


def executor_parameters(req: Request, k: int, name: str, threads: int, kinds: list[NodeKind] | None) -> dict:
    """The submitit SlurmExecutor parameters of a run (one array job's, in array mode)."""
    cpus = req.cpus_per_task or threads
    nodes, per_node = layout(k, req, cpus, kinds)
    params = {"job_name": name, "time": req.time, "nodes": nodes, "ntasks_per_node": per_node,
              "cpus_per_task": cpus}
    for key in ("partition", "mem", "account", "qos", "constraint"):
        if getattr(req, key) is not None:
            params[key] = getattr(req, key)
    if req.gpus_per_task:
        params["gpus_per_task"] = req.gpus_per_task
    if not req.array:
        # --ntasks bounds the gang to exactly K when nodes x tasks-per-node is larger (SLURM then
        # reads --ntasks-per-node as a maximum); the worker checks the MPI world has K ranks.
        params["additional_parameters"] = {"ntasks": k}
        params["srun_args"] = [f"--mpi={req.mpi}"]
    return params


def plan(cfg: Config, req: Request, run_path: Path) -> dict:
    """Executor parameters for a run, asking sinfo only where the layout must be derived."""
    needs_sinfo = not req.array and not (req.nodes or req.tasks_per_node)
    kinds = partition_nodes(req.partition) if needs_sinfo else None
    return executor_parameters(req, cfg.splits, job_name(run_path), cfg.train.threads, kinds)


def sbatch_script(params: dict, run_path: Path, req: Request, k: int) -> str:
    """The sbatch script submitit submits for these parameters (``--dry-run`` prints it).

    submitit builds it in a private function; using that one keeps the dry run identical to the
    real submission (tests compare the two). submitit submits one job, not an array, for K=1.
    """
    from submitit.slurm.slurm import _make_sbatch_string

    folder = RunDir(run_path).slurm_dir.absolute()
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return _make_sbatch_string(command=command, folder=folder, map_count=k if req.array and k > 1 else None,
                               **params)


def checked_parameters(cfg: Config, req: Request, run_path: Path) -> dict:
    """The executor parameters, once the scheduler agrees to run them (nothing is written)."""
    require("sbatch")
    check_signals(cfg.checkpoint.signals)
    params = plan(cfg, req, run_path)
    try:  # the scheduler's own verdict, without submitting anything
        slurm_command("sbatch", "--test-only", stdin=sbatch_script(params, run_path, req, cfg.splits))
    except LaunchError as exc:
        shape = f"{cfg.splits} {'jobs' if req.array else 'tasks'} of {req.gpus_per_task} GPU and " \
                f"{params['cpus_per_task']} CPU each, partition {req.partition or '(default)'}"
        raise LaunchError(f"SLURM refuses the request ({shape}): {str(exc).removeprefix('sbatch failed: ')}") \
            from None
    return params


def check_signals(signals: list[str]) -> None:
    import submitit

    if parse_signal(submitit.JobEnvironment.USR_SIG) not in {parse_signal(s) for s in signals}:
        raise LaunchError(f"checkpoint.signals must include {submitit.JobEnvironment.USR_SIG}: SLURM sends "
                          "it before the time limit, and the run must checkpoint then")


# -- jobs.json -------------------------------------------------------------------------------------
def jobs_file(run: RunDir) -> Path:
    return run.slurm_dir / "jobs.json"


def read_jobs(run: RunDir) -> dict | None:
    path = jobs_file(run)
    return json.loads(path.read_text()) if path.is_file() else None


def write_jobs(run: RunDir, record: dict) -> None:
    run.slurm_dir.mkdir(parents=True, exist_ok=True)
    write_json(jobs_file(run), record)


# -- submission ------------------------------------------------------------------------------------
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
        if self.task is None:
            drop_stale_mpich_segments()
        # A stop signal that lands before the worker installs its handler reaches submitit's: rank 0
        # requeues the job, which restarts from the newest checkpoint; no training is lost.
        code = worker.run(Path(self.run_dir), self.task if self.task is not None else env.global_rank)
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
            return log(f"job {job_id} was requeued {restarts} times (--max-requeues): not again; {resume}")
        # scancel and the time limit mark the job COMPLETING before the TERM arrives; requeueing it
        # then would undo a user's cancel. Preemption and the time-out warning leave it RUNNING.
        state = job_states([job_id])[job_id].state
        if state != "RUNNING":
            return log(f"job {job_id} is {state}: not requeued (cancelled or ended by SLURM); {resume}")
        try:
            slurm_command("scontrol", "requeue", job_id)
        except LaunchError as exc:
            return log(f"could not requeue job {job_id}: {exc}; {resume}")
        log(f"requeued job {job_id} (requeue {restarts + 1} of at most {self.max_requeues})")


def drop_stale_mpich_segments() -> None:
    """Remove the MPICH shared-memory files that a killed earlier run of this job step left behind.

    MPICH >= 4 names its node-local segment mpich_{shm,vci}_<FNV-1a of the PMI kvsname>_<node>,
    and SLURM's kvsname is "<job id>.<step id>": the same again after a requeue. MPICH unlinks the
    file in MPI_Finalize, so a killed incarnation leaves it, and the next one attaches to stale
    memory and hangs in MPI_Init. Only files older than the job's start go: a segment that a faster
    rank of this incarnation just created is never touched. (Other MPIs make no such files.)
    """
    job, step = os.environ["SLURM_JOB_ID"], os.environ.get("SLURM_STEP_ID", "0")
    stale = list(Path("/dev/shm").glob(f"mpich_*_{fnv1a32(f'{job}.{step}'):x}_*"))
    if not stale:
        return
    started = time.mktime(time.strptime(slurm_command("squeue", "-h", "-j", job, "-o", "%S").strip(),
                                        "%Y-%m-%dT%H:%M:%S"))
    for path in stale:
        if path.stat().st_mtime < started:
            path.unlink(missing_ok=True)
            log(f"removed {path}, left by a killed earlier run of job {job}")


def fnv1a32(text: str) -> int:
    h = 0x811C9DC5
    for byte in text.encode():
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h


def log(msg: str) -> None:
    print(f"hpc-mto: {msg}", file=sys.stderr, flush=True)


def submit(run: RunDir, record: dict) -> list[str]:
    """Submit the run's job(s) as ``record`` (jobs.json) describes; record and return the job ids."""
    import submitit
    from submitit.core.utils import FailedJobError

    req, k = Request(**record["request"]), run.config().splits
    executor = submitit.SlurmExecutor(folder=run.slurm_dir.absolute())
    executor.update_parameters(**record["parameters"])
    path = str(run.path.absolute())
    tasks = [SlurmTask(path, t, req.max_requeues) for t in range(k)] if req.array else \
        [SlurmTask(path, None, req.max_requeues)]
    try:
        jobs = executor.submit_array(tasks)
    except FailedJobError as exc:
        raise LaunchError(f"sbatch refused the job: {one_line(str(exc))}") from None
    ids = [job.job_id for job in jobs]
    write_jobs(run, {**record, "jobs": ids, "history": record.get("history", []) + [
        {"jobs": ids, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")}]})
    return ids


def start(run: RunDir, cfg: Config, req: Request) -> list[str]:
    """Check the request with SLURM, create the run directory and submit; returns the job ids."""
    params = checked_parameters(cfg, req, run.path)
    from ..worker import prepare  # imports torch: seconds, so only once SLURM has said yes

    prepare(run, cfg)
    record = {"mode": "array" if req.array else "gang", "request": dataclasses.asdict(req),
              "parameters": params, "jobs": [], "history": []}
    write_jobs(run, record)  # first: should sbatch still fail, `hpc-mto resume` submits the run later
    with run.lock():
        return submit(run, record)


def refuse_if_live(run: RunDir, record: dict) -> None:
    live = alive(job_states(record["jobs"]))
    if live:
        raise LaunchError(f"run {run.path} still has SLURM job {', '.join(live)} pending or running: wait for "
                          f"it, or stop it with hpc-mto cancel {run.path}")


# -- state, cancel, follow -------------------------------------------------------------------------
class JobState(NamedTuple):
    state: str  # SLURM's word: PENDING, RUNNING, COMPLETED, CANCELLED, TIMEOUT, ...
    requeues: int
    live: bool  # pending or running: SLURM still holds it


def job_states(ids: list[str]) -> dict[str, JobState]:
    """squeue for live jobs (exact and immediate), sacct for ended ones and for the requeue count
    (sacct -D keeps one row per run of a requeued job)."""
    if not ids:
        return {}
    live = dict(line.split("|") for line in
                slurm_command("squeue", "--me", "-h", "-r", "-o", "%i|%T").splitlines())
    rows: dict[str, list[str]] = {}
    bases = sorted({jid.split("_")[0] for jid in ids})
    out = slurm_command("sacct", "-X", "-D", "-n", "-P", "-o", "JobID,State", "-j", ",".join(bases))
    for line in out.splitlines():
        jid, state = line.split("|")
        rows.setdefault(jid, []).append(state.split()[0])  # "CANCELLED by 0" -> CANCELLED
    return {jid: JobState(live.get(jid) or (rows[jid][-1] if rows.get(jid) else "UNKNOWN"),
                          rows.get(jid, []).count("REQUEUED"), jid in live) for jid in ids}


def alive(states: dict[str, JobState]) -> list[str]:
    return [jid for jid, s in states.items() if s.live]


def state_line(jid: str, s: JobState) -> str:
    again = f", requeued {s.requeues} time{'s' * (s.requeues != 1)}" if s.requeues else ""
    return f"job {jid}: {s.state}{again}"


def cancel(record: dict) -> list[str]:
    """scancel the run's live jobs (every task checkpoints on the TERM); returns the ids cancelled."""
    ids = alive(job_states(record["jobs"]))
    if ids:
        slurm_command("scancel", *ids)
    return ids


def follow(run: RunDir, ids: list[str], show_progress: bool) -> dict[str, JobState]:
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
# sacct's states of a job that has ended (a requeued job is back in squeue, pending)
FINAL_STATES = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE"}
