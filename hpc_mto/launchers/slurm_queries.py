"""Asking SLURM: its client commands (sinfo, squeue, sacct, scontrol) and the parsing of what they
print. Used both by the launcher and by the code that runs inside a job, so it imports neither."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import NamedTuple

from ..errors import LaunchError


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


# srun's word on tasks that ended badly: "srun: error: n2: tasks 2-3: Killed"
SRUN_TASKS_ENDED = re.compile(r"^srun: error: (\S+): tasks? ([0-9,-]+): (.+)$", re.M)


def lost_node(srun_log: str) -> tuple[str, list[int], str] | None:
    """(node, its tasks, how the first one ended) of the node whose task brought a gang step down,
    from srun's stderr: the first task srun reports. Every task srun reports on that node is counted,
    the ones it noticed a moment later too (a lost node takes them all at once)."""
    ended = SRUN_TASKS_ENDED.findall(srun_log)
    if not ended:
        return None
    node, _, how = ended[0]
    tasks = sorted({t for n, spec, _ in ended if n == node for t in task_range(spec)})
    return node, tasks, how


def task_range(spec: str) -> list[int]:
    """srun's task list: "3", "2-3", "0,2-3"."""
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


# sacct's states of a job that has ended (a requeued job is back in squeue, pending)
FINAL_STATES = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE"}
