"""`hpc-mto report` on a real run: the numbers it shows equal those recomputed from the run's files,
the plots are real images, the HTML stands alone, partial runs and bad paths are handled."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import read_jsonl, result

from hpc_mto import report as report_mod
from hpc_mto.cli import main

EPOCHS = 4  # of the shared run (conftest.best_k2)
PLOTS = ("val_curves.png", "cv_matrix.png", "transfers.png")


@pytest.fixture(scope="module")
def run_dir(best_k2):
    """One real finished run (K=2, transfer policy best, 4 epochs), shared with other modules."""
    return best_k2


@pytest.fixture(scope="module")
def summary(run_dir):
    return json.loads(invoke(run_dir, "--json").stdout)


@pytest.fixture(scope="module")
def text(run_dir, summary):  # after `summary`, so both see the same report/ directory
    return invoke(run_dir).stdout


@pytest.fixture
def partial_run(run_dir, tmp_path):
    """The finished run as it looked mid-way: no result, task 1 one epoch behind task 0."""
    path = tmp_path / "partial"
    shutil.copytree(run_dir, path, ignore=shutil.ignore_patterns("report", "checkpoints"))
    (path / "result.json").unlink()
    metrics = path / "metrics" / "task-1.jsonl"
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()[:EPOCHS - 1]))
    return path


def invoke(*args, ok=True):
    res = CliRunner().invoke(main, ["report", *map(str, args)])
    if ok:
        assert res.exit_code == 0, f"report failed ({res.exit_code}): {res.output}"
    return res


def metrics(run_dir, k):
    return read_jsonl(run_dir / "metrics" / f"task-{k}.jsonl")


def transfers(run_dir):
    return [r for k in range(2) for r in read_jsonl(run_dir / "transfers" / f"task-{k}.jsonl")]


def test_summary_test_accuracies_equal_the_result(run_dir, summary):
    r = result(run_dir)
    t = summary["test"]
    assert t["selected"] == r["selected"]["test_acc"] and t["selected_id"] == r["selected"]["id"]
    assert t["ensemble"] == r["outputs"]["ensemble"]["test_acc"]
    assert t["output"] == r["outputs"][r["output"]]["test_acc"]
    finals = [c["test_acc"] for c in r["candidates"] if c["kind"] == "final"]
    assert t["mean_single"] == pytest.approx(np.mean(finals))
    assert t["best_single"] == max(c["test_acc"] for c in r["candidates"])
    for rule, choice in r["choices"].items():
        assert summary["selection"]["choices"][rule]["select_acc"] == choice["select_acc"]
        assert summary["selection"]["choices"][rule]["test_acc"] == choice["test_acc"]


def test_summary_leads_with_the_output_and_its_estimate_from_the_estimation_half(run_dir, summary):
    r = result(run_dir)
    o = summary["outcome"]
    assert o["output"] == r["output"] and o["estimate"] == r["outputs"][r["output"]]["estimate_acc"]
    assert o["estimate_samples"] == r["estimate_samples"] > 0
    # auto: the output with the best selection-half accuracy (ties: single first)
    order = ["single", "soup", "student", "ensemble"]
    assert r["output"] == max(r["outputs"], key=lambda k: (r["outputs"][k]["select_acc"], -order.index(k)))


def test_summary_cv_row_means_are_recomputed_from_the_matrix(run_dir, summary):
    cv_acc = np.asarray(result(run_dir)["cv_acc"])
    assert np.asarray(summary["cv"]["acc"]).shape == (4, 2)
    np.testing.assert_allclose(summary["cv"]["row_means"], cv_acc.mean(axis=1))


def test_summary_per_task_numbers_come_from_metrics_transfers_and_candidates(run_dir, summary):
    candidates = {c["id"]: c for c in result(run_dir)["candidates"]}
    log = transfers(run_dir)
    for k, row in enumerate(summary["tasks"]):
        val = [m["val_acc"] for m in metrics(run_dir, k)]
        assert (row["val_acc_final"], row["val_acc_best"], row["epochs_done"]) == (val[-1], max(val), EPOCHS)
        assert row["test_acc_final"] == candidates[f"task-{k}/final"]["test_acc"]
        assert row["test_acc_best"] == candidates[f"task-{k}/best"]["test_acc"]
        assert row["transfers_accepted"] == sum(r["target"] == k and r["accepted"] for r in log)
        assert row["transfers_given"] == sum(r.get("source") == k and r["accepted"] for r in log)
    counts = np.asarray(summary["transfer_counts"])
    assert counts.sum() == sum(r["accepted"] for r in log)


def test_summary_time_split_is_the_result_timing(run_dir, summary):
    total = result(run_dir)["timing"]["total"]
    assert summary["timing"]["seconds"] == total
    assert summary["timing"]["transfer_pct"] == pytest.approx(100 * total["transfer"] / sum(total.values()))


def test_text_shows_config_selected_row_means_and_overhead(run_dir, summary, text):
    r = result(run_dir)
    assert "finished" in text.splitlines()[0]
    assert f"{r['selected']['test_acc']:.4f}" in text
    selected_line = next(line for line in text.splitlines() if line.startswith("*  task-"))
    assert r["selected"]["id"] in selected_line
    for row_id, row in zip(summary["cv"]["rows"], np.asarray(r["cv_acc"])):
        line = next(line for line in text.splitlines() if line.lstrip("* ").startswith(row_id + " "))
        assert line.split()[-1] == f"{row.mean():.4f}"
    assert f"transfer overhead: {summary['timing']['transfer_pct']:.1f}%" in text
    for word in ("digits", "mlp", "cv_mean", "holdout", "ensemble", "estimated accuracy", "optimistic"):
        assert word in text
    assert text.index("estimated accuracy") < text.index("cross-validation accuracy")


def test_plots_are_non_blank_pngs(run_dir, summary):
    for name in PLOTS:
        pixels = matplotlib.image.imread(run_dir / "report" / name)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.std() > 0, name


def test_html_embeds_every_plot_and_references_no_file(run_dir, summary):
    html = (run_dir / "report" / "report.html").read_text()
    for name in PLOTS:
        encoded = base64.b64encode((run_dir / "report" / name).read_bytes()).decode()
        assert f"data:image/png;base64,{encoded}" in html, name
    assert html.count('src="data:image/png;base64,') == len(PLOTS)
    assert not re.search(r'(src|href)\s*=\s*"(?!data:)', html)
    assert "<link" not in html and "<script" not in html and "url(" not in html
    assert f"{result(run_dir)['selected']['test_acc']:.4f}" in html


def test_partial_run_reports_progress_so_far(partial_run):
    res = invoke(partial_run)
    assert f"partial: run not finished (epoch {EPOCHS - 1}/{EPOCHS})" in res.stdout
    s = json.loads(invoke(partial_run, "--json").stdout)
    assert not s["finished"] and s["cv"] is None and s["test"] is None
    assert [t["epochs_done"] for t in s["tasks"]] == [EPOCHS, EPOCHS - 1]
    newest = [metrics(partial_run, k)[-1]["times"] for k in range(2)]
    assert s["timing"]["seconds"]["train"] == pytest.approx(sum(t["train"] for t in newest))
    written = {p.name for p in (partial_run / "report").iterdir()}
    assert written == {"report.html", "val_curves.png", "transfers.png"}


def test_not_a_run_directory_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "from hpc_mto.cli import main; main()", "report", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("hpc-mto: error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr and not proc.stdout


def test_comparison_has_one_row_per_run_and_writes_nothing(run_dir, partial_run):
    rows = json.loads(invoke(run_dir, partial_run, "--json").stdout)["runs"]
    assert [r["run"] for r in rows] == [str(run_dir), str(partial_run)]
    assert rows[0]["selected_test_acc"] == result(run_dir)["selected"]["test_acc"]
    assert rows[1]["selected_test_acc"] is None and rows[1]["status"] == f"epoch {EPOCHS - 1}/{EPOCHS}"
    lines = invoke(run_dir, partial_run).stdout.splitlines()
    assert sum(line.startswith((str(run_dir) + " ", str(partial_run) + " ")) for line in lines) == 2
    assert not (partial_run / "report").exists()


def test_tensorboard_missing_says_so_once_and_reports(partial_run, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    res = invoke(partial_run, "--tensorboard", "--json")
    assert len(res.stderr.splitlines()) == 1 and "tensorboard is not installed" in res.stderr
    assert json.loads(res.stdout)["tasks"]


def test_tensorboard_events_hold_every_epoch_of_every_task(partial_run, monkeypatch):
    scalars = []

    class Writer:  # stands in for SummaryWriter: records what the report would log
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((self.log_dir, tag, value, step))

        def close(self):
            pass

    monkeypatch.setattr(report_mod, "summary_writer_class", lambda: Writer)
    invoke(partial_run, "--tensorboard")
    for k in range(2):
        logged = [(step, v) for d, tag, v, step in scalars if d.endswith(f"task-{k}") and tag == "val_acc"]
        assert logged == [(m["epoch"] + 1, m["val_acc"]) for m in metrics(partial_run, k)]


def test_tensorboard_writes_event_files_when_installed(partial_run):
    pytest.importorskip("tensorboard")
    invoke(partial_run, "--tensorboard")
    for k in range(2):
        assert list((partial_run / "report" / "tensorboard" / f"task-{k}").glob("events.out.tfevents.*"))


def test_a_run_that_hides_test_scores_prints_none_until_asked(run_dir, summary, tmp_path):
    """selection.hide_test: no test score in the report, its JSON or the summary line; --show-test
    gives back exactly the normal report."""
    from hpc_mto import config as config_mod
    from hpc_mto.rundir import RunDir

    path = tmp_path / "hidden"
    shutil.copytree(run_dir, path, ignore=shutil.ignore_patterns("report", "checkpoints"))
    cfg = config_mod.load(path / "config.yaml", ["selection.hide_test=true"])
    (path / "config.yaml").write_text(config_mod.dump(cfg))

    def test_values(obj, key=""):
        if isinstance(obj, dict):
            return [v for k, item in obj.items() for v in test_values(item, k)]
        if isinstance(obj, list):
            return [v for item in obj for v in test_values(item, key)]
        return [obj] if "test" in key and obj is not None else []

    hidden = json.loads(invoke(path, "--json").stdout)
    assert test_values(summary) and not test_values(hidden)
    text = invoke(path).stdout
    assert "test scores hidden (selection.hide_test)" in text
    shown = json.loads(invoke(path, "--json", "--show-test").stdout)
    assert test_values(shown) == test_values(summary)
    line = CliRunner().invoke(main, ["status", str(path)]).stdout.splitlines()[-1]
    assert "test scores hidden" in line and "test acc" not in line
    assert "test acc" in RunDir(path).result().summary_line(path)
