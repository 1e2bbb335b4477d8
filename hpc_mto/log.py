"""Logging: one format for every process of a run (time, then which task speaks), one knob for how
much is said (``hpc-mto --log-level``, passed to the task processes as ``HPC_MTO_LOG_LEVEL``).

Errors the user must act on are not logs: the CLI prints them as one ``hpc-mto: error: ...`` line.
"""

from __future__ import annotations

import logging
import os
import sys

ENV = "HPC_MTO_LOG_LEVEL"
LEVELS = ("debug", "info", "warning", "error")
_handler: logging.Handler | None = None


def setup(task: int | None = None, level: str | None = None) -> None:
    """Send the ``hpc_mto`` loggers to stderr as ``<time> <task k | hpc-mto>: <message>``.

    Called again once a task process knows its index (an MPI rank learns it after start-up).
    """
    global _handler
    level = (level or os.environ.get(ENV) or "info").upper()
    who = "hpc-mto" if task is None else f"task {task}"
    root = logging.getLogger("hpc_mto")
    if _handler is None:
        _handler = logging.StreamHandler(sys.stderr)
        root.addHandler(_handler)
        root.propagate = False
    _handler.setFormatter(logging.Formatter(f"%(asctime)s {who}: %(message)s", "%Y-%m-%d %H:%M:%S"))
    root.setLevel(level)
