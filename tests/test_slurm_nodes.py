"""Beyond one node, on the local cluster's virtual nodes (SLURM_NODES=2 slurm/cluster-up.sh, as in
CI): a gang across two nodes, its preemption, the loss of a node, and a late array element. Each
run must end bitwise where an uninterrupted local run of the same config ends."""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import HPC_MTO, Hold, read_jsonl, result, run_cli
from test_slurm import SLURM, accounting, assert_same_model, job_ids


def nodes() -> list[str]:
    out = subprocess.run(["sinfo", "-h", "-N", "-p", "gpu", "-o", "%N"], capture_output=True, text=True).stdout
    return sorted(set(out.split()))


if len(nodes()) < 2:
    if os.environ.get("CI"):
        pytest.fail("CI is set but the cluster has fewer than 2 nodes: .ci/run starts it with SLURM_NODES=2",
                    pytrace=False)
    pytest.skip("needs a cluster of 2 nodes: SLURM_NODES=2 slurm/cluster-up.sh", allow_module_level=True)

pytestmark = [pytest.mark.slurm, pytest.mark.mpi]

# K=4, two tasks on each of two nodes; 6 epochs of ~122 steps. Drills hold a task at step 200 (its
# second epoch) until they have acted (faults: hold).
GANG = ["--nodes", 2, "--tasks-per-node", 2]
CONFIG = ["--splits", 4, "--set", "train.epochs=6", "--set", "train.batch_size=8", "--set", "checkpoint.every=0",
          "--no-progress"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("local4") / "run"
    run_cli("launch", "--executor", "local", "--run-dir", run_dir, *CONFIG)
    return run_dir


def step_nodes(job: str) -> str:
    out = subprocess.run(["sacct", "-n", "-P", "-o", "JobID,NodeList", "-j", job], capture_output=True,
                         text=True, check=True).stdout
    return dict(line.split("|") for line in out.splitlines())[f"{job}.0"]


def test_a_gang_across_two_nodes_ends_where_a_local_run_ends(tmp_path, reference):
    run_dir = tmp_path / "run"
    run_cli("launch", *SLURM, *GANG, "--run-dir", run_dir, *CONFIG, "--wait")
    [job] = job_ids(run_dir)
    assert step_nodes(job) == "n[1-2]" and accounting(job) == ["COMPLETED"]
    assert_same_model(run_dir, reference)


def test_a_preempted_two_node_gang_is_requeued_and_ends_where_a_local_run_ends(tmp_path, reference):
    run_dir = tmp_path / "run"
    hold = Hold(tmp_path, 0, 200)
    launcher = subprocess.Popen([HPC_MTO, "launch", *map(str, SLURM), *map(str, GANG), "--run-dir", run_dir,
                                 *map(str, CONFIG), "--wait"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={**os.environ, **hold.env})
    hold.wait(launcher)
    [job] = job_ids(run_dir)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    hold.release()
    out, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, out + err
    assert accounting(job) == ["REQUEUED", "COMPLETED"]
    assert_same_model(run_dir, reference)


def test_a_lost_node_ends_the_job_in_seconds_status_names_its_tasks_and_resume_is_exact(tmp_path, reference):
    """kill -9 of both ranks on n2 (what a node failure does to them): srun --kill-on-bad-exit ends the
    step instead of leaving the ranks on n1 spinning in an MPI collective until the time limit."""
    run_dir = tmp_path / "run"
    hold = Hold(tmp_path, 0, 200)
    run_cli("launch", *SLURM, *GANG, "--run-dir", run_dir, *CONFIG, env=hold.env)
    [job] = job_ids(run_dir)
    hold.wait()
    listed = subprocess.run(["scontrol", "listpids", f"{job}.0", "n2"], capture_output=True, text=True,
                            check=True).stdout.splitlines()[1:]
    pids = [line.split()[0] for line in listed if line.split()[3] != "-"]  # the tasks, not the step daemon
    assert len(pids) == 2, listed
    lost = time.monotonic()
    subprocess.run(["kill", "-9", *pids], check=True)
    hold.release()
    while f"job {job}: RUNNING" in run_cli("status", run_dir).stdout:
        assert time.monotonic() - lost < 60, "the job still runs a minute after losing a node"
        time.sleep(0.5)
    ended = time.monotonic() - lost
    status = run_cli("status", run_dir).stdout
    assert f"job {job}: node n2 (tasks 2, 3) ended the run" in status, status
    started = time.monotonic()
    run_cli("resume", run_dir, "--wait")
    print(f"\nnode lost -> job ended: {ended:.1f} s; resume -> run finished: {time.monotonic() - started:.1f} s")
    assert_same_model(run_dir, reference)


def test_a_late_array_element_never_takes_blocks_from_the_future_and_one_resume_completes(tmp_path, reference):
    """Element 1 is suspended after its first epoch (its processes stopped, as on an overloaded or
    paused node) while element 0 goes on with stand-ins and reaches the end; element 1, resumed
    later, catches up: no stand-in comes from a round later than its own, the rounds it played
    without fresh blocks are logged as stale. Both finished training, but apart: the status says the
    selection is pending, and one resume completes it."""
    run_dir = tmp_path / "run"
    hold = Hold(tmp_path, 1, 200)
    run_cli("launch", *SLURM, "--array", "--run-dir", run_dir, *CONFIG, "--set", "transfer.peer_timeout=4",
            "--set", "transfer.interval=1", env=hold.env)
    late = job_ids(run_dir)[1]
    hold.wait()
    subprocess.run(["scontrol", "suspend", late], check=True)
    hold.release()  # seen by element 1 once it is resumed
    deadline = time.monotonic() + 240
    while "RUNNING" in subprocess.run(["squeue", "-h", "-j", job_ids(run_dir)[0], "-o", "%T"], capture_output=True,
                                      text=True).stdout:
        assert time.monotonic() < deadline, "element 0 did not end while element 1 was suspended"
        time.sleep(1)
    subprocess.run(["scontrol", "resume", late], check=True)
    while subprocess.run(["squeue", "-h", "-j", late], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline + 240, "element 1 did not end after it was resumed"
        time.sleep(1)
    early = read_jsonl(run_dir / "transfers" / "task-0.jsonl")
    behind = [s["rounds_behind"] for d in early for s in d["stale"]]
    assert behind and all(b is None or b >= 0 for b in behind), behind  # element 0 went on without element 1
    assert all(s["rounds_behind"] is None or s["rounds_behind"] >= 0
               for d in read_jsonl(run_dir / "transfers" / "task-1.jsonl") for s in d["stale"])
    assert "selection pending" in run_cli("status", run_dir).stdout
    run_cli("resume", run_dir, "--wait")
    assert result(run_dir)["k"] == 4
    assert json.loads((run_dir / "slurm" / "jobs.json").read_text())["history"][-1]["jobs"] == job_ids(run_dir)
