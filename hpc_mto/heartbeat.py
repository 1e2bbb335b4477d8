"""A watchdog for peers that die without MPI noticing.

When a node is lost or a rank is frozen, the other ranks of the MPI world wait in a collective
forever (or until the job's time limit): MPI has no timeout. Each task therefore keeps a heartbeat
file, ``RUN_DIR/heartbeat/task-<t>``, with a counter a thread advances every few seconds, even while
the main thread is blocked in MPI. A peer whose counter has not moved for ``timeout`` seconds (measured
on this task's own clock, so clock skew between nodes does not matter) is taken as lost: this task
says which one and exits, which ends the whole job (mpiexec, or srun --kill-on-bad-exit), so that it
can be resumed instead of holding its nodes until the time limit.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from .atomic import write_text

logger = logging.getLogger(__name__)

DONE = "done"  # a task that has left the run normally: no longer watched
EXIT_PEER_LOST = 5


class Heartbeat:
    def __init__(self, directory: Path, task: int, k: int, timeout: float, incarnation: str):
        self.dir, self.task, self.k, self.timeout = Path(directory), task, k, timeout
        # Files left by an earlier launch of this run carry another incarnation: they say nothing.
        self.incarnation = incarnation
        self.interval = max(0.5, min(5.0, timeout / 4))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hpc-mto-heartbeat", daemon=True)

    def _path(self, task: int) -> Path:
        return self.dir / f"task-{task}"

    def start(self) -> "Heartbeat":
        self.dir.mkdir(parents=True, exist_ok=True)
        self._beat(0)
        self._thread.start()
        return self

    def stop(self) -> None:
        """This task leaves the run normally: peers stop watching it."""
        self._stop.set()
        self._thread.join()
        write_text(self._path(self.task), f"{self.incarnation} {DONE}")

    def _beat(self, count: int) -> None:
        write_text(self._path(self.task), f"{self.incarnation} {count}")

    def _read(self, task: int) -> str | None:
        try:
            incarnation, _, value = self._path(task).read_text().partition(" ")
        except OSError:
            return None
        return value if incarnation == self.incarnation else None

    def _run(self) -> None:
        watch = PeerWatch(self.k, self.task, self.timeout, self.interval, time.monotonic())
        count = 0
        while not self._stop.wait(self.interval):
            count += 1
            self._beat(count)
            lost = watch.check(time.monotonic(), {t: self._read(t) for t in range(self.k) if t != self.task})
            if lost is not None:
                logger.error(f"task {lost} stopped responding (no heartbeat for {self.timeout:.0f}s; its node "
                             f"lost or the process frozen): ending the job; resume it with hpc-mto resume")
                logging.shutdown()
                os._exit(EXIT_PEER_LOST)


class PeerWatch:
    """When each peer's heartbeat last changed, on this task's clock; which peer, if any, is lost."""

    def __init__(self, k: int, task: int, timeout: float, interval: float, now: float):
        self.timeout, self.interval = timeout, interval
        self.last_value: dict[int, str | None] = {}
        self.last_change = {t: now for t in range(k) if t != task}
        self.last_check = now

    def check(self, now: float, values: dict[int, str | None]) -> int | None:
        # This task itself did not run for a while (the whole job suspended with SIGSTOP, as
        # `scontrol suspend` and PreemptMode=SUSPEND do, or the host stalled): its peers could not beat
        # either, so silence during that gap says nothing. Count from now on.
        if now - self.last_check > max(2 * self.interval, self.timeout / 2):
            self.last_change = dict.fromkeys(self.last_change, now)
        self.last_check = now
        for peer, value in values.items():
            if value == DONE:
                self.last_change[peer] = now
            elif value != self.last_value.get(peer):
                self.last_value[peer], self.last_change[peer] = value, now
            elif now - self.last_change[peer] > self.timeout:
                return peer
        return None
