"""Checkpoint files: atomic against kill -9 (in the foreground and in the background writer), damage
detected, exact state restored; a background write stores the state as it was when it began."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hpc_mto import checkpoint

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from write_checkpoints import big_task  # noqa: E402

WRITER = Path(__file__).parent / "helpers" / "write_checkpoints.py"


@pytest.mark.parametrize("mode", ["foreground", "background"])
def test_kill_9_while_writing_leaves_the_previous_checkpoint_loadable(tmp_path, mode):
    proc = subprocess.Popen([sys.executable, str(WRITER), str(tmp_path)] + (["background"] if mode == "background" else []),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "first written"
    task_dir = checkpoint.task_dir(tmp_path, 0)
    deadline = time.monotonic() + 60
    while not list(task_dir.glob(".step-*.tmp-*")):  # a newer checkpoint is being written now
        assert time.monotonic() < deadline
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(task_dir.glob(".step-*.tmp-*")), "the kill should have hit a write in progress"
    finished = checkpoint.steps(tmp_path, 0)
    assert finished, "the first checkpoint must survive"
    newest = checkpoint.path_for(tmp_path, 0, finished[-1])
    assert checkpoint.verify(newest) is None
    task = big_task()
    task.load_state_dict(checkpoint.load(newest))
    assert task.global_step == finished[-1]
    assert checkpoint.newest_common(tmp_path, 1)[0] == finished[-1]
    checkpoint.prune(tmp_path, 0, keep=2)  # the next save's pruning clears the killed writer's debris
    assert not list(task_dir.glob(".step-*.tmp-*"))


def test_save_and_load_restores_weights_optimizer_and_rng(tmp_path):
    task = big_task()
    task.train_steps(lambda: False)
    checkpoint.save(tmp_path, 0, task.global_step, task.state_dict())
    expected_next = torch.rand(3)
    other = big_task()
    other.load_state_dict(checkpoint.load(checkpoint.path_for(tmp_path, 0, task.global_step)))
    assert torch.equal(torch.rand(3), expected_next)  # the RNG continues where it was saved
    for a, b in zip(task.model.state_dict().values(), other.model.state_dict().values()):
        assert torch.equal(a, b)
    sa, sb = task.optimizer.state_dict()["state"], other.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert other.counters() == task.counters()


def test_prune_keeps_the_newest(tmp_path):
    task = big_task()
    for epoch in range(4):
        task.epoch = epoch
        checkpoint.save(tmp_path, 0, task.global_step, task.state_dict())
        checkpoint.prune(tmp_path, 0, keep=2)
    assert checkpoint.steps(tmp_path, 0) == [2 * task.steps_per_epoch, 3 * task.steps_per_epoch]


def test_a_background_write_stores_the_state_as_it_was_when_it_began(tmp_path):
    """Training goes on while the thread writes: the checkpoint must hold the snapshot, not the
    weights and moments the steps after it wrote into the same tensors."""
    task = big_task()
    task.train_steps(lambda: False)
    step = task.global_step
    expected = {k: v.clone() for k, v in task.model.state_dict().items()}
    expected_opt = {i: {k: t.clone() for k, t in st.items()} for i, st in task.optimizer.state_dict()["state"].items()}
    writer = checkpoint.BackgroundWriter()
    writer.start(tmp_path, 0, step, task.state_dict())
    task.finish_epoch()
    task.train_steps(lambda: False)  # overwrites the live tensors in place, very likely mid-write
    assert writer.wait() == checkpoint.path_for(tmp_path, 0, step)
    changed = [k for k, v in task.model.state_dict().items() if not torch.equal(v, expected[k])]
    assert changed, "training should have changed the live weights"
    other = big_task()
    other.load_state_dict(checkpoint.load(checkpoint.path_for(tmp_path, 0, step)))
    assert all(torch.equal(v, expected[k]) for k, v in other.model.state_dict().items())
    got = other.optimizer.state_dict()["state"]
    assert all(torch.equal(got[i][k], expected_opt[i][k]) for i in expected_opt for k in expected_opt[i])


def test_a_failed_background_write_is_raised_at_the_next_wait_and_leaves_no_file(tmp_path):
    task = big_task()
    writer = checkpoint.BackgroundWriter()
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")  # the task directory cannot be made under a file
    writer.start(blocked, 0, 5, task.state_dict())
    with pytest.raises(OSError):
        writer.wait()
    assert writer.wait() is None  # raised once; the writer can be used again
    writer.start(tmp_path, 0, 5, task.state_dict())
    assert writer.wait() == checkpoint.path_for(tmp_path, 0, 5)
