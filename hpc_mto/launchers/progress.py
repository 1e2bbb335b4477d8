"""Live progress of a run from its metrics files: one line per task, redrawn in place on a terminal."""

from __future__ import annotations

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
    interval = 1.0

    def __init__(self, run: RunDir, k: int, enabled: bool):
        self.run, self.k, self.enabled = run, k, enabled
        self.epochs = run.config().train.epochs
        self._drawn = 0
        self._last = -float("inf")

    def draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._last < self.interval and not force):
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

    def note(self, line: str) -> None:
        """Print a line (a job state change) above the live block, which is then redrawn below it."""
        out = sys.stdout
        if self._drawn:
            out.write(f"\x1b[{self._drawn}F\x1b[J")  # back to the block's first line, erase to the end
            self._drawn = 0
            self._last = -float("inf")
        out.write(line + "\n")
        out.flush()
