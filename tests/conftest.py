"""Shared helpers: run the real CLI and real MPI ranks, read run directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpc_mto.faults import ENV as INJECT_ENV
from hpc_mto.faults import HOLD_DIR_ENV

BIN = Path(sys.executable).parent
HPC_MTO = str(BIN / "hpc-mto")
MPIEXEC = str(BIN / "mpiexec")
HERE = Path(__file__).parent

# Small, fast settings shared by the integration tests: digits, 2-4 epochs.
QUICK = ["--set", "train.epochs=4", "--set", "data.selection_holdout=0.1", "--no-progress"]


def run_cli(*args, env=None, check=True, timeout=600) -> subprocess.CompletedProcess:
    proc = subprocess.run([HPC_MTO, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"hpc-mto {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def mpi_script(n: int, script: str, *args, timeout=300) -> subprocess.CompletedProcess:
    """Run tests/mpi/<script> on n real MPI ranks; the script asserts and exits non-zero on failure."""
    proc = subprocess.run([MPIEXEC, "-n", str(n), sys.executable, str(HERE / "mpi" / script), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} on {n} ranks failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def result(run_dir) -> dict:
    return json.loads((Path(run_dir) / "result.json").read_text())


def read_jsonl(path) -> list[dict]:
    """A JSONL log's lines as plain dicts (the tests read the files on their own)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="session")
def best_k2(tmp_path_factory):
    """One finished run of policy best (a transfer round every epoch) with K=2 and 4 epochs, shared by
    the modules that only read it: a run costs more than most tests."""
    run_dir = tmp_path_factory.mktemp("best-k2") / "run"
    # digits' pairwise unseen sets hold ~44 samples: a lower minimum than the default lets `best` adopt
    run_cli("launch", "--run-dir", run_dir, "--splits", 2, "--set", "train.epochs=4", "--set", "transfer.policy=best",
            "--set", "transfer.interval=1", "--set", "transfer.min_samples=20", "--set", "checkpoint.every=0",
            "--no-progress")
    return run_dir


class Hold:
    """Task ``task`` of the job pauses at global step ``step`` until released (faults: hold)."""

    def __init__(self, tmp_path: Path, task: int, step: int):
        self.dir, self.task = tmp_path / "hold", task
        self.dir.mkdir()
        self.env = {INJECT_ENV: f"hold@step:{task}:{step}", HOLD_DIR_ENV: str(self.dir)}

    def wait(self, launcher: subprocess.Popen | None = None, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not (self.dir / f"held-{self.task}").exists():
            assert launcher is None or launcher.poll() is None, launcher.communicate()
            assert time.monotonic() < deadline, f"task {self.task} did not reach its hold within {timeout:.0f}s"
            time.sleep(0.05)

    def release(self) -> None:
        (self.dir / "release").touch()
