"""Real runs on the local SLURM cluster (slurm/cluster-up.sh): gang and array launches, preemption
with requeue, cancel and resume. Each must end bitwise where an uninterrupted local run ends."""

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import HPC_MTO, Hold, result, run_cli

from hpc_mto.model_io import read_weights


def slurm_reachable() -> bool:
    try:
        return subprocess.run(["sinfo"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


if not slurm_reachable():
    if os.environ.get("CI"):
        pytest.fail("CI is set but no SLURM cluster answers (sinfo failed): .ci/run starts one with "
                    "slurm/cluster-up.sh", pytrace=False)
    pytest.skip("no SLURM cluster answers (sinfo failed); start one with slurm/cluster-up.sh",
                allow_module_level=True)

pytestmark = [pytest.mark.slurm, pytest.mark.mpi]

# digits, K=2, batch 4: 8 epochs of ~243 steps. Drills that act on a live job hold task 0 at a step of
# its second epoch (faults: hold) until they have acted, however fast the machine.
CONFIG = ["--splits", 2, "--set", "train.epochs=8", "--set", "train.batch_size=4", "--no-progress"]
# --time >= 11: at 10 minutes or less submitit counts every USR2 as a time-out.
SLURM = ["--executor", "slurm", "--partition", "gpu", "--time", 11]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted local run (mpiexec) of the same config: what every SLURM run must reproduce."""
    run_dir = tmp_path_factory.mktemp("local") / "run"
    run_cli("launch", "--executor", "local", "--run-dir", run_dir, *CONFIG)
    return run_dir


def assert_same_model(run_dir: Path, reference: Path) -> None:
    got, want = result(run_dir), result(reference)
    assert got["cv_acc"] == want["cv_acc"]
    assert got["selected"]["id"] == want["selected"]["id"]
    a, b = (read_weights(d / "model.safetensors") for d in (run_dir, reference))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def job_ids(run_dir: Path) -> list[str]:
    return json.loads((run_dir / "slurm" / "jobs.json").read_text())["jobs"]


def accounting(job: str) -> list[str]:
    """The job's state in each of its runs, oldest first (a requeue ends a run as REQUEUED)."""
    out = subprocess.run(["sacct", "-X", "-D", "-n", "-P", "-o", "State", "-j", job], capture_output=True,
                         text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines()]


def logs(run_dir: Path, job: str) -> str:
    return "".join(p.read_text() for p in sorted((run_dir / "slurm").glob(f"{job}_*_log.err")))


def test_gang_launch_trains_on_slurm_and_ends_where_a_local_run_ends(tmp_path, reference):
    run_dir = tmp_path / "run"
    out = run_cli("launch", *SLURM, "--run-dir", run_dir, *CONFIG, "--wait").stdout
    [job] = job_ids(run_dir)
    assert f"submitted SLURM job {job}" in out and f"job {job}: COMPLETED" in out
    assert re.search(rf"^output \w+ \(.*\): estimated acc .* single model task-\d/\w+ by cv_mean: .*; "
                     rf"run dir {run_dir}$", out, re.M)
    assert accounting(job) == ["COMPLETED"]
    assert_same_model(run_dir, reference)
    # Every task logs into the run directory, and what was submitted is what --dry-run prints.
    assert {p.name for p in (run_dir / "slurm").glob("*_log.err")} == {f"{job}_0_log.err", f"{job}_1_log.err"}
    dry = run_cli("launch", *SLURM, "--run-dir", run_dir, *CONFIG, "--dry-run").stdout
    assert (run_dir / "slurm" / f"{job}_submission.sh").read_text() == dry


def test_array_launch_runs_one_job_per_split_and_ends_where_a_local_run_ends(tmp_path, reference):
    run_dir = tmp_path / "run"
    run_cli("launch", *SLURM, "--array", "--run-dir", run_dir, *CONFIG, "--wait")
    ids = job_ids(run_dir)
    assert len(ids) == 2 and ids[0].split("_")[0] == ids[1].split("_")[0]
    assert [accounting(job) for job in ids] == [["COMPLETED"], ["COMPLETED"]]
    assert "backend: file" in (run_dir / "config.yaml").read_text()
    assert_same_model(run_dir, reference)


def test_preempted_gang_job_is_requeued_resumes_and_ends_bitwise_where_an_uninterrupted_run_ends(
        tmp_path, reference):
    run_dir = tmp_path / "run"
    hold = Hold(tmp_path, 0, 400)
    launcher = subprocess.Popen([HPC_MTO, "launch", *map(str, SLURM), "--run-dir", run_dir, *map(str, CONFIG),
                                 "--wait"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **hold.env})
    hold.wait(launcher)
    [job] = job_ids(run_dir)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)  # what SLURM sends before preemption
    hold.release()
    out, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, out + err
    assert accounting(job) == ["REQUEUED", "COMPLETED"], logs(run_dir, job)
    assert f"job {job}: COMPLETED, requeued 1 time" in out
    log = logs(run_dir, job)
    assert f"requeued job {job} (requeue 1 of at most" in log
    # Both ranks stopped at the same step and came back from that checkpoint, not from the start.
    resumed = re.findall(r"resumed at epoch \d+ step \d+ \(global step (\d+)\)", log)
    assert len(resumed) == 2 and resumed[0] == resumed[1] != "0", log
    assert_same_model(run_dir, reference)


def test_status_and_cancel_act_on_a_live_job_and_resume_finishes_the_run(tmp_path, reference):
    run_dir = tmp_path / "run"
    # Task 0 holds in its second epoch; task 1, at most 10 steps ahead of it, has logged its first.
    hold = Hold(tmp_path, 0, 400)
    out = run_cli("launch", *SLURM, "--run-dir", run_dir, *CONFIG, env=hold.env).stdout  # returns once submitted
    [job] = job_ids(run_dir)
    assert f"submitted SLURM job {job}" in out and f"hpc-mto status {run_dir}" in out
    hold.wait()
    status = run_cli("status", run_dir).stdout
    assert f"job {job}: RUNNING" in status and re.search(r"^task 1: epoch [1-8]/8 ", status, re.M), status
    refused = run_cli("resume", run_dir, check=False)
    assert refused.returncode == 2 and refused.stderr.startswith(f"hpc-mto: error: run {run_dir} still has")
    assert f"cancelled SLURM job {job}" in run_cli("cancel", run_dir).stdout
    hold.release()
    deadline = time.monotonic() + 60
    while f"job {job}: CANCELLED" not in run_cli("status", run_dir).stdout:
        assert time.monotonic() < deadline, "the job did not end within 60s of hpc-mto cancel"
        time.sleep(0.5)
    # The cancel's TERM made every task checkpoint; it did not requeue the job.
    assert logs(run_dir, job).count("checkpoint written") == 2 and accounting(job) == ["CANCELLED"]
    out = run_cli("resume", run_dir, "--wait", "--no-progress").stdout
    [again] = job_ids(run_dir)
    assert again != job and f"job {again}: COMPLETED" in out
    assert_same_model(run_dir, reference)


def test_a_gang_whose_mpi_world_does_not_come_up_starts_again_and_ends_where_a_local_run_ends(tmp_path, reference):
    """Rank 1 dies before it joins MPI in the job's first step, as a rank whose MPI_Init fails does: the
    batch script starts the tasks again in a new step of the same job, and the run finishes as if
    nothing had happened. (A failure once the world is up is not repeated: test_slurm_nodes.)"""
    run_dir = tmp_path / "run"
    run_cli("launch", *SLURM, "--run-dir", run_dir, *CONFIG, "--wait", env={"HPC_MTO_INJECT": "kill@start:1:0"})
    [job] = job_ids(run_dir)
    assert accounting(job) == ["COMPLETED"]
    assert "the MPI world did not come up (srun exit" in logs(run_dir, job)
    out = subprocess.run(["sacct", "-n", "-P", "-o", "JobID,State", "-j", job], capture_output=True, text=True,
                         check=True).stdout
    steps = dict(line.split("|") for line in out.splitlines())
    assert steps[f"{job}.0"] != "COMPLETED" and steps[f"{job}.1"] == "COMPLETED", steps
    assert_same_model(run_dir, reference)
