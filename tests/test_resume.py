"""Preemption safety: a stopped and resumed run ends bit for bit where an uninterrupted one does;
damaged or half-written checkpoints are detected and the previous one is used; the file exchange
gives the same bits as MPI."""

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import HPC_MTO, Hold, read_jsonl, result, run_cli
from hpc_mto.model_io import read_weights
from hpc_mto import checkpoint
from hpc_mto.faults import ENV as INJECT_ENV
from hpc_mto.signals import EXIT_REQUEUE
from hpc_mto.worker import STOP_CHECK_STEPS

pytestmark = pytest.mark.mpi

EPOCHS = 4
# The shared run's settings (conftest.best_k2): digits' pairwise unseen sets hold ~44 samples, so a
# lower minimum lets `best` adopt. A checkpoint at every epoch end, so older ones exist to go back to.
COMMON = ["--splits", 2, "--set", f"train.epochs={EPOCHS}", "--set", "transfer.interval=1",
          "--set", "transfer.min_samples=20", "--set", "checkpoint.every=0", "--no-progress"]
# Each mode's exact state differs: adopted weights; averaged ones; cached teacher logits, an SWA
# average and augmented batches (random crops, per sample); averages pulled in between checkpoints
# every 7 steps.
MODES = {"best": ["--set", "transfer.policy=best"],
         "average": ["--set", "transfer.policy=average"],
         "distill": ["--set", "transfer.policy=distill", "--set", "train.swa_epochs=2",
                     "--set", "data.augment=standard"],
         "gradual": ["--set", "transfer.policy=average", "--set", "transfer.average_steps=7",
                     "--set", "transfer.average_rate=0.2", "--set", "model.shared_init=true"]}


def launch(run_dir, mode, *extra, env=None, check=True):
    return run_cli("launch", "--run-dir", run_dir, *MODES[mode], *COMMON, *extra, env=env, check=check)


def outcome(run_dir: Path) -> dict:
    """Everything that must be identical between two runs (timings excluded)."""
    r = result(run_dir)
    metrics = [[{k: v for k, v in m.items() if k != "times"} for m in read_jsonl(p)]
               for p in sorted((run_dir / "metrics").glob("*.jsonl"))]
    return {"cv_acc": r["cv_acc"], "cv_loss": r["cv_loss"], "candidates": r["candidates"],
            "selected": r["selected"], "choices": r["choices"], "outputs": r["outputs"], "output": r["output"],
            "transfers": [p.read_text() for p in sorted((run_dir / "transfers").glob("*.jsonl"))],
            "metrics": metrics}


def stop_step(signalled: int, steps_per_epoch: int = 31) -> int:
    """Where the ranks stop after a signal at ``signalled``: the next agreement point, every
    STOP_CHECK_STEPS steps or at an epoch end, whichever comes first."""
    up = lambda n: -(-signalled // n) * n
    return min(up(STOP_CHECK_STEPS), up(steps_per_epoch))


def same_model(a: Path, b: Path) -> bool:
    x, y = (read_weights(p / "model.safetensors") for p in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, best_k2):
    """Uninterrupted MPI runs, one per mode (best: the shared run, the same config)."""
    runs = {"best": best_k2}
    for mode in ("average", "distill", "gradual"):
        runs[mode] = tmp_path_factory.mktemp("reference") / mode
        launch(runs[mode], mode)
    return runs


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """Runs stopped by a signal at a random (seeded) step; not yet resumed."""
    root = tmp_path_factory.mktemp("interrupted")
    rng = random.Random(20201)
    steps = {}
    for policy in MODES:
        # After the first round (~31 steps an epoch), so an older complete checkpoint exists too.
        steps[policy] = step = rng.randrange(35, EPOCHS * 30)
        task = rng.randrange(2)
        proc = launch(root / policy, policy, env={INJECT_ENV: f"signal@step:{task}:{step}"}, check=False)
        assert proc.returncode == EXIT_REQUEUE, proc.stderr
        assert "hpc-mto resume" in proc.stderr
        assert not (root / policy / "result.json").exists()
    return root, steps


@pytest.mark.parametrize("policy", list(MODES))
def test_resumed_run_is_bitwise_identical_to_uninterrupted(policy, reference, interrupted, tmp_path):
    root, steps = interrupted
    run_dir = tmp_path / policy
    subprocess.run(["cp", "-a", str(root / policy), str(run_dir)], check=True)
    # Every task stopped at the same step and checkpointed it.
    newest = [checkpoint.steps(run_dir / "checkpoints", t)[-1] for t in range(2)]
    assert newest == [stop_step(steps[policy])] * 2
    run_cli("resume", run_dir, "--no-progress")
    assert outcome(run_dir) == outcome(reference[policy])
    assert same_model(run_dir, reference[policy])


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)
    data[middle + 100] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_newest_checkpoint_is_reported_and_the_previous_round_used(reference, interrupted, tmp_path):
    root, steps = interrupted
    run_dir = tmp_path / "damaged"
    subprocess.run(["cp", "-a", str(root / "best"), str(run_dir)], check=True)
    ckpts = run_dir / "checkpoints"
    stopped_at = stop_step(steps["best"])
    corrupt(checkpoint.path_for(ckpts, 1, stopped_at))
    newest0 = checkpoint.path_for(ckpts, 0, stopped_at)
    os.truncate(newest0, newest0.stat().st_size // 2)
    step, notes = checkpoint.newest_common(ckpts, 2)
    assert step is not None and step < stopped_at
    assert any("task 1" in n and ("checksum" in n or "unreadable" in n) for n in notes), notes
    assert any("task 0" in n and "unreadable" in n for n in notes), notes
    proc = run_cli("resume", run_dir, "--no-progress")
    assert f"ignoring checkpoint step {stopped_at}" in proc.stderr
    # Going back a round loses work but not exactness.
    assert outcome(run_dir) == outcome(reference["best"])


def test_external_signal_to_the_launcher_stops_resumably_and_resume_is_exact(reference, tmp_path):
    run_dir = tmp_path / "external"
    hold = Hold(tmp_path, 0, 40)  # in the second epoch (31 steps each)
    proc = subprocess.Popen([HPC_MTO, "launch", "--run-dir", str(run_dir), *MODES["best"], *map(str, COMMON)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **hold.env})
    hold.wait(proc)
    proc.send_signal(signal.SIGTERM)
    hold.release()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_REQUEUE, err
    assert not (run_dir / "result.json").exists()
    run_cli("resume", run_dir, "--no-progress")
    assert outcome(run_dir) == outcome(reference["best"])


@pytest.mark.parametrize("policy", list(MODES))
def test_file_exchange_gives_the_same_bits_as_mpi(policy, reference, tmp_path):
    run_dir = tmp_path / policy
    launch(run_dir, policy, "--set", "transfer.backend=file")
    assert outcome(run_dir) == outcome(reference[policy])
    assert same_model(run_dir, reference[policy])
    # Old exchanges are cleaned up: at most the last two rounds' (or pulls') files remain.
    for kind in ("round-*", "average-*"):
        left = {p.name.split("-")[1] for p in (run_dir / "exchange").glob(kind) if any(p.iterdir())}
        assert len(left) <= 2, left


def test_file_exchange_replaces_a_missing_peer_by_its_checkpoint_and_never_blocks(tmp_path):
    """Task 1 stops for good in epoch 2; task 0 goes on with task 1's checkpointed blocks, logs how
    stale they were, and gives up at the final selection with a message naming task 1; a resume
    (peer back) finishes the run."""
    run_dir = tmp_path / "missing"
    started = time.monotonic()
    proc = launch(run_dir, "best", "--set", "transfer.backend=file", "--set", "transfer.peer_timeout=2",
                  env={INJECT_ENV: "signal@step:1:40"}, check=False)
    assert proc.returncode != 0 and time.monotonic() - started < 120
    assert "task 1 published nothing for final" in proc.stderr
    assert len(read_jsonl(run_dir / "metrics" / "task-0.jsonl")) == EPOCHS  # task 0 was never blocked
    stale = [d["stale"] for d in read_jsonl(run_dir / "transfers" / "task-0.jsonl") if d["stale"]]
    # A round that came before task 1's first checkpoint has no stand-in (rounds_behind None); the
    # later ones use its checkpoint, at least one round old.
    behind = [s[0]["rounds_behind"] for s in stale]
    assert stale and all(s[0]["task"] == 1 for s in stale), stale
    assert all(b is None or b >= 1 for b in behind) and any(b is not None for b in behind), stale
    run_cli("resume", run_dir, "--set", "transfer.peer_timeout=300", "--no-progress")
    # config.yaml keeps its provenance header and notes the resume's change.
    header = [line for line in (run_dir / "config.yaml").read_text().splitlines() if line.startswith("#")]
    assert header[0].startswith("# hpc-mto ") and header[1].startswith("# launched ")
    assert header[-1].endswith(" with: transfer.peer_timeout=300") and "peer_timeout: 300" in \
        (run_dir / "config.yaml").read_text()
    r = result(run_dir)
    assert r["selected"]["index"] == max(range(4), key=lambda i: (sum(r["cv_acc"][i]), -i))


def test_signals_during_a_transfer_and_during_a_checkpoint_still_leave_resumable_states(reference, tmp_path):
    """The handler only raises a flag: the round or the write in progress completes, every task
    stops at the next step with a consistent checkpoint, and the resumed run is still exact.
    First stop: during task 1's transfer round 2; second (after a resume): during task 0's
    checkpoint at the end of epoch 3 (global step 93)."""
    run_dir = tmp_path / "stopped"
    env = {INJECT_ENV: "signal@transfer:1:2,signal@checkpoint:0:93"}
    proc = launch(run_dir, "best", env=env, check=False)
    assert proc.returncode == EXIT_REQUEUE, proc.stderr
    proc = run_cli("resume", run_dir, "--no-progress", env=env, check=False)
    assert proc.returncode == EXIT_REQUEUE, proc.stderr
    assert checkpoint.steps(run_dir / "checkpoints", 0)[-1] == stop_step(94)  # the first check after the write
    run_cli("resume", run_dir, "--no-progress")
    assert outcome(run_dir) == outcome(reference["best"])


# transfer.candidates: K=3 tasks each score one peer per round, drawn from (seed, round, task).
SAMPLED = ["--splits", 3, "--set", "train.epochs=3", "--set", "transfer.policy=best", "--set", "transfer.interval=1",
           "--set", "transfer.min_samples=20", "--set", "transfer.candidates=1", "--set", "checkpoint.every=0",
           "--no-progress"]


def test_sampled_candidates_give_the_same_bits_on_files_as_on_mpi_and_resume_exactly(tmp_path):
    """Each task scores (and the log names) exactly the peer drawn for it; the file backend makes
    MPI's decisions bit for bit; a run stopped by a signal and resumed draws the same peers and ends
    where the uninterrupted one does."""
    from hpc_mto.transfer import scored_peers

    mpi, files, stopped = tmp_path / "mpi", tmp_path / "files", tmp_path / "stopped"
    run_cli("launch", "--run-dir", mpi, *SAMPLED)
    for t in range(3):
        decisions = read_jsonl(mpi / "transfers" / f"task-{t}.jsonl")
        assert [d["round"] for d in decisions] == [1, 2]  # none after the last epoch
        for d in decisions:
            assert d["peers"] == scored_peers(0, d["round"], t, 3, 1), d
            unscored = [j for j in range(3) if j not in d["peers"] + [t]]
            assert all(d["scores"][j] is None and d["samples"][j] == 0 for j in unscored), d
    run_cli("launch", "--run-dir", files, *SAMPLED, "--set", "transfer.backend=file")
    assert outcome(files) == outcome(mpi) and same_model(files, mpi)
    proc = run_cli("launch", "--run-dir", stopped, *SAMPLED, env={INJECT_ENV: "signal@step:2:40"}, check=False)
    assert proc.returncode == EXIT_REQUEUE, proc.stderr
    run_cli("resume", stopped, "--no-progress")
    assert outcome(stopped) == outcome(mpi) and same_model(stopped, mpi)
