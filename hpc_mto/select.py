"""Final selection: the cross-validation matrix, the selection holdout, the output model.

Candidates are each task's final weights and its best-on-own-validation snapshot (2K models,
candidate ``2*task + kind``). Each is streamed to every task with one broadcast and scored on that
task's validation set: task j computes column j of the matrix, and an allgather gives every task the
whole matrix. The paper's rule picks the best row mean; since transfers leak the validation sets into
every model, each candidate is also scored on the selection holdout that no task ever touched, and
both choices are recorded. The K-model ensemble (mean logits of the best snapshots) is scored too.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .blocks import BlockLayout
from .comm import Comm
from .task import Arrays, Task, evaluate, is_finite_model

KINDS = ("final", "best")


def candidate_id(task: int, kind: str) -> str:
    return f"task-{task}/{kind}"


def row_means(cv_acc: np.ndarray, usable: np.ndarray) -> np.ndarray:
    means = cv_acc.mean(axis=1)
    return np.where(usable, means, -np.inf)


def choose(scores: np.ndarray) -> int:
    """Index of the highest score; the first one on ties (deterministic)."""
    return int(np.argmax(scores))


def _logits_and_scores(model, data: Arrays, batch_size: int):
    loss, acc, logits = evaluate(model, data, batch_size, logits_out=True)
    return {"loss": loss, "acc": acc}, logits


def run(task: Task, comm: Comm, holdout: Arrays, test: Arrays, selection_rule: str) -> dict:
    """Score every candidate everywhere; returns the result summary (the same on every task)."""
    bs = task.cfg.train.eval_batch_size
    own_state = {k: v.clone() for k, v in task.model.state_dict().items()}
    layout = BlockLayout(task.model, None, ["*"], with_optimizer_state=False)
    own_models = {"final": layout.pack()}
    task.model.load_state_dict(task.best)
    own_models["best"] = layout.pack()

    column, mine = [], {}
    ensemble = {}
    for kind in KINDS:
        layout.unpack(own_models[kind])
        finite_model = is_finite_model(task.model)
        # This task's own candidates on the holdout and the test set: nobody else needs the weights.
        h, h_logits = _logits_and_scores(task.model, holdout, bs)
        t, t_logits = _logits_and_scores(task.model, test, bs)
        mine[kind] = {"finite": finite_model, "holdout": h, "test": t,
                      "lineage": task.lineage if kind == "final" else task.best_lineage}
        if kind == "best":
            ensemble = {"holdout": h_logits, "test": t_logits, "finite": finite_model}
        meta = {"task": task.task, "finite": finite_model}
        for j, buf, m in comm.candidates(f"final-{kind}", own_models[kind], meta):
            layout.unpack(buf)
            loss, acc = evaluate(task.model, task.val, bs)
            column.append({"candidate": 2 * j + KINDS.index(kind), "acc": acc, "loss": loss})
    task.model.load_state_dict(own_state)

    columns = comm.allgather("final-columns", column)
    per_task = comm.allgather("final-own", mine)
    k = comm.size
    cv_acc, cv_loss = np.zeros((2 * k, k)), np.zeros((2 * k, k))
    for j, col in enumerate(columns):
        for entry in col:
            cv_acc[entry["candidate"], j] = entry["acc"]
            cv_loss[entry["candidate"], j] = entry["loss"]

    ens = _ensemble(comm, ensemble, holdout, test)
    candidates = []
    for i in range(2 * k):
        owner, kind = divmod(i, 2)
        info = per_task[owner][KINDS[kind]]
        candidates.append({"id": candidate_id(owner, KINDS[kind]), "task": owner, "kind": KINDS[kind],
                           "finite": info["finite"], "cv_mean_acc": float(cv_acc[i].mean()),
                           "cv_mean_loss": _num(cv_loss[i].mean()),
                           "holdout_acc": info["holdout"]["acc"] if len(holdout) else None,
                           "holdout_loss": _num(info["holdout"]["loss"]) if len(holdout) else None,
                           "test_acc": info["test"]["acc"], "test_loss": _num(info["test"]["loss"]),
                           "lineage": info["lineage"]})
    usable = np.array([c["finite"] for c in candidates])
    choices = {"cv_mean": choose(row_means(cv_acc, usable))}
    if len(holdout):
        choices["holdout"] = choose(np.where(usable, [c["holdout_acc"] for c in candidates], -np.inf))
    rule = selection_rule if selection_rule in choices else "cv_mean"
    selected = choices[rule]
    return {
        "k": k,
        "candidates": candidates,
        "cv_acc": cv_acc.tolist(),
        "cv_loss": [[_num(x) for x in row] for row in cv_loss],
        "choices": {r: {"index": i, "id": candidates[i]["id"], "test_acc": candidates[i]["test_acc"],
                        "cv_mean_acc": candidates[i]["cv_mean_acc"],
                        "holdout_acc": candidates[i]["holdout_acc"]} for r, i in choices.items()},
        "rule": rule,
        "selected": {"index": selected, **{key: candidates[selected][key] for key in
                                           ("id", "task", "kind", "test_acc", "cv_mean_acc", "holdout_acc")}},
        "ensemble": ens,
        "test_acc_mean": float(np.mean([c["test_acc"] for c in candidates if c["kind"] == "final"])),
        "test_acc_best_single": float(max(c["test_acc"] for c in candidates)),
    }


def _ensemble(comm: Comm, own: dict, holdout: Arrays, test: Arrays) -> dict:
    """Mean logits of every finite best snapshot: one float64 sum over tasks per set."""
    out = {}
    for name, data in (("holdout", holdout), ("test", test)):
        if len(data) == 0:
            out[f"{name}_acc"] = None
            continue
        logits = own[name].astype(np.float32)
        meta = {"finite": own["finite"] and bool(np.isfinite(logits).all())}
        contribution = logits if meta["finite"] else np.zeros_like(logits)
        total, metas = comm.allreduce_sum(f"final-ensemble-{name}", contribution.reshape(-1), meta)
        members = sum(m["finite"] for m in metas)
        pred = total.reshape(logits.shape).argmax(1)
        out[f"{name}_acc"] = float((pred == data.y.cpu().numpy()).mean()) if members else None
        out["members"] = members
    return out


def _num(x):
    x = float(x)
    return x if math.isfinite(x) else None


def selected_state(task: Task, result: dict) -> dict[str, torch.Tensor] | None:
    """The selected model's full state if this task owns it, else None."""
    sel = result["selected"]
    if sel["task"] != task.task:
        return None
    if sel["kind"] == "best":
        return {k: v.clone() for k, v in task.best.items()}
    return {k: v.detach().clone() for k, v in task.model.state_dict().items()}
