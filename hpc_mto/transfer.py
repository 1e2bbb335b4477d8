"""Knowledge-transfer policies: one round moves selected parameter blocks between the K tasks.

- ``best``: every task's blocks are streamed to every task; task i scores each candidate on its own
  fitness set and adopts the best one if it lowers its fitness loss by more than ``min_gain``.
- ``interpolate``: like ``best``, but moves ``alpha`` of the way towards the adopted candidate.
- ``average``: the mean of the blocks of every finite task (float64 sum); everyone leaves equal.
- ``none``: no exchange (independent runs; K=1 is conventional training).

A task whose blocks or loss are not finite is never a source, and a candidate is adopted only on a
finite score. Each round returns one decision record per task for ``transfers/task-<k>.jsonl``.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .blocks import BlockLayout
from .comm import Comm
from .config import TransferConfig
from .task import Task


def finite(buf: np.ndarray) -> bool:
    return bool(np.isfinite(buf).all())


def adopt_decision(own_score: float, scores: dict[int, float], own: int, min_gain: float):
    """(source, gain) of the candidate to adopt, or (None, best gain seen). Pure, for tests.

    Adopt the candidate j != own with the lowest finite loss if it beats the own loss by more than
    ``min_gain``; a task with a non-finite own loss adopts any finite candidate.
    """
    pool = {j: s for j, s in scores.items() if j != own and s is not None and math.isfinite(s)}
    if not pool:
        return None, None
    j = min(pool, key=lambda i: (pool[i], i))
    gain = own_score - pool[j]
    return (j, gain) if gain > min_gain else (None, gain)


def _apply(task: Task, layout: BlockLayout, buf: np.ndarray, optimizer_state: str) -> None:
    if optimizer_state == "copy":
        layout.unpack(buf)
    else:
        layout.unpack(buf, model_only=True)
        if optimizer_state == "reset":
            layout.reset_optimizer_state()


def _merge_lineage(*lineages) -> list[int]:
    return sorted(set().union(*map(set, lineages)))


def run_round(task: Task, comm: Comm, cfg: TransferConfig, round_index: int,
              peer_fallback: Callable | None = None) -> dict:
    """One transfer round for this task; returns its decision record.

    ``peer_fallback(j, layout)`` supplies a late peer's blocks (file backend only).
    """
    layout = BlockLayout(task.model, task.optimizer, cfg.blocks, cfg.optimizer_state == "copy")
    own = layout.pack()
    own_finite = finite(own) and math.isfinite(task.last_loss)
    meta = {"task": task.task, "finite": own_finite, "lineage": task.lineage}
    tag = f"round-{round_index:05d}"
    fallback = (lambda j: peer_fallback(j, layout)) if peer_fallback else None
    record = {"round": round_index, "epoch": task.epoch, "policy": cfg.policy, "target": task.task}
    if cfg.policy == "average":
        return record | _average(task, comm, layout, own, meta, tag, cfg, fallback)
    return record | _best(task, comm, layout, own, meta, tag, cfg, fallback)


def _best(task, comm, layout, own, meta, tag, cfg, fallback) -> dict:
    own_score = task.fitness_loss() if meta["finite"] else math.inf
    scores: dict[int, float | None] = {}
    stale: list[int] = []
    best_buf, best_score, best_lineage = layout.empty(), math.inf, None
    for j, buf, m in comm.candidates(tag, own, meta, fallback):
        if m.get("stale"):
            stale.append(_staleness(j, m))
        if j == task.task:
            scores[j] = own_score
            continue
        if not m["finite"] or not finite(buf):
            scores[j] = None
            continue
        layout.unpack(buf, model_only=True)
        scores[j] = task.fitness_loss()
        if scores[j] < best_score:  # keep only the best candidate: memory stays constant in K
            best_buf[...] = buf
            best_score, best_lineage = scores[j], m["lineage"]
    layout.unpack(own, model_only=True)  # scoring borrowed the model: put the own weights back
    source, gain = adopt_decision(own_score, scores, task.task, cfg.min_gain)
    if source is not None:
        if cfg.policy == "interpolate" and math.isfinite(own_score):
            mixed = ((1 - cfg.alpha) * own.astype(np.float64) + cfg.alpha * best_buf).astype(np.float32)
            _apply(task, layout, mixed, cfg.optimizer_state)
            task.lineage = _merge_lineage(task.lineage, best_lineage)
        else:
            _apply(task, layout, best_buf, cfg.optimizer_state)
            task.lineage = sorted(best_lineage)
        task.adopted += 1
    return {"source": source, "accepted": source is not None, "own_score": _json_num(own_score),
            "scores": [_json_num(scores.get(j)) for j in range(comm.size)],
            "gain": _json_num(gain), "stale": stale, "lineage": task.lineage}


def _average(task, comm, layout, own, meta, tag, cfg, fallback) -> dict:
    contribution = own if meta["finite"] else np.zeros_like(own)
    total, metas = comm.allreduce_sum(tag, contribution, meta, fallback)
    sources = [m["task"] for m in metas if m["finite"]]
    if sources:
        _apply(task, layout, (total / len(sources)).astype(np.float32), cfg.optimizer_state)
        task.lineage = _merge_lineage(*(m["lineage"] for m in metas if m["finite"]))
    return {"sources": sources, "accepted": bool(sources),
            "stale": [_staleness(m["task"], m) for m in metas if m.get("stale")], "lineage": task.lineage}


def _staleness(task: int, meta: dict) -> dict:
    """A late peer replaced by its checkpoint: how many rounds behind (None: it has no checkpoint)."""
    return {"task": task, "rounds_behind": meta.get("rounds_behind")}


def _json_num(x):
    """JSON has no inf/NaN: write them as null so every reader parses the log."""
    return None if x is None or not math.isfinite(x) else float(x)
