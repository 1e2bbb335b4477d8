"""Soak: a rank killed outright (kill -9: no handler, no checkpoint of its own) at a random step, ten
times with different seeds; each run, resumed once, ends bitwise where an uninterrupted run ends."""

import random
from pathlib import Path

import pytest

from conftest import run_cli
from hpc_mto.faults import ENV as INJECT_ENV
from test_resume import outcome, same_model

pytestmark = pytest.mark.mpi

EPOCHS, STEPS_PER_EPOCH = 3, 31  # digits, K=2, batch 32
CONFIG = ["--splits", 2, "--set", f"train.epochs={EPOCHS}", "--set", "transfer.interval=1",
          "--set", "checkpoint.every=0", "--no-progress"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("soak") / "reference"
    run_cli("launch", "--run-dir", run_dir, *CONFIG)
    return run_dir


@pytest.mark.parametrize("seed", range(10))
def test_a_rank_killed_at_a_random_step_resumes_to_the_same_bits(seed, reference, tmp_path):
    rng = random.Random(seed)
    task, step = rng.randrange(2), rng.randrange(1, EPOCHS * STEPS_PER_EPOCH)
    run_dir = tmp_path / "killed"
    segments_before = set(Path("/dev/shm").glob("mpich*"))
    killed = run_cli("launch", "--run-dir", run_dir, *CONFIG, env={INJECT_ENV: f"kill@step:{task}:{step}"},
                     check=False)
    assert killed.returncode != 0 and not (run_dir / "result.json").exists(), killed.stderr
    # No rank finalized MPI, so none unlinked its shared-memory segment: the launcher removed them.
    assert set(Path("/dev/shm").glob("mpich*")) <= segments_before
    run_cli("resume", run_dir, "--no-progress")
    assert outcome(run_dir) == outcome(reference)
    assert same_model(run_dir, reference)
