"""Fault injection for tests and drills, through the real code paths.

``HPC_MTO_INJECT="KIND@POINT:TASK:INDEX,..."`` fires a fault when task TASK reaches INDEX at POINT:
- POINT ``step`` (global step, after that step), ``transfer`` (round index, as the round starts),
  ``checkpoint`` (global step, as the checkpoint is written), ``start`` (before MPI starts; the index
  is the SLURM step of the job, 0 outside SLURM: ``kill@start:1:0`` is a rank dying in the first
  start of its MPI world, as MPI_Init failures do);
- KIND ``signal`` sends the task its first checkpoint signal (the real handler runs), ``crash`` raises,
  ``freeze`` stops the process (SIGSTOP: alive but silent, like a rank on a lost node), ``kill``
  kills it outright (SIGKILL: no handler, no cleanup, like the OOM killer or a node's power),
  ``hold`` pauses the task there: it creates ``held-<task>`` in the directory named by
  ``HPC_MTO_HOLD_DIR`` and waits until ``release`` appears in it (at most 10 minutes). A drill can then
  act on a job that is certainly still running, at a known point, however fast the machine.

A fault lands at an exact, reproducible point instead of wherever a timer happens to fire.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

ENV = "HPC_MTO_INJECT"
HOLD_DIR_ENV = "HPC_MTO_HOLD_DIR"
HOLD_LIMIT_S = 600


class InjectedCrash(RuntimeError):
    pass


def rank_from_env(task: int | None) -> int:
    """The task before MPI has said which rank it is: the launcher's rank variable (srun, mpiexec)."""
    if task is not None:
        return task
    return int(os.environ.get("SLURM_PROCID", os.environ.get("PMI_RANK", 0)))


def attempt_from_env() -> int:
    return int(os.environ.get("SLURM_STEP_ID", 0))


def _parse(spec: str) -> list[tuple[str, str, int, int]]:
    out = []
    for item in filter(None, spec.split(",")):
        kind, _, where = item.partition("@")
        point, task, index = where.split(":")
        out.append((kind, point, int(task), int(index)))
    return out


class Faults:
    def __init__(self, task: int, send_signal, environ=None):
        environ = environ or os.environ
        self.task, self.send_signal = task, send_signal
        self.planned = [f for f in _parse(environ.get(ENV, "")) if f[2] == task]
        self.hold_dir = Path(environ[HOLD_DIR_ENV]) if HOLD_DIR_ENV in environ else None

    def hold(self) -> None:
        if self.hold_dir is None:
            raise InjectedCrash(f"a hold fault needs {HOLD_DIR_ENV}")
        (self.hold_dir / f"held-{self.task}").touch()
        deadline = time.monotonic() + HOLD_LIMIT_S
        while not (self.hold_dir / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.1)

    def fire(self, point: str, index: int) -> None:
        for kind, p, _, i in self.planned:
            if p == point and i == index:
                if kind == "signal":
                    self.send_signal()
                elif kind in ("freeze", "kill"):
                    os.kill(os.getpid(), signal.SIGSTOP if kind == "freeze" else signal.SIGKILL)
                elif kind == "hold":
                    self.hold()
                else:
                    raise InjectedCrash(f"injected crash at {point} {index}")
