"""``hpc-mto report``: what a run did, read back from its run directory.

One run: terminal tables (config, per-task accuracy and transfers, the CV matrix, test accuracy of
the selected model against the alternatives, both selection rules, the time split), and
RUN_DIR/report/ with PNG plots and a single-file report.html. Several runs: one comparison table.
A run that is still going (or was stopped) has no result.json yet: the report shows the metrics and
transfers written so far and says it is partial.

Everything shown is computed once into a plain summary dict (also what ``--json`` prints); the
text and HTML renderers only format it, so the three outputs cannot disagree.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import click
import numpy as np

from . import live
from .config import Config
from .errors import RunDirError
from .records import MetricsLine, Result, TransferDecision
from .rundir import RunDir

TIME_KEYS = ("train", "transfer", "eval", "checkpoint")


@dataclass
class RunData:
    """The raw files of one run, read once."""

    run: RunDir
    name: str
    cfg: Config
    metrics: list[list[MetricsLine]]
    transfers: list[list[TransferDecision]]
    result: Result | None


def load(path: str) -> RunData:
    run = RunDir(path).require()
    cfg = run.config()
    result = run.result() if run.finished else None
    return RunData(run, str(path), cfg, [run.metrics(t).read() for t in range(cfg.splits)],
                   [run.transfers(t).read() for t in range(cfg.splits)], result)


# -- the summary ------------------------------------------------------------------------------
def summarize(d: RunData) -> dict:
    return {"run_dir": d.name, "finished": d.result is not None, "progress": progress(d),
            "config": config_summary(d.cfg), "tasks": task_rows(d),
            "transfer_counts": transfer_counts(d).tolist(), "outcome": outcome_summary(d.result),
            "outputs": outputs_summary(d.result), "cv": cv_summary(d.result), "test": test_summary(d.result),
            "selection": selection_summary(d.result), "timing": timing(d)}


def epochs_done(metrics: list[MetricsLine]) -> int:
    return metrics[-1].epochs_done if metrics else 0


def progress(d: RunData) -> dict:
    # The slowest task's count: the epochs the whole run has completed (file-backend tasks drift).
    done, total = min(epochs_done(m) for m in d.metrics), d.cfg.train.epochs
    status = "finished" if d.result is not None else f"partial: run not finished (epoch {done}/{total})"
    return {"epochs_done": done, "epochs": total, "status": status}


def config_summary(cfg: Config) -> dict:
    return {"dataset": cfg.data.name, "model": cfg.model.name, "k": cfg.splits, "policy": cfg.transfer.policy,
            "interval": cfg.transfer.interval, "epochs": cfg.train.epochs, "fitness": cfg.transfer.fitness,
            "selection_rule": cfg.selection.rule, "output": cfg.selection.output}


def transfer_counts(d: RunData) -> np.ndarray:
    """counts[source][target]: accepted transfers from source into target."""
    k = d.cfg.splits
    counts = np.zeros((k, k), dtype=int)
    for decisions in d.transfers:
        for decision in decisions:
            for source in decision.adopted_from():
                counts[source, decision.target] += 1
    return counts


def task_rows(d: RunData) -> list[dict]:
    given = transfer_counts(d).sum(axis=1)
    test = {c.id: c.test_acc for c in d.result.candidates} if d.result else {}
    rows = []
    for t, metrics in enumerate(d.metrics):
        val = [m.val_acc for m in metrics if m.val_acc is not None]
        rows.append({"task": t, "epochs_done": epochs_done(metrics),
                     "val_acc_final": val[-1] if val else None, "val_acc_best": max(val) if val else None,
                     "test_acc_final": test.get(f"task-{t}/final"), "test_acc_best": test.get(f"task-{t}/best"),
                     "transfers_accepted": sum(1 for r in d.transfers[t] if r.target == t and r.accepted),
                     "transfers_given": int(given[t])})
    return rows


def outcome_summary(result: Result | None) -> dict | None:
    """What the run outputs and the honest estimate of it: the lead of every report."""
    if result is None:
        return None
    out = result.outputs[result.output]
    return {"output": result.output, "id": out.id, "estimate": result.estimate,
            "estimate_samples": result.estimate_samples, "test_acc": out.test_acc,
            "cv_mean_acc_optimistic": result.selected.cv_mean_acc if result.output == "single" else None,
            "lineages_left": result.lineages_left, "disagreement": result.disagreement}


def outputs_summary(result: Result | None) -> dict | None:
    if result is None:
        return None
    return {kind: {"id": o.id, "members": len(o.members), "select_acc": o.select_acc,
                   "estimate_acc": o.estimate_acc, "test_acc": o.test_acc, "test_loss": o.test_loss,
                   "test_ece": o.test_ece} for kind, o in result.outputs.items()}


def cv_summary(result: Result | None) -> dict | None:
    if result is None or not result.cv_acc:
        return None
    acc = np.asarray(result.cv_acc)
    return {"rows": [c.id for c in result.candidates], "acc": acc.tolist(),
            "row_means": acc.mean(axis=1).tolist(), "finite": [c.finite for c in result.candidates],
            "selected": result.selected.index}


def test_summary(result: Result | None) -> dict | None:
    if result is None:
        return None
    sel = result.selected
    ensemble = result.outputs.get("ensemble")
    return {"selected_id": sel.id, "selected": sel.test_acc, "selected_estimate": sel.estimate_acc,
            "mean_single": result.test_acc_mean, "best_single": result.test_acc_best_single,
            "ensemble": ensemble.test_acc if ensemble else None, "output": result.outputs[result.output].test_acc}


def selection_summary(result: Result | None) -> dict | None:
    if result is None:
        return None
    return {"rule": result.rule,
            "choices": {rule: {"id": c.id, "cv_mean_acc": c.cv_mean_acc, "select_acc": c.select_acc,
                               "estimate_acc": c.estimate_acc, "test_acc": c.test_acc}
                        for rule, c in result.choices.items()}}


def timing(d: RunData) -> dict:
    """Seconds per activity summed over tasks: final totals, or each task's newest metrics line."""
    if d.result is not None and d.result.timing is not None:
        source, seconds = "result.json", dict(d.result.timing.total)
    else:
        newest = [m[-1].times for m in d.metrics if m]
        source, seconds = "the newest metrics line of each task", {key: sum(t[key] for t in newest) for key in TIME_KEYS}
    total = sum(seconds.values())
    return {"source": source, "seconds": seconds, "total": total,
            "transfer_pct": 100 * seconds["transfer"] / total if total else None}


def compare_row(s: dict) -> dict:
    test, outcome = s["test"] or {}, s["outcome"] or {}
    return {"run": s["run_dir"], "status": "finished" if s["finished"] else
            f"epoch {s['progress']['epochs_done']}/{s['progress']['epochs']}",
            "dataset": s["config"]["dataset"], "k": s["config"]["k"], "policy": s["config"]["policy"],
            "output": outcome.get("output"), "estimate": outcome.get("estimate"),
            "output_test_acc": outcome.get("test_acc"), "selected_test_acc": test.get("selected"),
            "ensemble_test_acc": test.get("ensemble"), "mean_single_test_acc": test.get("mean_single"),
            "task_seconds": s["timing"]["total"]}


# -- tables, shared by the terminal and the HTML ---------------------------------------------
class Table(NamedTuple):
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""

    def numeric(self) -> list[bool]:
        """Which columns hold only numbers: those are right-aligned so the digits line up."""
        return [all(_numeric(row[i]) for row in self.rows) for i in range(len(self.header))]


def fmt(x, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def run_tables(s: dict) -> list[Table]:
    c = s["config"]
    tables = [Table("config", ["dataset", "model", "K", "policy", "interval", "epochs", "fitness", "selection rule",
                               "output"],
                    [[c["dataset"], c["model"], str(c["k"]), c["policy"], str(c["interval"]), str(c["epochs"]),
                      c["fitness"], c["selection_rule"], c["output"]]])]
    if s["finished"]:
        tables += [outcome_table(s["outcome"]), outputs_table(s["outputs"], s["outcome"]["output"])]
    tables.append(tasks_table(s["tasks"]))
    if s["finished"]:
        tables += ([cv_table(s["cv"])] if s["cv"] else []) + ([test_table(s["test"])] if s["test"] else []) + \
            [selection_table(s["selection"])]
    return tables + [time_table(s["timing"])]


def outcome_table(o: dict) -> Table:
    rows = [["output", f"{o['output']} ({o['id']})"],
            ["estimated accuracy (holdout estimation half)",
             f"{fmt(o['estimate'])} ({o['estimate_samples']} samples)"],
            ["test accuracy", fmt(o["test_acc"])],
            ["lineages left at the end", str(o["lineages_left"])],
            ["pairwise disagreement of the ensemble's members (test)", fmt(o["disagreement"])]]
    if o["cv_mean_acc_optimistic"] is not None:
        rows.insert(2, ["CV-matrix row mean (optimistic: peers trained on it)", fmt(o["cv_mean_acc_optimistic"])])
    return Table("outcome", ["", "value"], rows,
                 "the estimate comes from holdout samples that chose nothing: it is the figure to quote")


def outputs_table(outputs: dict, chosen: str) -> Table:
    rows = [["*" if kind == chosen else "", kind, o["id"], str(o["members"]), fmt(o["select_acc"]),
             fmt(o["estimate_acc"]), fmt(o["test_acc"]), fmt(o["test_loss"]), fmt(o["test_ece"])]
            for kind, o in outputs.items()]
    return Table("outputs (chosen by the holdout's selection half)",
                 ["", "output", "what", "networks", "select acc", "estimate acc", "test acc", "test log-loss",
                  "test ECE"], rows, "* the run's output (selection.output)")


def tasks_table(tasks: list[dict]) -> Table:
    header = ["task", "epochs", "val acc final", "val acc best", "test acc final", "test acc best",
              "transfers accepted", "transfers given"]
    rows = [[str(t["task"]), str(t["epochs_done"]), fmt(t["val_acc_final"]), fmt(t["val_acc_best"]),
             fmt(t["test_acc_final"]), fmt(t["test_acc_best"]), str(t["transfers_accepted"]),
             str(t["transfers_given"])] for t in tasks]
    return Table("tasks", header, rows, "given: accepted transfers where this task was the source")


def cv_table(cv: dict) -> Table:
    k = len(cv["acc"][0])
    rows = [["*" if i == cv["selected"] else "", name + ("" if cv["finite"][i] else " (not finite)"),
             *(fmt(a) for a in cv["acc"][i]), fmt(cv["row_means"][i])] for i, name in enumerate(cv["rows"])]
    # Optimistic whatever the output: most of each validation set lies in the peers' training sets.
    return Table("cross-validation accuracy (row: candidate, column: validation set; optimistic, peers trained "
                 "on most of each set)",
                 ["", "candidate", *(f"val {j}" for j in range(k)), "mean"], rows, "* selected")


def test_table(t: dict) -> Table:
    rows = [["the run's output", fmt(t["output"])], [f"single model ({t['selected_id']})", fmt(t["selected"])],
            ["mean single model (final weights)", fmt(t["mean_single"])],
            ["best single model (picked by test: hindsight)", fmt(t["best_single"])],
            ["ensemble of the K models", fmt(t["ensemble"])]]
    return Table("test accuracy", ["model", "test acc"], rows)


def selection_table(sel: dict) -> Table:
    rows = [["*" if rule == sel["rule"] else "", rule, c["id"], fmt(c["cv_mean_acc"]), fmt(c["select_acc"]),
             fmt(c["estimate_acc"]), fmt(c["test_acc"])] for rule, c in sel["choices"].items()]
    return Table("single model chosen by each rule", ["", "rule", "model", "cv mean acc", "select acc",
                                                      "estimate acc", "test acc"], rows,
                 "* the run's rule (selection.rule)")


def time_table(t: dict) -> Table:
    total = t["total"] or None
    rows = [[key, fmt(sec, ".1f"), fmt(100 * sec / total if total else None, ".1f")]
            for key, sec in t["seconds"].items()]
    return Table(f"time, summed over tasks (from {t['source']})", ["activity", "seconds", "%"],
                 rows + [["total", fmt(t["total"], ".1f"), "100.0" if total else "-"]],
                 "no time recorded yet" if total is None else
                 f"transfer overhead: {t['transfer_pct']:.1f}% of the total")


def compare_table(rows: list[dict]) -> Table:
    header = ["run", "status", "dataset", "K", "policy", "output", "estimate", "output test", "single test",
              "ensemble test", "mean single test", "task time (s)"]
    cells = [[r["run"], r["status"], r["dataset"], str(r["k"]), r["policy"], r["output"] or "-", fmt(r["estimate"]),
              fmt(r["output_test_acc"]), fmt(r["selected_test_acc"]), fmt(r["ensemble_test_acc"]),
              fmt(r["mean_single_test_acc"]), fmt(r["task_seconds"], ".1f")] for r in rows]
    return Table("comparison (accuracies on each run's test set)", header, cells,
                 "task time: training, transfer, evaluation and checkpoint seconds summed over tasks")


def _numeric(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return cell == "-"
    return True


def render_text(table: Table) -> str:
    widths = [max(len(x) for x in col) for col in zip(table.header, *table.rows)]
    right = table.numeric()

    def line(cells):
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()

    out = [table.title, line(table.header), "  ".join("-" * w for w in widths), *map(line, table.rows)]
    return "\n".join(out + ([table.note] if table.note else [])) + "\n"


# -- files ------------------------------------------------------------------------------------
def write_report_dir(d: RunData, s: dict, tables: list[Table]) -> list[Path]:
    from . import report_html, report_plots
    from .atomic import write_text

    out = d.run.report_dir
    try:
        out.mkdir(exist_ok=True)
        images = report_plots.write_all(d, s, out)
        html = out / "report.html"
        write_text(html, report_html.render(f"hpc-mto report: {d.name}", s["progress"]["status"], tables, images))
    except OSError as exc:
        raise RunDirError(f"cannot write the report to {out}: {exc.strerror or exc}") from None
    return [html, *(out / name for name in images)]


def summary_writer_class():
    """TensorBoard's SummaryWriter, or None when tensorboard is not installed (it is optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter


def write_tensorboard(d: RunData, writer_class) -> Path:
    root = d.run.report_dir / "tensorboard"
    shutil.rmtree(root, ignore_errors=True)  # rewritten whole: appending would duplicate every point
    for t, metrics in enumerate(d.metrics):
        writer = writer_class(log_dir=str(root / f"task-{t}"))
        for m in metrics:
            for key in live.SCALARS:  # what the live writer logs, under the same names
                if getattr(m, key) is not None:
                    writer.add_scalar(key, getattr(m, key), m.epochs_done)
        for r in d.transfers[t]:
            writer.add_scalar("transfer_accepted", float(r.accepted), r.epoch)
        writer.close()
    return root


# -- the command ------------------------------------------------------------------------------
def show(run_dirs, as_json: bool, tensorboard: bool, show_test: bool = False) -> str:
    """What ``hpc-mto report`` prints (tables, or JSON); writes RUN_DIR/report/ for a single run."""
    runs = [load(p) for p in run_dirs]  # every path checked before anything is written
    summaries = [hide_test_scores(summarize(d)) if d.cfg.selection.hide_test and not show_test else summarize(d)
                 for d in runs]
    if tensorboard:
        _tensorboard(runs)
    if len(runs) == 1:
        d, s = runs[0], summaries[0]
        tables = run_tables(s)
        s["files"] = [str(f) for f in write_report_dir(d, s, tables)]
        hidden = ["test scores hidden (selection.hide_test): hpc-mto report --show-test shows them"] \
            if d.cfg.selection.hide_test and not show_test else []
        out, text = s, [f"{d.name}: {s['progress']['status']}", *hidden, *map(render_text, tables),
                        "report written: " + ", ".join(s["files"])]
    else:
        rows = [compare_row(s) for s in summaries]
        out, text = {"runs": rows}, [render_text(compare_table(rows))]
    return json.dumps(out, indent=1) if as_json else "\n".join(text)


def hide_test_scores(obj):
    """The summary with every test score blanked (shown as "-"): selection.hide_test."""
    if isinstance(obj, dict):
        return {k: None if "test" in k or k == "disagreement" else hide_test_scores(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [hide_test_scores(v) for v in obj]
    return obj


def _tensorboard(runs: list[RunData]) -> None:
    """Event files per run; progress goes to stderr so that --json output stays parseable."""
    writer_class = summary_writer_class()
    if writer_class is None:
        click.echo("hpc-mto: tensorboard is not installed: no event files written (pip install tensorboard)",
                   err=True)
        return
    for d in runs:
        try:
            click.echo(f"tensorboard events: {write_tensorboard(d, writer_class)}", err=True)
        except OSError as exc:
            raise RunDirError(f"cannot write TensorBoard files for {d.name}: {exc.strerror or exc}") from None
