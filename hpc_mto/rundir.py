"""The run directory: the stable contract between launch, the tasks, resume, status and report.

    RUN_DIR/
      config.yaml              resolved config (what was actually run)
      splits.h5                split, holdout and test indices; written once, never rewritten
      checkpoints/task-<k>/    step-<global step>.h5, exact state per task
      exchange/                file backend: round-<r>/task-<k>.h5 and final-*/
      metrics/task-<k>.jsonl   one line per epoch per task
      transfers/task-<k>.jsonl one line per transfer decision, this task being the target
      result.json, result.h5   CV matrix, selection, test scores, timing (written by task 0)
      model.pt, model.json     the selected model (weights_only-loadable) and how to rebuild it
      slurm/                   submitit logs and job ids
      report/                  what `hpc-mto report` writes
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from . import config as config_mod
from .atomic import write_text
from .errors import RunDirError


class JsonlLog:
    """Append-only JSON lines; its byte position is stored in checkpoints so a resume can cut it
    back to exactly what the checkpointed state had written."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def position(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def truncate(self, position: int) -> None:
        if self.path.exists():
            os.truncate(self.path, position)

    def read(self) -> list[dict]:
        return read_jsonl(self.path)


def read_jsonl(path: Path) -> list[dict]:
    """Lines of a JSONL file; a half-written last line (a task killed mid-write) is skipped."""
    if not Path(path).exists():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # -- layout ------------------------------------------------------------------------------
    config_file = property(lambda self: self.path / "config.yaml")
    splits_file = property(lambda self: self.path / "splits.h5")
    checkpoints = property(lambda self: self.path / "checkpoints")
    exchange = property(lambda self: self.path / "exchange")
    result_file = property(lambda self: self.path / "result.json")
    result_h5 = property(lambda self: self.path / "result.h5")
    model_file = property(lambda self: self.path / "model.pt")
    model_info = property(lambda self: self.path / "model.json")
    slurm_dir = property(lambda self: self.path / "slurm")
    report_dir = property(lambda self: self.path / "report")
    lock_file = property(lambda self: self.path / ".lock")

    def metrics(self, task: int) -> JsonlLog:
        return JsonlLog(self.path / "metrics" / f"task-{task}.jsonl")

    def transfers(self, task: int) -> JsonlLog:
        return JsonlLog(self.path / "transfers" / f"task-{task}.jsonl")

    @property
    def finished(self) -> bool:
        return self.result_file.is_file()

    # -- creation and checks -----------------------------------------------------------------
    def create(self, cfg: config_mod.Config) -> None:
        if self.path.exists() and any(self.path.iterdir()):
            raise RunDirError(f"run directory {self.path} already exists and is not empty; choose another "
                              "--run-dir, or continue it with `hpc-mto resume`")
        self.path.mkdir(parents=True, exist_ok=True)
        write_text(self.config_file, config_mod.dump(cfg))

    def require(self) -> "RunDir":
        if not self.path.is_dir():
            raise RunDirError(f"{self.path} is not a directory")
        if not self.config_file.is_file() or not self.splits_file.is_file():
            raise RunDirError(f"{self.path} is not an hpc-mto run directory (no config.yaml and splits.h5)")
        return self

    def config(self) -> config_mod.Config:
        return config_mod.from_dict(config_mod.read_yaml(self.config_file))

    # -- one launcher or resume at a time ----------------------------------------------------
    def lock(self, holder: dict | None = None) -> "RunLock":
        return RunLock(self.lock_file, holder or {})


class RunLock:
    """An exclusive claim on a run directory, naming its holder's host and PID.

    Created with O_EXCL (atomic on local and NFSv3+ file systems). A lock whose holder is on this
    host and no longer alive is stale and taken over; one held from another host is reported.
    """

    def __init__(self, path: Path, holder: dict):
        self.path = path
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), **holder}

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
