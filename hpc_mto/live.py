"""The live view of a training run: each task's epoch metrics, as they are written to
metrics/task-<t>.jsonl, also go to TensorBoard (``log.tensorboard``, one writer per task under
RUN_DIR/tensorboard/) and to MLflow (``log.mlflow``, one MLflow run per task).

The launcher makes the MLflow runs (``tracking_runs``) and records their ids in RUN_DIR/mlflow.json,
so K ranks never race to create an experiment, and a resumed task goes on logging into its own run.
Both are optional packages: a config asking for one that is not installed is refused at launch.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .atomic import write_text
from .config import Config, LogConfig
from .errors import ConfigError
from .records import MetricsLine

SCALARS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "adopted_total")


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("log.tensorboard=true needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def _mlflow_client(uri: str):
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise ConfigError(f"log.mlflow={uri!r} needs the mlflow package: pip install 'hpc-mto[mlflow]'") from None
    for name in ("mlflow", "alembic"):  # their set-up chatter (creating tables) is not the run's output
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri)


def tracking_runs(cfg: Config, run_path: Path, ids_file: Path) -> dict[str, str]:
    """Check that what ``cfg.log`` asks for is installed and reachable; make the MLflow runs the tasks
    log into (the ones ``ids_file`` does not already name). Returns task -> MLflow run id."""
    if cfg.log.tensorboard:
        _summary_writer()
    ids = json.loads(ids_file.read_text()) if ids_file.is_file() else {}
    if not cfg.log.mlflow:
        return ids
    client = _mlflow_client(cfg.log.mlflow)
    try:
        experiment = client.get_experiment_by_name(cfg.log.mlflow_experiment)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else client.create_experiment(cfg.log.mlflow_experiment))
        for t in range(cfg.splits):
            if str(t) not in ids:
                made = client.create_run(experiment_id, run_name=f"{run_path.name}/task-{t}",
                                         tags={"hpc_mto.run_dir": str(run_path.resolve()), "hpc_mto.task": str(t)})
                ids[str(t)] = made.info.run_id
    except Exception as exc:  # the tracking store's own errors: one line naming the URI
        raise ConfigError(f"log.mlflow={cfg.log.mlflow!r}: {str(exc).splitlines()[0]}") from None
    return ids


def write_ids(ids_file: Path, ids: dict[str, str]) -> None:
    if ids:
        write_text(ids_file, json.dumps(ids, indent=1) + "\n")


class LiveMetrics:
    """One task's live sinks; ``epoch`` is called with each metrics line as it is appended."""

    def __init__(self, cfg: LogConfig, tensorboard_dir: Path, mlflow_ids: Path, task: int):
        self.cfg, self.tensorboard_dir = cfg, tensorboard_dir
        self.writer = None
        self.client = self.run_id = None
        if cfg.mlflow:
            self.client = _mlflow_client(cfg.mlflow)
            self.run_id = json.loads(mlflow_ids.read_text())[str(task)]

    def epoch(self, m: MetricsLine) -> None:
        values = {key: float(getattr(m, key)) for key in SCALARS if getattr(m, key) is not None}
        if self.cfg.tensorboard:
            if self.writer is None:
                # purge_step: after a resume, points from epochs the crashed process logged past the
                # checkpoint (and that this one redoes) are hidden, not shown twice.
                self.writer = _summary_writer()(log_dir=str(self.tensorboard_dir), purge_step=m.epochs_done)
            for key, value in values.items():
                self.writer.add_scalar(key, value, m.epochs_done)
            self.writer.flush()
        if self.client is not None:
            from mlflow.entities import Metric

            stamp = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, stamp, m.epochs_done) for k, v in values.items()])

    def close(self, finished: bool) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.client is not None and finished:
            self.client.set_terminated(self.run_id, "FINISHED")
