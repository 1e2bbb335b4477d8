"""The end of a run: every candidate scored, the outputs built, one chosen, its accuracy estimated.

Candidates are each task's final weights, its best-on-own-validation snapshot (when it has a
validation set) and its SWA average (``train.swa_epochs``). Each is streamed to every task and
scored on that task's validation set: the K-column cross-validation matrix of the paper, whose row
mean picks a candidate under ``selection.rule=cv_mean``. Transfers and overlapping splits put most
of every validation set into the candidates' training data, so that mean is optimistic; it is
recorded as such.

The selection holdout, touched by no task, is cut in two halves. The *selection* half chooses:
the single candidate under ``selection.rule=holdout``, and between the outputs:

- ``single``: the candidate of the run's rule;
- ``ensemble``: the mean logits of every task's member snapshot (``selection.member``);
- ``soup``: a greedy soup of the members (shared initialisation only): members in order of their
  selection-half accuracy, each kept when the soup's accuracy there does not drop;
- ``student`` (``selection.distill_output``): one network trained on the pool (every sample outside
  the holdout) to match the ensemble's soft targets, by task 0 after the others are done.

The *estimation* half only measures: the chosen output's accuracy there is the run's estimate,
unbiased because nothing was chosen on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .blocks import BlockLayout
from .comm import Comm
from .config import Config
from .records import Candidate, Choice, OutputScores, Result, Selected, finite_or_none
from .samples import Samples
from .task import Task, evaluate, is_finite_model, recompute_batchnorm, snapshot

KINDS = ("final", "best", "swa")
# Ties between outputs on the selection half go to the simplest one to deploy.
OUTPUT_ORDER = ("single", "soup", "student", "ensemble")
ECE_BINS = 15


@dataclass
class EvalSets:
    """The data every task scores on at the end, each on the task's device."""

    select: Samples  # the holdout's selection half
    estimate: Samples  # the holdout's estimation half
    test: Samples
    pool: Samples  # every sample outside the holdout: for the soup's BatchNorm and the student

    def named(self) -> dict[str, Samples]:
        return {"select": self.select, "estimate": self.estimate, "test": self.test}


@dataclass
class Scored:
    """What the collective part leaves: this task's ensemble member, and on task 0 everything
    ``conclude`` needs."""

    member: dict[str, torch.Tensor]
    candidates: list[Candidate]
    cv_acc: list[list[float]]
    cv_loss: list[list[float | None]]
    rule: str
    choices: dict[str, int]
    selected: int  # the candidate of the run's rule
    outputs: dict[str, OutputScores]
    networks: dict[str, tuple[dict[str, torch.Tensor], str]]  # task 0: output kind -> (state, what it is)
    pool_teacher: torch.Tensor | None
    lineages_left: int
    disagreement: float | None


@dataclass
class Concluded:
    """Task 0's verdict: the result, and the network model.safetensors holds with what it is."""

    result: Result
    network: dict[str, torch.Tensor]
    network_id: str


def candidate_id(task: int, kind: str) -> str:
    return f"task-{task}/{kind}"


def candidate_kinds(cfg: Config) -> list[str]:
    """The kinds every task offers (the same on every task: they follow from the config)."""
    return [k for k in KINDS if k == "final" or (k == "best" and cfg.data.val_fraction > 0)
            or (k == "swa" and cfg.train.swa_epochs > 0)]


def member_kind(cfg: Config) -> str:
    if cfg.selection.member != "auto":
        return cfg.selection.member
    return "swa" if cfg.train.swa_epochs > 0 else "best" if cfg.data.val_fraction > 0 else "final"


def choose(scores) -> int:
    """Index of the highest score; the first one on ties (deterministic)."""
    return int(np.argmax(np.asarray(scores, dtype=float)))


def scores_of(logits: np.ndarray, y: np.ndarray) -> dict:
    """Accuracy, log-loss and calibration error of logits against labels (None for no samples)."""
    if len(y) == 0:
        return {"acc": None, "loss": None, "ece": None}
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    pred = log_p.argmax(1)
    loss = -log_p[np.arange(len(y)), y].mean()
    return {"acc": float((pred == y).mean()), "loss": finite_or_none(loss),
            "ece": calibration_error(np.exp(log_p), y)}


def calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float | None:
    """Expected calibration error: |accuracy - confidence| per confidence bin, weighted by its share."""
    if not np.isfinite(probs).all():
        return None
    confidence, correct = probs.max(1), probs.argmax(1) == y
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def run(task: Task, comm: Comm, sets: EvalSets) -> Scored:
    """Score every candidate and build the outputs. Collective: every task calls it."""
    cfg, model = task.cfg, task.model
    live = snapshot(model)  # the task's final weights, given back at the end
    layout = BlockLayout(model, None, ["*"], with_optimizer_state=False)
    kinds, member = candidate_kinds(cfg), member_kind(cfg)
    weights = _own_networks(task, layout, kinds)
    mine, logits = {}, {}
    for kind in kinds:
        layout.unpack(weights[kind])
        logits[kind] = {name: _logits(model, data, cfg) for name, data in sets.named().items()}
        scored = {name: scores_of(z, data.y.cpu().numpy()) for (name, data), z in
                  zip(sets.named().items(), logits[kind].values())}
        mine[kind] = {"finite": is_finite_model(model), "select_acc": scored["select"]["acc"],
                      "estimate_acc": scored["estimate"]["acc"], "estimate_loss": scored["estimate"]["loss"],
                      "test_acc": scored["test"]["acc"], "test_loss": scored["test"]["loss"],
                      "test_ece": scored["test"]["ece"],
                      "lineage": task.best_lineage if kind == "best" else task.lineage}
    column = _cv_column(task, comm, layout, weights, kinds)
    columns = comm.allgather("final-columns", column)
    per_task = comm.allgather("final-own", mine)
    k = comm.size
    candidates, cv_acc, cv_loss = _candidates(per_task, columns, kinds, k)

    usable = [c.finite for c in candidates]
    choices = {}
    if cv_acc:
        choices["cv_mean"] = choose(np.where(usable, np.mean(cv_acc, axis=1), -np.inf))
    if len(sets.select):
        choices["holdout"] = choose([c.select_acc if ok else -np.inf for c, ok in zip(candidates, usable)])
    # With neither validation sets nor a holdout nothing can choose: the first finite candidate.
    rule = cfg.selection.rule if cfg.selection.rule in choices else next(iter(choices), None)
    selected = choices[rule] if rule else choose(usable)
    chosen = candidates[selected]

    own_member = layout.empty()
    own_member[...] = weights[member]
    member_finite = mine[member]["finite"]
    outputs = {"single": _candidate_output(chosen)}
    if k > 1:
        outputs["ensemble"], pool_teacher = _ensemble(comm, logits[member], member_finite, sets, task, layout,
                                                      own_member, member, k)
        disagreement = _disagreement(comm, logits[member]["test"])
    else:
        pool_teacher, disagreement = None, None
    soup = None
    if k > 1 and cfg.model.shared_init and len(sets.select):
        soup_scores, soup = _soup(comm, task, layout, own_member, member_finite, per_task, member, sets)
        if soup is not None:
            outputs["soup"] = soup_scores

    # The single choice's weights travel to task 0, which writes model.safetensors.
    single = layout.empty()
    single[...] = weights[chosen.kind] if chosen.task == task.index else 0
    comm.broadcast("final-single", single, {"task": chosen.task}, root=chosen.task)
    networks = {}
    if task.index == 0:
        networks["single"] = (_state_of(model, layout, single), chosen.id)
        if soup is not None:
            networks["soup"] = (_state_of(model, layout, soup), "soup")
    scored = Scored(member=_state_of(model, layout, own_member), candidates=candidates, cv_acc=cv_acc,
                    cv_loss=cv_loss, rule=rule or "none", choices=choices, selected=selected, outputs=outputs,
                    networks=networks,
                    pool_teacher=pool_teacher,
                    lineages_left=len({tuple(per_task[t]["final"]["lineage"]) for t in range(k)}),
                    disagreement=disagreement)
    model.load_state_dict(live)
    return scored


def conclude(task: Task, sets: EvalSets, scored: Scored) -> Concluded:
    """Task 0, once the others are done: the student (when asked for), the output, the result."""
    cfg, outputs, networks = task.cfg, dict(scored.outputs), dict(scored.networks)
    if cfg.selection.distill_output and scored.pool_teacher is not None:
        student, outputs["student"] = _student(task, sets, scored.pool_teacher)
        networks["student"] = (student, "student")
    output = _choose_output(cfg.selection.output, outputs)
    # model.safetensors holds one network: the output's, or for an ensemble the best single network.
    net_kind = output if output in networks else max(
        networks, key=lambda o: (_or(outputs[o].select_acc), -OUTPUT_ORDER.index(o)))
    candidates, chosen_index = scored.candidates, scored.selected
    chosen = candidates[chosen_index]
    result = Result(
        k=task.cfg.splits, candidates=candidates, cv_acc=scored.cv_acc, cv_loss=scored.cv_loss, rule=scored.rule,
        choices={r: _choice(candidates, i) for r, i in scored.choices.items()},
        selected=Selected(**vars(_choice(candidates, chosen_index)), task=chosen.task, kind=chosen.kind),
        outputs=outputs, output=output, estimate=outputs[output].estimate_acc, estimate_samples=len(sets.estimate),
        lineages_left=scored.lineages_left, disagreement=scored.disagreement,
        test_acc_mean=float(np.mean([c.test_acc for c in candidates if c.kind == "final"])),
        test_acc_best_single=float(max(c.test_acc for c in candidates)))
    return Concluded(result, *networks[net_kind])


def _or(x, default=-math.inf):
    return default if x is None else x


def _logits(model, data: Samples, cfg: Config) -> np.ndarray:
    if len(data) == 0:
        return np.empty((0, 0), np.float32)
    return evaluate(model, data, cfg.train.eval_batch_size, logits_out=True)[2]


def _own_networks(task: Task, layout: BlockLayout, kinds: list[str]) -> dict[str, np.ndarray]:
    """This task's candidates as packed buffers; the SWA average gets its BatchNorm statistics
    from a pass over the task's training data."""
    out = {"final": layout.pack()}
    if "best" in kinds:
        task.model.load_state_dict(task.best)
        out["best"] = layout.pack()
    if "swa" in kinds:
        task.model.load_state_dict(task.swa)
        recompute_batchnorm(task.model, task.train, task.cfg.train.eval_batch_size)
        out["swa"] = layout.pack()
    return out


def _cv_column(task: Task, comm: Comm, layout: BlockLayout, weights: dict, kinds: list[str]) -> list[dict]:
    """This task's column of the CV matrix: every candidate on its validation set."""
    if not task.has_val:
        return []
    column = []
    for kind in kinds:
        for j, buf, _ in comm.candidates(f"final-{kind}", weights[kind], {"task": task.index}):
            layout.unpack(buf)
            loss, acc = evaluate(task.model, task.val, task.cfg.train.eval_batch_size)
            column.append({"task": j, "kind": kind, "acc": acc, "loss": loss})
    return column


def _candidates(per_task: list[dict], columns: list[list[dict]], kinds: list[str], k: int):
    """Candidate records (task-major, kinds in KINDS order) and the CV matrix (empty without val)."""
    index = {(t, kind): t * len(kinds) + i for t in range(k) for i, kind in enumerate(kinds)}
    cv_acc = np.zeros((len(index), k)) if columns[0] else None
    cv_loss = np.zeros((len(index), k)) if columns[0] else None
    for j, column in enumerate(columns):
        for entry in column:
            cv_acc[index[entry["task"], entry["kind"]], j] = entry["acc"]
            cv_loss[index[entry["task"], entry["kind"]], j] = entry["loss"]
    candidates = []
    for (t, kind), i in sorted(index.items(), key=lambda item: item[1]):
        info = per_task[t][kind]
        candidates.append(Candidate(
            id=candidate_id(t, kind), task=t, kind=kind, finite=info["finite"],
            cv_mean_acc=float(cv_acc[i].mean()) if cv_acc is not None else None,
            cv_mean_loss=finite_or_none(cv_loss[i].mean()) if cv_loss is not None else None,
            select_acc=info["select_acc"], estimate_acc=info["estimate_acc"], estimate_loss=info["estimate_loss"],
            test_acc=info["test_acc"], test_loss=info["test_loss"], test_ece=info["test_ece"],
            lineage=info["lineage"]))
    if cv_acc is None:
        return candidates, [], []
    return candidates, cv_acc.tolist(), [[finite_or_none(x) for x in row] for row in cv_loss]


def _choice(candidates: list[Candidate], i: int) -> Choice:
    c = candidates[i]
    return Choice(i, c.id, c.cv_mean_acc, c.select_acc, c.estimate_acc, c.test_acc)


def _candidate_output(c: Candidate) -> OutputScores:
    return OutputScores(id=c.id, members=[c.id], select_acc=c.select_acc, estimate_acc=c.estimate_acc,
                        estimate_loss=c.estimate_loss, test_acc=c.test_acc, test_loss=c.test_loss, test_ece=c.test_ece)


def _output_scores(name: str, members: list[str], logits: dict[str, np.ndarray], sets: EvalSets) -> OutputScores:
    scored = {n: scores_of(logits[n], data.y.cpu().numpy()) for n, data in sets.named().items()}
    return OutputScores(id=name, members=members, select_acc=scored["select"]["acc"],
                        estimate_acc=scored["estimate"]["acc"], estimate_loss=scored["estimate"]["loss"],
                        test_acc=scored["test"]["acc"], test_loss=scored["test"]["loss"],
                        test_ece=scored["test"]["ece"])


def _ensemble(comm: Comm, logits: dict[str, np.ndarray], member_finite: bool, sets: EvalSets, task: Task,
              layout: BlockLayout, own_member: np.ndarray, member: str, k: int):
    """Mean logits of every finite member on each set (one float64 sum over the tasks per set), and
    on the pool when a student will learn from them."""
    ok = member_finite and all(np.isfinite(z).all() for z in logits.values())
    mean, members = {}, []
    named = dict(sets.named())
    if task.cfg.selection.distill_output:
        named["pool"] = sets.pool
        task.model.load_state_dict(_state_of(task.model, layout, own_member))
        logits = {**logits, "pool": _logits(task.model, sets.pool, task.cfg)}
        ok = ok and bool(np.isfinite(logits["pool"]).all())
    for name, data in named.items():
        if len(data) == 0:
            mean[name] = np.empty((0, 0))
            continue
        z = logits[name].astype(np.float32)
        total, metas = comm.allreduce_sum(f"final-ensemble-{name}", z.reshape(-1) if ok else np.zeros(z.size,
                                                                                                         np.float32),
                                          {"task": task.index, "finite": ok})
        members = [candidate_id(m["task"], member) for m in metas if m["finite"]]
        mean[name] = total.reshape(z.shape) / max(len(members), 1)
    pool_teacher = torch.from_numpy(mean["pool"]).float() if "pool" in mean and members else None
    return _output_scores("ensemble", members, mean, sets), pool_teacher


def _disagreement(comm: Comm, test_logits: np.ndarray) -> float | None:
    """Mean over pairs of members of the share of test samples they label differently."""
    preds = comm.allgather("final-predictions", test_logits.argmax(1).tolist() if test_logits.size else [])
    preds = [np.asarray(p) for p in preds if len(p)]
    pairs = [(a != b).mean() for i, a in enumerate(preds) for b in preds[i + 1:]]
    return float(np.mean(pairs)) if pairs else None


def _soup(comm: Comm, task: Task, layout: BlockLayout, own_member: np.ndarray, member_finite: bool,
          per_task: list[dict], member: str, sets: EvalSets):
    """Greedy soup (Wortsman et al., 2022) of the members, judged on the selection half."""
    k = comm.size
    accs = [_or(per_task[t][member]["select_acc"]) if per_task[t][member]["finite"] else -math.inf
            for t in range(k)]
    order = sorted(range(k), key=lambda t: (-accs[t], t))
    ingredients, soup, best_acc = [], None, -math.inf
    for t in order:
        if accs[t] == -math.inf:
            break  # the rest are not finite either
        trial = ingredients + [t]
        mine = own_member if task.index in trial and member_finite else np.zeros_like(own_member)
        total, _ = comm.allreduce_sum(f"final-soup-{len(trial)}-{t}", mine, {"task": task.index})
        mixed = (total / len(trial)).astype(np.float32)
        layout.unpack(mixed)
        recompute_batchnorm(task.model, sets.pool, task.cfg.train.eval_batch_size)
        acc = evaluate(task.model, sets.select, task.cfg.train.eval_batch_size)[1]
        if acc >= best_acc:
            ingredients, best_acc = trial, acc
            soup = layout.pack()  # BatchNorm statistics included
    if soup is None:
        return None, None
    layout.unpack(soup)
    logits = {name: _logits(task.model, data, task.cfg) for name, data in sets.named().items()}
    return _output_scores("soup", [candidate_id(t, member) for t in ingredients], logits, sets), soup


def _student(task: Task, sets: EvalSets, teacher: torch.Tensor):
    """One network trained on the pool towards the ensemble's soft targets (task 0, after the rest)."""
    cfg = task.cfg
    student = Task(cfg, cfg.splits, sets.pool, sets.pool.subset([]), sets.pool, sets.pool.input_shape,
                   teacher.shape[1], task.device)
    student.teacher = teacher.to(task.device)
    student.distill_alpha, student.distill_temperature = cfg.selection.student_alpha, cfg.selection.student_temperature
    while not student.done:
        student.train_steps(lambda: False)
        student.finish_epoch()
    logits = {name: _logits(student.model, data, cfg) for name, data in sets.named().items()}
    return snapshot(student.model), _output_scores("student", [], logits, sets)


def _choose_output(wanted: str, outputs: dict[str, OutputScores]) -> str:
    if wanted != "auto":
        return wanted if wanted in outputs else "single"
    if all(o.select_acc is None for o in outputs.values()):
        return "single"
    return max(outputs, key=lambda o: (_or(outputs[o].select_acc), -OUTPUT_ORDER.index(o)))


def _state_of(model, layout: BlockLayout, buf: np.ndarray) -> dict[str, torch.Tensor]:
    """The full state dict of the network whose floating-point entries are ``buf``."""
    live = snapshot(model)
    layout.unpack(buf)
    out = snapshot(model)
    model.load_state_dict(live)
    return out
