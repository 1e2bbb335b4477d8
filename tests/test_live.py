"""Live metrics: each task's epoch metrics go to TensorBoard and to MLflow as it trains, and a task
killed and resumed leaves each epoch's point once in TensorBoard and the final values in MLflow."""

import json
import os

import pytest
from conftest import read_jsonl, run_cli

from hpc_mto.faults import ENV as INJECT_ENV

EPOCHS = 3


@pytest.mark.mpi
def test_metrics_reach_tensorboard_and_mlflow_live_per_task_and_survive_a_kill_and_resume(tmp_path):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    # No checkpoint before the kill (checkpoint.every an hour): the resumed tasks redo every epoch.
    args = ["--splits", 2, "--set", f"train.epochs={EPOCHS}", "--set", "checkpoint.every=3600",
            "--set", "log.tensorboard=true", "--set", f"log.mlflow={uri}", "--no-progress"]
    killed = run_cli("launch", "--run-dir", run_dir, *args, env={INJECT_ENV: "kill@step:1:70"}, check=False)
    assert killed.returncode != 0 and "mlflow" not in killed.stdout.lower()  # its table set-up chatter is muted
    client = MlflowClient(tracking_uri=uri)
    ids = json.loads((run_dir / "mlflow.json").read_text())
    logged_before = {t: [m.step for m in client.get_metric_history(ids[str(t)], "val_acc")] for t in (0, 1)}
    assert logged_before[1] == [1, 2]  # live: epochs 1 and 2 were there before task 1 died in epoch 3
    run_cli("resume", run_dir, "--no-progress")
    assert json.loads((run_dir / "mlflow.json").read_text()) == ids  # the same MLflow runs go on
    for t in (0, 1):
        lines = read_jsonl(run_dir / "metrics" / f"task-{t}.jsonl")
        assert [m["epoch"] + 1 for m in lines] == list(range(1, EPOCHS + 1))
        events = EventAccumulator(str(run_dir / "tensorboard" / f"task-{t}")).Reload()
        for key in ("val_acc", "train_loss", "lr"):
            points = [(e.step, e.value) for e in events.Scalars(key)]
            # Once per epoch: the killed process's points were purged when the resumed one began.
            assert [s for s, _ in points] == list(range(1, EPOCHS + 1)), (t, key, points)
            assert [v for _, v in points] == pytest.approx([m[key] for m in lines], rel=1e-6)
        run = client.get_run(ids[str(t)])
        assert run.info.status == "FINISHED" and run.data.tags["hpc_mto.task"] == str(t)
        assert run.data.tags["hpc_mto.run_dir"] == os.fspath(run_dir.resolve())
        history = client.get_metric_history(ids[str(t)], "val_acc")
        # An epoch logged twice (before the kill and after the resume) has the same value twice:
        # the resumed run is exact.
        assert {m.step for m in history} == set(range(1, EPOCHS + 1))
        assert all(m.value == pytest.approx(lines[m.step - 1]["val_acc"], rel=1e-12) for m in history)


def test_a_live_sink_that_is_not_installed_stops_the_launch_before_anything_is_written(tmp_path):
    """The launcher checks the optional packages first (here: mlflow made unimportable)."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "mlflow.py").write_text("raise ImportError('not installed')\n")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")]))}
    run_dir = tmp_path / "run"
    proc = run_cli("launch", "--run-dir", run_dir, "--set", "log.mlflow=sqlite:///x.db", env=env, check=False)
    assert proc.returncode == 2 and proc.stderr == ("hpc-mto: error: log.mlflow='sqlite:///x.db' needs the mlflow "
                                                    "package: pip install 'hpc-mto[mlflow]'\n")
    assert not run_dir.exists()
