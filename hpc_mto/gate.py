"""The start gate of a local launch: the task processes start before the run directory exists.

Each task process spends seconds importing torch (3.7 s per process here) and, with the first
optimizer, torch._dynamo (2 s more). A local launch starts them first and checks the config against
the data and writes the run directory meanwhile; the tasks wait at the gate, then read the run
directory. Where the check fails, nothing has been written and the gate closes: the tasks leave
without touching anything.

The gate is a directory the launcher creates (its path in ``HPC_MTO_GATE``): a file ``open`` lets the
tasks in, ``closed`` sends them away. A task also leaves when the launcher (``HPC_MTO_GATE_PID``) is
gone, so a launcher killed during its checks leaves no process waiting forever.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

GATE_ENV, LAUNCHER_ENV = "HPC_MTO_GATE", "HPC_MTO_GATE_PID"
POLL_S = 0.01


class Gate:
    """The launcher's side."""

    def __init__(self):
        self.path = Path(tempfile.mkdtemp(prefix="hpc-mto-gate-"))

    def environ(self) -> dict[str, str]:
        return {GATE_ENV: str(self.path), LAUNCHER_ENV: str(os.getpid())}

    def _say(self, word: str) -> None:
        tmp = self.path / f".{word}"
        tmp.touch()
        tmp.rename(self.path / word)  # appears whole: a task never sees half a decision

    def open(self) -> None:
        self._say("open")

    def close(self) -> None:
        self._say("closed")

    def remove(self) -> None:
        """Once every task has passed (or left): the decision is no longer read."""
        shutil.rmtree(self.path, ignore_errors=True)


def wait() -> bool:
    """A task's side: True once the gate opens (or at once, outside a gated launch); False when it
    closes or the launcher is gone."""
    where = os.environ.get(GATE_ENV)
    if not where:
        return True
    gate, launcher = Path(where), int(os.environ[LAUNCHER_ENV])
    # torch.optim imports it anyway, when the task builds its optimizer and at every step: here it
    # overlaps the launcher's checks instead of following them.
    import torch._dynamo  # noqa: F401
    while True:
        if (gate / "open").exists():
            return True
        if (gate / "closed").exists() or not gate.is_dir():
            return False
        try:
            os.kill(launcher, 0)
        except ProcessLookupError:
            return False
        time.sleep(POLL_S)
