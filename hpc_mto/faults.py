"""Fault injection for tests and drills, through the real code paths.

``HPC_MTO_INJECT="KIND@POINT:TASK:INDEX,..."`` fires a fault when task TASK reaches INDEX at POINT:
- POINT ``step`` (global step, after that step), ``transfer`` (round index, as the round starts),
  ``checkpoint`` (global step, as the checkpoint is written);
- KIND ``signal`` sends the task its first checkpoint signal (the real handler runs), ``crash`` raises.

A fault lands at an exact, reproducible point instead of wherever a timer happens to fire.
"""

from __future__ import annotations

import os

ENV = "HPC_MTO_INJECT"


class InjectedCrash(RuntimeError):
    pass


def _parse(spec: str) -> list[tuple[str, str, int, int]]:
    out = []
    for item in filter(None, spec.split(",")):
        kind, _, where = item.partition("@")
        point, task, index = where.split(":")
        out.append((kind, point, int(task), int(index)))
    return out


class Faults:
    def __init__(self, task: int, send_signal, environ=None):
        self.task, self.send_signal = task, send_signal
        self.planned = [f for f in _parse((environ or os.environ).get(ENV, "")) if f[2] == task]

    def fire(self, point: str, index: int) -> None:
        for kind, p, _, i in self.planned:
            if p == point and i == index:
                if kind == "signal":
                    self.send_signal()
                else:
                    raise InjectedCrash(f"injected crash at {point} {index}")
