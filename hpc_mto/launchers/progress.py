"""Live progress of a run from its metrics files: one line per task, redrawn in place on a terminal."""

from __future__ import annotations

import os
import sys
import time

from ..rundir import RunDir


def task_line(run: RunDir, task: int, epochs: int) -> str:
    rows = run.metrics(task).read()
    if not rows:
        return f"task {task}: starting"
    m = rows[-1]
    val = f"val loss {m.val_loss:.4f}  val acc {m.val_acc:.4f}" if m.val_acc is not None else "no validation set"
    return (f"task {task}: epoch {m.epochs_done}/{epochs}  train loss {m.train_loss:.4f}  {val}  "
            f"transfers accepted {m.adopted_total}")


class Progress:
    """``live``: one line per task redrawn in place (a terminal); ``plain``: a line now and then for a
    log file (stdout is not a terminal), with the slowest task's epoch and an ETA; ``off``."""

    interval = 1.0
    plain_interval = float(os.environ.get("HPC_MTO_PROGRESS_EVERY", 60))

    def __init__(self, run: RunDir, k: int, show: bool | None):
        self.run, self.k = run, k
        self.mode = "off" if show is False else "live" if show or sys.stdout.isatty() else "plain"
        self.epochs = run.config().train.epochs
        self._drawn = 0
        self._last = -float("inf")
        self._start: tuple[float, int] | None = None  # (time, epochs done) when we started watching

    def draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.mode == "plain":
            return self._plain(now)
        if self.mode == "off" or (now - self._last < self.interval and not force):
            return
        self._last = now
        lines = [task_line(self.run, t, self.epochs) for t in range(self.k)]
        out = sys.stdout
        if self._drawn:
            out.write(f"\x1b[{self._drawn}F")  # back to the first line we drew
        for line in lines:
            out.write("\x1b[2K" + line + "\n")
        out.flush()
        self._drawn = len(lines)

    def _plain(self, now: float) -> None:
        if self._start is None:
            self._start, self._last = (now, min(self.run.epochs_done(self.k))), now
            return
        if now - self._last < self.plain_interval:
            return
        self._last = now
        done = min(self.run.epochs_done(self.k))
        elapsed = now - self._start[0]
        rate = (done - self._start[1]) / elapsed  # epochs per second since we started watching
        eta = f", about {_duration((self.epochs - done) / rate)} left" if rate > 0 else ""
        sys.stdout.write(f"progress: epoch {done}/{self.epochs} (slowest task), {_duration(elapsed)} watched{eta}\n")
        sys.stdout.flush()

    def note(self, line: str) -> None:
        """Print a line (a job state change) above the live block, which is then redrawn below it."""
        out = sys.stdout
        if self._drawn:
            out.write(f"\x1b[{self._drawn}F\x1b[J")  # back to the block's first line, erase to the end
            self._drawn = 0
            self._last = -float("inf")
        out.write(line + "\n")
        out.flush()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
