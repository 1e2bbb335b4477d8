"""The run directory: the stable contract between launch, the tasks, resume, status and report.

    RUN_DIR/
      config.yaml              resolved config (what was actually run)
      splits.h5                split, holdout and test indices; written once, never rewritten
      checkpoints/task-<t>/    step-<global step>.h5, exact state per task
      exchange/                file backend: round-<r>/task-<t>.h5 and final-*/
      heartbeat/task-<t>       MPI backend: each task's sign of life (hpc_mto.heartbeat)
      tensorboard/task-<t>/    log.tensorboard: each task's metrics, live; mlflow.json: log.mlflow's run ids
      metrics/task-<t>.jsonl   one line per epoch per task
      transfers/task-<t>.jsonl one line per transfer decision, this task being the target
      result.json, result.h5   CV matrix, selection, test scores, timing (written by task 0)
      model.safetensors, model.json    the output network and how to rebuild it (.pt before 0.3)
      ensemble/member-<t>.safetensors  each task's network in the K-model ensemble
      slurm/                   submitit logs and job ids
      report/                  what `hpc-mto report` writes

Where each file lives is decided here; what the JSON files hold (and their schema versions) is
decided in ``records``.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import time
from pathlib import Path

from . import config as config_mod
from .atomic import write_text
from .errors import ConfigError, RunDirError
from .factories import CodeRecord
from .provenance import now
from .records import JobsRecord, MetricsLine, ModelInfo, RecordLog, Result, TransferDecision


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @staticmethod
    def default_path(cfg: config_mod.Config) -> Path:
        """``runs/<time>-<dataset>-k<K>-<policy>`` under the working directory."""
        data = cfg.data.factory.rpartition(":")[2] if cfg.data.factory else cfg.data.name
        return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{data}-k{cfg.splits}-{cfg.transfer.policy}"

    # -- layout ------------------------------------------------------------------------------
    config_file = property(lambda self: self.path / "config.yaml")
    splits_file = property(lambda self: self.path / "splits.h5")
    checkpoints = property(lambda self: self.path / "checkpoints")
    exchange = property(lambda self: self.path / "exchange")
    heartbeats = property(lambda self: self.path / "heartbeat")
    result_file = property(lambda self: self.path / "result.json")
    result_h5 = property(lambda self: self.path / "result.h5")
    @property
    def model_file(self) -> Path:
        """The output network's weights: model.safetensors (model.pt in run directories of hpc-mto < 0.3)."""
        return _weights(self.path / "model")
    model_info = property(lambda self: self.path / "model.json")
    ensemble_dir = property(lambda self: self.path / "ensemble")
    slurm_dir = property(lambda self: self.path / "slurm")
    jobs_file = property(lambda self: self.path / "slurm" / "jobs.json")
    report_dir = property(lambda self: self.path / "report")
    lock_file = property(lambda self: self.path / ".lock")
    provenance_file = property(lambda self: self.path / "provenance.json")
    mlflow_ids = property(lambda self: self.path / "mlflow.json")  # task -> MLflow run id (log.mlflow)
    code = property(lambda self: CodeRecord(self.path / "code"))  # the user's factory code, as at the start

    def member_file(self, task: int) -> Path:
        """Task ``task``'s network in the K-model ensemble (its ``selection.member`` snapshot)."""
        return _weights(self.ensemble_dir / f"member-{task}")

    def tensorboard_dir(self, task: int) -> Path:
        return self.path / "tensorboard" / f"task-{task}"

    def metrics(self, task: int) -> RecordLog[MetricsLine]:
        return RecordLog(self.path / "metrics" / f"task-{task}.jsonl", MetricsLine)

    def transfers(self, task: int) -> RecordLog[TransferDecision]:
        return RecordLog(self.path / "transfers" / f"task-{task}.jsonl", TransferDecision)

    @property
    def finished(self) -> bool:
        return self.result_file.is_file()

    def epochs_done(self, k: int) -> list[int]:
        """Epochs each of the k tasks has completed (its last metrics line)."""
        return [rows[-1].epochs_done if rows else 0 for rows in (self.metrics(t).read() for t in range(k))]

    def selection_pending(self) -> bool:
        """Every task trained to its last epoch, yet no result: the final selection has to run."""
        cfg = self.config()
        return not self.finished and min(self.epochs_done(cfg.splits)) >= cfg.train.epochs

    def result(self) -> Result:
        return Result.read(self.result_file)

    def model_record(self) -> ModelInfo:
        """model.json: how to rebuild the output network; refused while the run has none."""
        if not self.model_file.is_file() or not self.model_info.is_file():
            raise RunDirError(f"{self.path} has no output model (model.safetensors, model.json): the run has not "
                              "finished")
        return ModelInfo.read(self.model_info)

    def jobs(self) -> JobsRecord | None:
        """The SLURM submission record, or None for a run that was not launched on SLURM."""
        return JobsRecord.read(self.jobs_file) if self.jobs_file.is_file() else None

    def write_jobs(self, record: JobsRecord) -> None:
        self.slurm_dir.mkdir(parents=True, exist_ok=True)
        record.write(self.jobs_file)

    # -- creation and checks -----------------------------------------------------------------
    def create(self, cfg: config_mod.Config) -> None:
        if self.path.exists() and any(self.path.iterdir()):
            raise RunDirError(f"run directory {self.path} already exists and is not empty; choose another "
                              "--run-dir, or continue it with `hpc-mto resume`")
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_config(cfg)

    def require(self) -> "RunDir":
        if not self.path.is_dir():
            raise RunDirError(f"{self.path} is not a directory")
        if not self.config_file.is_file() or not self.splits_file.is_file():
            raise RunDirError(f"{self.path} is not an hpc-mto run directory (no config.yaml and splits.h5)")
        return self

    def config(self) -> config_mod.Config:
        return config_mod.from_dict(config_mod.read_yaml(self.config_file))

    def update_config(self, overrides: list[str]) -> None:
        """Rewrite config.yaml with ``--set`` overrides on resume, refusing any key that would change
        finished work (config.RESUME_SAFE_KEYS lists the others)."""
        if not overrides:
            return
        old = self.config()
        new = config_mod.build([old.to_dict()] + [config_mod.parse_override(o) for o in overrides])
        changed = config_mod.resume_diff(old, new)
        if changed:
            safe = ", ".join(sorted(config_mod.RESUME_SAFE_KEYS))
            raise ConfigError(f"cannot resume with a changed config: {'; '.join(changed)} (keys safe to change: {safe})")
        if self.finished:
            raise RunDirError(f"run {self.path} already finished; start a new run to train longer")
        self.write_config(new, f"resumed {now()} with: {' '.join(overrides)}")

    def write_config(self, cfg: config_mod.Config, *comments: str) -> None:
        """config.yaml: the comment lines at its top (provenance, earlier resumes) are kept, ``comments``
        appended to them, then the config itself."""
        old = self.config_file.read_text().splitlines(True) if self.config_file.is_file() else []
        header = list(itertools.takewhile(lambda line: line.startswith("#"), old))
        header += [f"# {c}\n" for c in comments]
        write_text(self.config_file, "".join(header) + config_mod.dump(cfg))

    # -- one launcher or resume at a time ----------------------------------------------------
    def lock(self) -> "RunLock":
        return RunLock(self.lock_file)


class RunLock:
    """An exclusive claim on a run directory, naming its holder's host and PID.

    Created with O_EXCL (atomic on local and NFSv3+ file systems). A lock whose holder is on this
    host and no longer alive is stale and taken over; one held from another host is reported.
    """

    def __init__(self, path: Path):
        self.path = path
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}

    def _owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def _alive(self, owner: dict) -> bool:
        if owner.get("host") != socket.gethostname():
            return True  # cannot see another host's processes: assume it is alive
        try:
            os.kill(int(owner["pid"]), 0)
        except (ProcessLookupError, ValueError, KeyError):
            return False
        except PermissionError:
            return True
        return True

    def acquire(self) -> "RunLock":
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and self._alive(owner):
                    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("since", 0)))
                    raise RunDirError(f"run directory {self.path.parent} is in use by pid {owner.get('pid')} on "
                                      f"{owner.get('host')} since {since}; if that process is gone, "
                                      f"remove {self.path}") from None
                self.path.unlink(missing_ok=True)  # stale: its holder died without releasing it
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.holder, f)
            return self
        raise RunDirError(f"could not lock {self.path.parent}: another process keeps taking the lock")

    def release(self) -> None:
        owner = self._owner()
        if owner and owner.get("pid") == self.holder["pid"] and owner.get("host") == self.holder["host"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _weights(stem: Path) -> Path:
    """``stem``.safetensors, or the ``stem``.pt an older hpc-mto wrote when only that exists."""
    old = stem.with_suffix(".pt")
    return old if old.is_file() and not stem.with_suffix(".safetensors").is_file() else stem.with_suffix(".safetensors")
