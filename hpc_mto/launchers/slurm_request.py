"""What a user asks SLURM for, and the job it becomes: the ``Request`` (the launch options), the
node layout of a gang, the submitit parameters and the sbatch script they render to. Nothing here
submits; ``checked_parameters`` asks the scheduler with ``sbatch --test-only``."""

from __future__ import annotations

import math
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config
from ..errors import LaunchError
from ..rundir import RunDir
from ..signals import parse_signal
from .slurm_job import MPI_UP_ENV
from .slurm_queries import NodeKind, partition_nodes, require, slurm_command

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
    time: str = _opt("60", "time limit per job: minutes (90) or SLURM's [D-]HH:MM:SS (1:30:00, 2-00:00:00); "
                           "a job at its limit checkpoints and requeues")
    nodes: int | None = _opt(None, "nodes of the gang job (default: as few as the tasks fit on)")
    tasks_per_node: int | None = _opt(None, "tasks per node (default: as many as a node's GPUs and CPUs hold)")
    account: str | None = _opt(None, "account to charge")
    qos: str | None = _opt(None, "quality of service")
    constraint: str | None = _opt(None, "node feature constraint, e.g. a100")
    mpi: str = _opt("pmi2", "srun MPI plugin that joins the gang's tasks into one MPI world")
    max_requeues: int = _opt(10, "stop requeueing a job after this many checkpoint-and-requeue cycles")
    array_parallelism: int | None = _opt(None, "with --array: at most this many of the K jobs run at once")
    sbatch_arg: tuple[str, ...] = _opt((), "an sbatch option as KEY=VALUE, e.g. reservation=r1 (repeatable)")
    setup: tuple[str, ...] = _opt((), "a line the job script runs first, e.g. 'module load cuda' (repeatable)")

    def __post_init__(self):
        object.__setattr__(self, "sbatch_arg", tuple(self.sbatch_arg))  # lists when read from jobs.json
        object.__setattr__(self, "setup", tuple(self.setup))
        for item in self.sbatch_arg:
            check_sbatch_arg(item)
        for line in self.setup:
            if "\n" in line or "\r" in line or not line.strip():
                raise LaunchError(f"invalid --setup {line!r}: one non-empty line of shell per --setup")
        if self.array_parallelism is not None and (self.array_parallelism < 1 or not self.array):
            raise LaunchError("--array-parallelism needs --array and a value >= 1")
        for name in ("partition", "account", "qos", "mpi"):
            check_value(name, getattr(self, name), SAFE_NAME, "letters, digits and _ . + -")
        check_value("constraint", self.constraint, SAFE_CONSTRAINT, "feature names joined by & | ,")
        check_value("mem", self.mem, SAFE_MEM, "a number with an optional K, M, G or T suffix")
        for name in ("gpus_per_task", "max_requeues"):
            if getattr(self, name) < 0:
                raise LaunchError(f"--{dashed(name)} must be >= 0")
        object.__setattr__(self, "time", str(self.time))  # jobs.json of hpc-mto < 0.3 holds an int
        if self.minutes < 1:
            raise LaunchError("--time must be at least 1 minute")
        for name in ("cpus_per_task", "nodes", "tasks_per_node"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise LaunchError(f"--{dashed(name)} must be >= 1")
        if self.array and (self.nodes or self.tasks_per_node):
            raise LaunchError("--nodes and --tasks-per-node shape a gang job; with --array every job is one "
                              "task on one node: drop them, or drop --array")


    @property
    def minutes(self) -> int:
        return slurm_minutes(self.time)


SLURM_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")


def slurm_minutes(text: str) -> int:
    """SLURM's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in whole minutes, seconds rounded up."""
    m = SLURM_TIME.fullmatch(text.strip())
    if not m:
        raise LaunchError(f"invalid --time {text!r}: use minutes (90), HH:MM:SS (1:30:00) or D-HH:MM:SS (2-00:00:00)")
    days, a, b, c = m.groups()
    if days is not None:  # D-H[:M[:S]]
        minutes, seconds = int(days) * 1440 + int(a) * 60 + int(b or 0), int(c or 0)
    elif c is not None:  # H:M:S
        minutes, seconds = int(a) * 60 + int(b), int(c)
    else:  # M or M:S
        minutes, seconds = int(a), int(b or 0)
    return minutes + math.ceil(seconds / 60)


# sbatch options hpc-mto sets itself (from its own options or as the job's shape): not through --sbatch-arg.
RESERVED_SBATCH = {"array", "cpus-per-task", "error", "gpus-per-task", "job-name", "nodes", "ntasks",
                   "ntasks-per-node", "open-mode", "output", "partition", "signal", "time", "wckey", "mem",
                   "account", "qos", "constraint", "wrap", "export", "chdir"}
SBATCH_KEY = re.compile(r"[a-z][a-z0-9-]{0,63}")
SBATCH_VALUE = re.compile(r"[A-Za-z0-9_.,:=+/@%-]{0,256}")


def check_sbatch_arg(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not SBATCH_KEY.fullmatch(key) or not SBATCH_VALUE.fullmatch(value):
        raise LaunchError(f"invalid --sbatch-arg {item!r}: use KEY=VALUE, an sbatch long option without its "
                          "dashes (e.g. reservation=r1), the value of letters, digits and _ . , : = + / @ % -")
    if key in RESERVED_SBATCH:
        raise LaunchError(f"invalid --sbatch-arg {item!r}: hpc-mto sets --{key} itself; use its own option "
                          f"(hpc-mto launch --help)" if key not in ("wrap", "export", "chdir", "array") else
                          f"invalid --sbatch-arg {item!r}: --{key} would change how the job runs its tasks")
    return key, value


def dashed(name: str) -> str:
    return name.replace("_", "-")


def check_value(name: str, value: str | None, pattern: re.Pattern, rule: str) -> None:
    if value is not None and not pattern.fullmatch(value):
        raise LaunchError(f"invalid --{dashed(name)} {value!r}: use {rule}")


def job_name(run_path: Path) -> str:
    """``hpc-mto-<run dir name>``, with anything outside the safe set replaced: it names jobs in squeue."""
    return "hpc-mto-" + re.sub(r"[^A-Za-z0-9_.+-]", "_", Path(run_path).absolute().name)[:100]


def config_overrides(req: Request) -> list[str]:
    """Config the request implies: array jobs share no MPI world, so they exchange through files."""
    return ["transfer.backend=file"] if req.array else []


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


# How often the batch script starts a gang's tasks when their MPI world does not come up.
MPI_START_ATTEMPTS = 3


def executor_parameters(req: Request, k: int, name: str, threads: int, kinds: list[NodeKind] | None,
                        slurm_dir: Path) -> dict:
    """The submitit SlurmExecutor parameters of a run (one array job's, in array mode)."""
    cpus = req.cpus_per_task or threads
    nodes, per_node = layout(k, req, cpus, kinds)
    params = {"job_name": name, "time": req.minutes, "nodes": nodes, "ntasks_per_node": per_node,
              "cpus_per_task": cpus}
    for key in ("partition", "mem", "account", "qos", "constraint"):
        if getattr(req, key) is not None:
            params[key] = getattr(req, key)
    if req.gpus_per_task:
        params["gpus_per_task"] = req.gpus_per_task
    # KEY= is a flag without a value (exclusive=): submitit writes True as a bare --key.
    extra = {key.replace("-", "_"): value or True for key, value in map(check_sbatch_arg, req.sbatch_arg)}
    if extra:
        params["additional_parameters"] = extra
    if req.setup:
        params["setup"] = list(req.setup)
    if req.array_parallelism:
        params["array_parallelism"] = req.array_parallelism
    if not req.array:
        # --ntasks bounds the gang to exactly K when nodes x tasks-per-node is larger (SLURM then
        # reads --ntasks-per-node as a maximum); the worker checks the MPI world has K ranks.
        params["additional_parameters"] = {**extra, "ntasks": k}
        # A task that dies (its node lost, kill -9) must end the step: without this srun waits while
        # the survivors spin in an MPI collective until the job's time limit.
        params["srun_args"] = [f"--mpi={req.mpi}", "--kill-on-bad-exit=1"]
        params["setup"] = list(req.setup) + mpi_start_retry(slurm_dir)
    return params


def mpi_start_retry(slurm_dir: Path) -> list[str]:
    """sbatch lines that start the gang's tasks again, in the same allocation, when their MPI world
    did not come up.

    MPICH under srun --mpi=pmi2 sometimes fails in MPI_Init across nodes (a malformed PMI request,
    then a UCX assertion), about one start in ten on the CI cluster; a rank that dies then ends the
    step, and the job would fail. Rank 0 touches $HPC_MTO_MPI_UP once every rank is in the world
    (worker.Worker), so a step that fails without it failed to start, and a new step (a new PMI
    name space) is tried. A failure after that is the run's own and is not repeated here.
    """
    n = MPI_START_ATTEMPTS
    return [f"# hpc-mto: start the tasks again (at most {n} times) while their MPI world does not come up;",
            f"# rank 0 creates ${MPI_UP_ENV} once every rank has joined it.",
            f"export {MPI_UP_ENV}={shlex.quote(str(slurm_dir))}/.mpi-up-$SLURM_JOB_ID",
            "srun() {",
            "  local attempt rc",
            f"  for attempt in $(seq {n}); do",
            f'    rm -f "${MPI_UP_ENV}"',
            '    command srun "$@"; rc=$?',
            f'    if [ $rc = 0 ] || [ -e "${MPI_UP_ENV}" ] || [ $attempt = {n} ]; then return $rc; fi',
            f'    echo "hpc-mto: the MPI world did not come up (srun exit $rc): starting the tasks again,'
            f' attempt $((attempt + 1)) of {n}" >&2',
            "  done",
            "}"]


def plan(cfg: Config, req: Request, run_path: Path) -> dict:
    """Executor parameters for a run, asking sinfo only where the layout must be derived."""
    needs_sinfo = not req.array and not (req.nodes or req.tasks_per_node)
    kinds = partition_nodes(req.partition) if needs_sinfo else None
    return executor_parameters(req, cfg.splits, job_name(run_path), cfg.train.threads, kinds,
                               RunDir(run_path).slurm_dir.absolute())


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
