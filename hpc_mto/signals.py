"""Stop signals: the one place that decides which signals make a task checkpoint and stop.

A handler only raises a flag. The training loop checks it between steps and the ranks agree on it
(any rank's flag stops all), so every rank checkpoints at the same step. Acting inside the handler
would interrupt a step, an MPI call or an HDF5 write half-way.
"""

from __future__ import annotations

import signal

from .errors import ConfigError

# Exit status that tells a launcher "stopped cleanly on request, checkpoint written: requeue me".
EXIT_REQUEUE = 3


def parse_signal(name: str) -> signal.Signals:
    # CAUTION: SLURM clusters differ in which signal announces preemption, and NCCL catches USR1,
    # so the set is configurable rather than fixed.
    key = str(name).upper().removeprefix("SIG")
    try:
        return signal.Signals[f"SIG{key}"]
    except KeyError:
        raise ConfigError(f"invalid config: checkpoint.signals has unknown signal {name!r}; "
                          "valid: USR1, USR2, TERM, INT, HUP, CONT") from None


class StopFlag:
    """Set by any of the configured signals; read by the training loop."""

    def __init__(self, names=("USR2", "TERM")):
        self.received: int | None = None
        self.first = parse_signal(names[0]) if names else None
        for name in names:
            sig = parse_signal(name)
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum

    def send_to_self(self) -> None:
        import os

        os.kill(os.getpid(), self.first)

    @property
    def is_set(self) -> bool:
        return self.received is not None
