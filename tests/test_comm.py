"""The file exchange with late peers: a peer that stays away costs one timeout, not one per round; a
peer already past an exchange is not waited for; what stands in for a late peer never comes from a
round later than the one being played; and a late array element, started after its peer finished,
catches up without blocks from the future and the run completes with one resume."""

import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import read_jsonl, result, run_cli
from hpc_mto import checkpoint, config
from hpc_mto.comm import FileComm
from hpc_mto.prepare import prepare
from hpc_mto.rundir import RunDir
from hpc_mto.samples import Arrays
from hpc_mto.task import Task
from hpc_mto.transfer import CheckpointFallback, layout_of

BLOCKS = np.zeros(4, np.float32)


class StandIn:
    """A fallback that covers the rounds and records what it stood in for."""

    def __init__(self, ahead=False):
        self.used, self.is_ahead = [], ahead

    def covers(self, tag):
        return tag.startswith("round-")

    def ahead(self, peer, tag):
        return self.is_ahead

    def __call__(self, peer, tag):
        self.used.append((peer, tag))
        return np.full(4, 7, np.float32), {"task": peer, "finite": True}


def exchange(comm, tag):
    """Each task's blocks and meta of one exchange, copied out of the reused buffer."""
    return [(j, buf.copy(), meta) for j, buf, meta in comm.candidates(tag, BLOCKS, {"task": comm.rank})]


def test_a_peer_that_let_one_exchange_time_out_is_not_waited_for_again_until_it_returns(tmp_path):
    stand_in = StandIn()
    comm = FileComm(tmp_path, 0, 2, timeout=2.0, fallback=stand_in)
    t0 = time.monotonic()
    first = exchange(comm, "round-00001")
    waited = time.monotonic() - t0
    t0 = time.monotonic()
    exchange(comm, "round-00002")
    assert waited >= 2.0 and time.monotonic() - t0 < 1.0
    assert first[1][2]["stale"] and stand_in.used == [(1, "round-00001"), (1, "round-00002")]
    FileComm(tmp_path, 1, 2, timeout=2.0).publish("round-00003", np.ones(4, np.float32), {"task": 1})
    _, blocks, meta = exchange(comm, "round-00003")[1]  # back: read, not stood in for
    assert np.array_equal(blocks, np.ones(4)) and not meta.get("stale")


def test_a_peer_already_past_the_exchange_is_stood_in_for_at_once(tmp_path):
    comm = FileComm(tmp_path, 0, 2, timeout=30.0, fallback=StandIn(ahead=True))
    t0 = time.monotonic()
    exchange(comm, "round-00001")
    assert time.monotonic() - t0 < 5.0


def test_nothing_stands_in_for_a_peer_missing_from_the_final_selection(tmp_path):
    from hpc_mto.errors import PeerMissing

    comm = FileComm(tmp_path, 0, 2, timeout=0.2, fallback=StandIn())
    with pytest.raises(PeerMissing, match="task 1 published nothing for final-best"):
        exchange(comm, "final-best")


def small_task(cfg, index: int) -> Task:
    x = np.random.default_rng(index).normal(size=(16, 1, 8, 8)).astype(np.float32)
    data = Arrays.of(x, np.arange(16) % 10, "cpu")
    return Task(cfg, index, data, data, data, (1, 8, 8), 10, "cpu")


def test_a_stand_in_never_comes_from_a_later_round_than_the_one_being_played(tmp_path):
    cfg = config.load(None, ["transfer.policy=best", "transfer.interval=1", "train.batch_size=16"])  # 1 step/epoch
    peer = small_task(cfg, 1)
    for epoch in (2, 4, 6):
        peer.epoch = epoch
        checkpoint.save(tmp_path, 1, peer.global_step, peer.state_dict())
    me = small_task(cfg, 0)
    fallback = CheckpointFallback(tmp_path, cfg.transfer)
    fallback.bind(me)
    me.epoch = 5
    blocks, meta = fallback(1, "round-00005")
    assert meta["rounds_behind"] == 1  # the checkpoint at epoch 4, not 6
    assert np.array_equal(blocks, layout_of(peer, cfg.transfer).from_entries(
        checkpoint.load(checkpoint.path_for(tmp_path, 1, 4)).arrays))
    me.epoch = 1
    _, meta = fallback(1, "round-00001")
    assert meta.get("missing") and not meta["finite"]  # nothing that old: no blocks at all
    assert fallback.ahead(1, "round-00001")  # the peer checkpointed past epoch 1
    me.epoch = 6
    assert not fallback.ahead(1, "round-00006")


@pytest.mark.mpi
def test_a_late_array_element_catches_up_without_blocks_from_the_future(tmp_path):
    """Task 0 trains to its end alone (its peer not yet started) and gives up at the final selection;
    then task 1 runs: round 1's exchange is gone (task 0 released it) and task 0's checkpoints are all
    later, so round 1 goes on with no blocks from task 0, logged as stale; rounds 2 and 3 read task 0's
    blocks of those very rounds. One resume, with both back, completes the selection."""
    run = RunDir(tmp_path / "late")
    prepare(run, config.load(None, ["splits=2", "train.epochs=4", "transfer.policy=best", "transfer.interval=1",
                                     "transfer.backend=file", "transfer.peer_timeout=3", "transfer.min_samples=20"]))
    worker = [sys.executable, "-m", "hpc_mto.worker", str(run.path), "--task"]
    first = subprocess.run(worker + ["0"], capture_output=True, text=True, timeout=300)
    assert first.returncode == 4 and "task 1 published nothing for final" in first.stderr
    second = subprocess.run(worker + ["1"], capture_output=True, text=True, timeout=300)
    assert second.returncode == 4 and "task 0 published nothing for final" in second.stderr
    decisions = read_jsonl(run.path / "transfers" / "task-1.jsonl")
    assert [d["stale"] for d in decisions] == [[{"task": 0, "rounds_behind": None}], [], []], decisions
    assert decisions[0]["scores"][0] is None  # nothing to compare with, nothing adopted
    assert "selection pending: every task finished training" in run_cli("status", run.path).stdout
    run_cli("resume", run.path, "--no-progress")
    assert result(run.path)["k"] == 2
