"""Knowledge transfer between the K tasks: what moves, when, and what each task accepts.

- ``best``: every task's blocks are streamed to every task; task i compares each candidate with its
  own model and adopts the one with the largest gain in fitness loss, if above ``min_gain``.
- ``interpolate``: like ``best``, but moves ``alpha`` of the way towards the adopted candidate.
- ``average``: the mean of the blocks of every finite task (a float32 sum in task order) replaces
  each task's at a round, or, with ``average_steps``, pulls it gradually every N steps (PAPA):
  w <- (1 - rate) * w + rate * mean (then from a float64 sum).
- ``distill``: knowledge as predictions. At a round each task runs its peers' networks over its own
  training samples and keeps their mean logits; until the next round it trains on
  (1 - alpha) * CE + alpha * T^2 * KL(teacher || own). No weights are adopted: lineages stay apart.
- ``none``: no exchange (independent runs; K=1 is conventional training).

What a comparison is judged on (``fitness``): ``unseen`` compares two models only on samples that
neither has trained on, counting every task in each model's history (the intersection of the
validation sets of all those tasks), and makes no comparison on fewer than ``min_samples``; ``val``
(the task's own validation set, most of which its peers trained on) and ``train`` (a probe of its
training set) are the older, biased rules. With ``adopt_quantile`` < 1 only the worst tasks may
adopt (PBT's truncation), and ``keep_lineages`` bounds how far a round may shrink the population's
diversity: adoptions are taken in order of gain while at least that fraction of the K lineages
(distinct initialisations) remains, so one lucky task cannot take over every other.

With ``candidates`` m (unset: every peer) a task scores only m peers per round, drawn from (seed,
round, task) alone (``scored_peers``), so every task knows who scores whom without asking, and a
round's traffic and scoring per task stay flat in K; ``best``, ``interpolate`` and ``distill`` use it.

A task whose blocks or loss are not finite is never a source, and a candidate is adopted only on a
finite score. Each round returns one decision record per task for ``transfers/task-<t>.jsonl``.
The metadata a task sends with its blocks is defined here, and so is what stands in for a late
peer's blocks on the file exchange (``CheckpointFallback``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from . import checkpoint
from .blocks import BlockLayout
from .comm import Comm
from .config import TransferConfig
from .records import StalePeer, TransferDecision, finite_or_none
from .samples import Samples
from .state import MODEL, OPT
from .task import Task, evaluate, model_logits

ROUND_TAG, PULL_TAG = "round-", "average-"


def finite(buf: np.ndarray) -> bool:
    return bool(np.isfinite(buf).all())


def choose_source(gains: dict[int, tuple[float, float]], min_gain: float) -> tuple[int | None, float | None]:
    """(source, gain) of the candidate to adopt, or (None, best gain seen). Pure, for tests.

    ``gains[j]`` is (own loss - candidate loss, candidate loss) on the samples they were compared on,
    finite candidates only. The largest gain wins (ties: the lower loss, then the lower index); it is
    adopted when above ``min_gain``. A task whose own loss is not finite adopts any finite candidate.
    """
    if not gains:
        return None, None
    j = leading(gains)
    gain = gains[j][0]
    return (j, gain) if gain > min_gain else (None, gain)


def leading(gains: dict[int, tuple[float, float]]) -> int:
    """The candidate ranked first: the largest gain, then the lower loss, then the lower index."""
    return max(gains, key=lambda i: (gains[i][0], -gains[i][1], -i))


def scored_peers(seed: int, round_index: int, task: int, k: int, m: int | None) -> list[int]:
    """The peers task ``task`` scores in round ``round_index`` (``transfer.candidates`` m; None: every
    peer), in task order. A pure function of its arguments: every task computes every task's draw,
    a resumed run draws what the uninterrupted one drew, and MPI and files agree."""
    others = [j for j in range(k) if j != task]
    if m is None or m >= len(others):
        return others
    rng = np.random.default_rng(np.random.SeedSequence([seed, round_index, task, 0xCA7D]))
    return sorted(int(j) for j in rng.choice(others, m, replace=False))


def pairing(seed: int, round_index: int, k: int, m: int | None) -> list[list[int]] | None:
    """Who scores whom in a round (``pairing[i]``: task i's peers), or None: everyone scores everyone."""
    if m is None:
        return None
    return [scored_peers(seed, round_index, t, k, m) for t in range(k)]


def _merge_lineage(*lineages) -> list[int]:
    return sorted(set().union(*map(set, lineages)))


def keep_lineages(proposals: list[tuple[int, int, float]], lineages: dict[int, list[int]], keep: int,
                  merged) -> set[int]:
    """The tasks whose proposed adoption (task, source, gain) goes ahead: in order of gain (ties:
    lower task), each one that leaves at least ``keep`` distinct lineages (or no fewer than there
    are). ``merged(own, source)`` is a task's lineage after adopting. Pure: every task computes the
    same answer from the same proposals."""
    current = {t: tuple(v) for t, v in lineages.items()}
    accepted = set()
    for task, source, _ in sorted(proposals, key=lambda p: (-p[2], p[0])):
        trial = {**current, task: tuple(merged(lineages[task], lineages[source]))}
        if len(set(trial.values())) >= min(keep, len(set(current.values()))):
            current, accepted = trial, accepted | {task}
    return accepted


def layout_of(task: Task, cfg: TransferConfig) -> BlockLayout:
    """The blocks that travel in a round: every task derives the same layout on its own."""
    return BlockLayout(task.model, task.optimizer, cfg.blocks, cfg.optimizer_state == "copy")


def round_tag(round_index: int) -> str:
    return f"{ROUND_TAG}{round_index:05d}"


def pull_tag(global_step: int) -> str:
    """The exchange of a gradual-averaging pull after ``global_step``."""
    return f"{PULL_TAG}{global_step:09d}"


# -- what a comparison is judged on -------------------------------------------------------------
class FixedJudge:
    """``fitness`` val or train: every comparison on the task's fitness set."""

    minimum = 1

    def __init__(self, samples: Samples):
        self._samples = samples

    def samples_for(self, own_history: list[int], candidate_history: list[int]) -> Samples:
        return self._samples


class UnseenJudge:
    """``fitness`` unseen: samples neither model has trained on. A model's history is every task whose
    training set shaped its weights; the samples outside all of those training sets are those in
    every one of those tasks' validation sets."""

    def __init__(self, samples_at: Callable[[np.ndarray], Samples], val_sets: list[np.ndarray], minimum: int):
        self.samples_at, self.val_sets, self.minimum = samples_at, val_sets, minimum

    def samples_for(self, own_history: list[int], candidate_history: list[int]) -> Samples:
        return self._samples(frozenset(own_history) | frozenset(candidate_history))

    @functools.lru_cache(maxsize=64)
    def _samples(self, tasks: frozenset) -> Samples:
        ids = functools.reduce(np.intersect1d, (self.val_sets[t] for t in sorted(tasks)))
        return self.samples_at(ids)


class Exchange:
    """One task's side of every transfer: the rounds between epochs and, for gradual averaging, the
    pull after training steps. Built once per task process."""

    def __init__(self, task: Task, comm: Comm, cfg: TransferConfig, judge: FixedJudge | UnseenJudge):
        self.task, self.comm, self.cfg, self.judge = task, comm, cfg, judge

    @property
    def gradual(self) -> bool:
        return self.cfg.policy == "average" and self.cfg.average_steps > 0

    def round_due(self) -> bool:
        """Whether a round follows the epoch the task just closed."""
        epoch, cfg = self.task.epoch, self.cfg
        return (cfg.policy != "none" and not self.gradual and not self.task.done and epoch >= max(cfg.start, 1)
                and epoch % cfg.interval == 0)

    def round_index(self) -> int:
        return self.task.epoch // self.cfg.interval

    def release_round(self, round_index: int) -> None:
        """Every peer is done with that round: drop its exchanges (blocks, fitness, proposals)."""
        for suffix in ("", "-fitness", "-proposals"):
            self.comm.release(round_tag(round_index) + suffix)

    def run_round(self) -> TransferDecision:
        """One transfer round for this task; returns its decision record."""
        task, cfg = self.task, self.cfg
        round_index = self.round_index()
        head = {"round": round_index, "epoch": task.epoch, "policy": cfg.policy, "target": task.index}
        tag = round_tag(round_index)
        if cfg.policy == "distill":
            return TransferDecision(**head, **self._distill(tag))
        layout = layout_of(task, cfg)
        own = layout.pack(self.comm.send_buffer(layout.size))  # packed where the exchange sends from
        meta = {"task": task.index, "finite": finite(own) and math.isfinite(task.last_loss),
                "lineage": task.lineage, "trained_on": task.trained_on}
        if cfg.policy == "average":
            return TransferDecision(**head, **self._average(layout, own, meta, tag, cfg.average_rate,
                                                            cfg.optimizer_state))
        return TransferDecision(**head, **self._best(layout, own, meta, tag))

    def after_step(self) -> None:
        """Gradual averaging: every ``average_steps`` steps (the same global steps on every task)."""
        task = self.task
        if not self.gradual or task.global_step % self.cfg.average_steps or task.epoch < self.cfg.start:
            return
        layout = BlockLayout(task.model, None, self.cfg.blocks, with_optimizer_state=False)
        own = layout.pack(self.comm.send_buffer(layout.size))
        meta = {"task": task.index, "finite": finite(own) and math.isfinite(task.last_loss),
                "lineage": task.lineage, "trained_on": task.trained_on}
        # Weights only, optimizer state untouched: the pull is small and frequent (PAPA).
        self._average(layout, own, meta, pull_tag(task.global_step), self.cfg.average_rate, "keep")
        # Gradual averaging exchanges every few steps: keep only the newest exchanges' files.
        self.comm.release(pull_tag(task.global_step - 2 * self.cfg.average_steps))

    # -- policies ------------------------------------------------------------------------------
    def _best(self, layout: BlockLayout, own: np.ndarray, meta: dict, tag: str) -> dict:
        task, cfg, judge = self.task, self.cfg, self.judge
        bs = task.cfg.train.eval_batch_size
        own_samples = judge.samples_for(task.trained_on, task.trained_on)
        own_score = evaluate(task.model, own_samples, bs)[0] if meta["finite"] else math.inf
        eligible = self._may_adopt(own_score)
        k = self.comm.size
        scores: list[float | None] = [None] * k
        own_scores: list[float | None] = [None] * k
        counts = [0] * k
        gains: dict[int, tuple[float, float]] = {}
        stale: list[StalePeer] = []
        lineages: dict[int, list[int]] = {}
        # Where the backend can send the chosen candidate again (MPI), nothing is kept while the
        # others are scored: the round holds two block-sized buffers (own, received), not three.
        refetch = self.comm.refetches
        best_buf, best_meta = (None if refetch else layout.empty()), None
        pairs = self._pairing()
        for j, buf, m in self.comm.candidates(tag, own, meta, pairs):
            lineages[j] = m["lineage"]
            if m.get("stale"):
                stale.append(_staleness(j, m))
            if j == task.index:
                scores[j], own_scores[j], counts[j] = own_score, own_score, len(own_samples)
                continue
            samples = judge.samples_for(task.trained_on, m["trained_on"])
            counts[j] = len(samples)
            if not m["finite"] or not finite(buf) or len(samples) < judge.minimum:
                continue
            # Both models on the same samples: the own first (the model holds it), then the candidate.
            own_scores[j] = evaluate(task.model, samples, bs)[0] if meta["finite"] else math.inf
            layout.unpack(buf, model_only=True)
            scores[j] = evaluate(task.model, samples, bs)[0]
            layout.unpack(own, model_only=True)
            if not math.isfinite(scores[j]):
                continue
            gains[j] = (own_scores[j] - scores[j], scores[j])
            if not refetch and leading(gains) == j:
                best_buf[...] = buf  # keep only the leading candidate: memory stays constant in K
                best_meta = m
        proposed, gain = choose_source(gains, cfg.min_gain)
        veto = "adopt_quantile" if proposed is not None and not eligible else None
        if not self._keeps_lineages(proposed if veto is None else None, gain, lineages):
            veto = "keep_lineages"
        source = proposed if veto is None else None
        if refetch:  # every task takes part: its own blocks go to the tasks that adopt them
            fetched = self.comm.fetch(tag, source)
            if source is not None:
                best_buf, best_meta = fetched
        if source is not None:
            self._adopt(layout, own, best_buf, best_meta, own_scores[source])
        return {"source": source, "accepted": source is not None, "own_score": finite_or_none(own_score),
                "scores": [finite_or_none(s) for s in scores], "own_scores": [finite_or_none(s) for s in own_scores],
                "samples": counts, "eligible": eligible, "proposed": proposed, "veto": veto,
                "gain": finite_or_none(gain), "stale": stale, "lineage": task.lineage,
                "peers": None if pairs is None else pairs[task.index]}

    def _pairing(self) -> list[list[int]] | None:
        return pairing(self.task.cfg.seed, self.round_index(), self.comm.size, self.cfg.candidates)

    def _keeps_lineages(self, source: int | None, gain: float | None, lineages: dict[int, list[int]]) -> bool:
        """Whether this task's adoption of ``source`` (None: it proposes none) goes ahead under
        ``keep_lineages``. Every task calls it, proposing or not: the proposals are gathered."""
        if self.cfg.keep_lineages <= 0:
            return True
        proposal = None if source is None else [self.task.index, source, gain]
        if self.cfg.candidates is None:
            proposals = self.comm.allgather(round_tag(self.round_index()) + "-proposals", proposal)
        else:
            # Each task saw only its m peers' lineages, and the rule must give every task the same
            # answer: the proposals carry each task's lineage (as it was before this round).
            gathered = self.comm.allgather(round_tag(self.round_index()) + "-proposals",
                                           [proposal, self.task.lineage])
            proposals = [g and g[0] for g in gathered]
            lineages = {**lineages, **{t: g[1] for t, g in enumerate(gathered) if g}}
        keep = math.ceil(self.cfg.keep_lineages * self.comm.size)
        merged = (lambda own, src: _merge_lineage(own, src)) if self.cfg.policy == "interpolate" else \
            (lambda own, src: sorted(src))
        return source is None or self.task.index in keep_lineages([tuple(p) for p in proposals if p], lineages,
                                                                  keep, merged)

    def _may_adopt(self, own_score: float) -> bool:
        """PBT's truncation: only the worst ``adopt_quantile`` of the tasks by their own fitness loss."""
        if self.cfg.adopt_quantile >= 1:
            return True
        losses = self.comm.allgather(round_tag(self.round_index()) + "-fitness", finite_or_none(own_score))
        worst_first = sorted(range(len(losses)), key=lambda t: (-(math.inf if losses[t] is None else losses[t]), t))
        allowed = worst_first[:max(1, math.ceil(self.cfg.adopt_quantile * len(losses)))]
        return self.task.index in allowed

    def _adopt(self, layout: BlockLayout, own: np.ndarray, buf: np.ndarray, source: dict, own_score: float) -> None:
        task, cfg = self.task, self.cfg
        if cfg.policy == "interpolate" and math.isfinite(own_score):
            buf = ((1 - cfg.alpha) * own.astype(np.float64) + cfg.alpha * buf).astype(np.float32)
            task.lineage = _merge_lineage(task.lineage, source["lineage"])
        else:
            task.lineage = sorted(source["lineage"])
        task.trained_on = _merge_lineage(task.trained_on, source["trained_on"])
        _apply(layout, buf, cfg.optimizer_state)
        task.adopted += 1
        task.lr_factor *= cfg.adopt_lr_factor

    def _average(self, layout: BlockLayout, own: np.ndarray, meta: dict, tag: str, rate: float,
                 optimizer_state: str) -> dict:
        task = self.task
        contribution = own if meta["finite"] else np.zeros_like(own)
        count = lambda metas: sum(1 for m in metas if m["finite"])
        if rate == 1:  # the mean replaces the blocks: the backend may finish it where it sums
            mixed, metas = self.comm.allreduce_mean(tag, contribution, meta, count)
        else:
            total, metas = self.comm.allreduce_sum(tag, contribution, meta)
            if count(metas):
                mixed = ((1 - rate) * own.astype(np.float64) + rate * (total / count(metas))).astype(np.float32)
        finite_metas = [m for m in metas if m["finite"]]
        if finite_metas:
            _apply(layout, mixed, optimizer_state)
            task.lineage = _merge_lineage(*(m["lineage"] for m in finite_metas))
            task.trained_on = _merge_lineage(*(m["trained_on"] for m in finite_metas))
        return {"sources": [m["task"] for m in finite_metas], "accepted": bool(finite_metas),
                "stale": [_staleness(m["task"], m) for m in metas if m.get("stale")], "lineage": task.lineage}

    def _distill(self, tag: str) -> dict:
        """The peers' mean logits on this task's training samples become its soft targets."""
        task = self.task
        layout = BlockLayout(task.model, None, ["*"], with_optimizer_state=False)
        own = layout.pack(self.comm.send_buffer(layout.size))
        meta = {"task": task.index, "finite": finite(own) and math.isfinite(task.last_loss)}
        total, used, stale = None, [], []
        pairs = self._pairing()
        for j, buf, m in self.comm.candidates(tag, own, meta, pairs):
            if m.get("stale"):
                stale.append(_staleness(j, m))
            if j == task.index or not m["finite"] or not finite(buf):
                continue
            layout.unpack(buf)
            logits = model_logits(task.model, task.train, task.cfg.train.eval_batch_size).double()
            if not bool(torch.isfinite(logits).all()):
                continue
            total = logits if total is None else total + logits
            used.append(j)
        layout.unpack(own)
        if used:
            task.teacher = (total / len(used)).float()
        return {"sources": used, "accepted": bool(used), "stale": stale, "lineage": task.lineage,
                "peers": None if pairs is None else pairs[task.index]}


def _apply(layout: BlockLayout, buf: np.ndarray, optimizer_state: str) -> None:
    if optimizer_state == "copy" and layout.with_optimizer_state:
        layout.unpack(buf)
    else:
        layout.unpack(buf, model_only=True)
        if optimizer_state == "reset":
            layout.reset_optimizer_state()


def _staleness(task: int, meta: dict) -> StalePeer:
    return StalePeer(task, meta.get("rounds_behind"))


class CheckpointFallback:
    """What stands in for a late peer's blocks in a round (or a gradual pull) on the file exchange:
    the blocks of its newest intact checkpoint, packed in that exchange's layout (zeros, marked not
    finite, when it has none). Nothing stands in for the final selection's exchanges: a peer missing
    there is missing.

    Built with the communicator, before the task exists; ``bind`` gives it the task.
    """

    def __init__(self, checkpoints: Path, cfg: TransferConfig):
        self.checkpoints, self.cfg = checkpoints, cfg
        self.task: Task | None = None

    def bind(self, task: Task) -> None:
        self.task = task

    def covers(self, tag: str) -> bool:
        return tag.startswith((ROUND_TAG, PULL_TAG)) and self.task is not None

    def ahead(self, peer: int, tag: str) -> bool:
        steps = checkpoint.steps(self.checkpoints, peer)
        return bool(steps) and steps[-1] > self.task.global_step

    def __call__(self, peer: int, tag: str) -> tuple[np.ndarray, dict]:
        if self.cfg.policy == "distill":
            layout = BlockLayout(self.task.model, None, ["*"], with_optimizer_state=False)
        elif tag.startswith(PULL_TAG):
            layout = BlockLayout(self.task.model, None, self.cfg.blocks, with_optimizer_state=False)
        else:
            layout = layout_of(self.task, self.cfg)
        # Never blocks from the peer's future: a task that is behind gets what its peer had at this
        # point, or nothing (its newer checkpoints pruned that far back).
        step = checkpoint.newest_intact(self.checkpoints, peer, at_most=self.task.global_step)
        if step is None:
            return np.zeros(layout.size, np.float32), {"task": peer, "finite": False, "lineage": [peer],
                                                       "trained_on": [peer], "missing": True}
        state = checkpoint.load(checkpoint.path_for(self.checkpoints, peer, step), kinds=(MODEL, OPT))
        buf = layout.from_entries(state.arrays)
        counters = state.meta["counters"]
        behind = (self.task.epoch - int(counters["epoch"])) // self.cfg.interval
        return buf, {"task": peer, "finite": finite(buf), "lineage": counters["lineage"],
                     "trained_on": counters["trained_on"], "rounds_behind": behind}
