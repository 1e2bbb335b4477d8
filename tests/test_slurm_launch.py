"""The SLURM launcher without a cluster: the sbatch script it generates, the names it lets through,
and how it derives the job's shape from the request."""

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hpc_mto.cli import main
from hpc_mto.errors import LaunchError
from hpc_mto.launchers.slurm_queries import NodeKind, lost_node, parse_gpus
from hpc_mto.launchers.slurm_request import (MPI_START_ATTEMPTS, Request, executor_parameters, layout,
                                         mpi_start_retry)

GOLDEN = Path(__file__).parent / "golden"


def cli(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def dry_run(run_dir, *args):
    result = cli("launch", "--executor", "slurm", "--dry-run", "--run-dir", run_dir, *args)
    assert result.exit_code == 0, result.output
    # The golden text must not depend on where the venv or the test's tmp dir are.
    return result.stdout.replace(str(run_dir.absolute()), "<run_dir>").replace(sys.executable, "<python>")


@pytest.mark.parametrize("name, args", [
    ("gang", ["--partition", "gpu", "--splits", 4, "--tasks-per-node", 2, "--time", 30, "--mem", "8G",
              "--account", "proj1", "--qos", "normal", "--constraint", "a100&ib"]),
    ("array", ["--partition", "gpu", "--splits", 3, "--array", "--gpus-per-task", 0, "--cpus-per-task", 2]),
])
def test_dry_run_prints_the_golden_sbatch_script_and_writes_nothing(tmp_path, name, args):
    run_dir = tmp_path / "run"
    assert dry_run(run_dir, *args) == (GOLDEN / f"sbatch_{name}.txt").read_text()
    assert not run_dir.exists()


@pytest.mark.parametrize("field, value", [
    ("partition", "gpu;rm -rf ~"), ("partition", "gpu\n#SBATCH --wrap=x"), ("account", "a b"),
    ("qos", "-normal"), ("constraint", "a100$(id)"), ("mem", "8 G"), ("mpi", "pmi2 --x"),
])
def test_values_outside_the_safe_set_never_reach_sbatch(field, value):
    with pytest.raises(LaunchError, match=f"invalid --{field.replace('_', '-')}"):
        Request(**{field: value})


def test_slurm_expressions_in_the_safe_set_are_accepted():
    Request(partition="gpu-a100_x.1", account="proj+1", constraint="[rack1|rack2]&ib", mem="16000M")


def test_a_bad_value_is_one_line_on_stderr_and_exit_2(tmp_path):
    result = cli("launch", "--executor", "slurm", "--dry-run", "--partition", "a;b", "--run-dir", tmp_path / "r")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("hpc-mto: error: invalid --partition")


def test_slurm_options_are_refused_for_a_local_run(tmp_path):
    result = cli("launch", "--executor", "local", "--gpus-per-task", 0, "--run-dir", tmp_path / "r")
    assert result.exit_code == 2 and "--gpus-per-task: only for --executor slurm" in result.stderr


def test_slurm_is_the_default_executor_where_sbatch_is_on_path_and_a_partition_is_given(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\nexit 1\n")  # only found, never run by a dry run
    (bin_dir / "sbatch").chmod(0o755)
    args = ["launch", "--dry-run", "--partition", "gpu", "--nodes", 1, "--run-dir", tmp_path / "r"]
    monkeypatch.setenv("PATH", str(bin_dir))
    assert "#SBATCH --partition=gpu" in cli(*args).stdout
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch: a local run, where these options mean nothing
    assert "--partition, --nodes, --dry-run: only for --executor slurm" in cli(*args).stderr


def test_without_sbatch_a_slurm_launch_fails_in_one_line_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    result = cli("launch", "--executor", "slurm", "--partition", "gpu", "--run-dir", tmp_path / "r")
    assert result.exit_code == 2
    assert result.stderr == "hpc-mto: error: sbatch not found on PATH: no SLURM here (use --executor local)\n"
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("k, kinds, req, expected", [
    (8, [NodeKind(cpus=64, gpus=4)], Request(), (2, 4)),  # GPUs per node decide
    (5, [NodeKind(cpus=64, gpus=2)], Request(), (3, 2)),  # the last node is not full: --ntasks says 5
    (6, [NodeKind(cpus=8, gpus=0)], Request(gpus_per_task=0, cpus_per_task=2), (2, 4)),  # CPUs decide
    (2, [NodeKind(cpus=8, gpus=2)], Request(), (1, 2)),
    (4, [NodeKind(cpus=8, gpus=2), NodeKind(cpus=8, gpus=4)], Request(), (1, 4)),  # the largest node kind
    (8, None, Request(tasks_per_node=3), (3, 3)),
    (5, None, Request(nodes=2), (2, 3)),
    (4, None, Request(array=True), (1, 1)),
])
def test_layout_fits_the_gang_on_as_few_nodes_as_the_request_allows(k, kinds, req, expected):
    assert layout(k, req, req.cpus_per_task or 1, kinds) == expected


def test_a_task_no_node_can_hold_is_refused_before_submission():
    with pytest.raises(LaunchError, match="holds one task of 3 GPU.*largest node: 2 GPU"):
        layout(2, Request(gpus_per_task=3), 1, [NodeKind(cpus=8, gpus=2)])
    with pytest.raises(LaunchError, match="holds fewer than the 5 tasks"):
        layout(5, Request(nodes=2, tasks_per_node=2), 1, None)


def test_gang_parameters_make_one_mpi_world_of_exactly_k_tasks():
    p = executor_parameters(Request(partition="gpu"), 5, "hpc-mto-x", 1, [NodeKind(cpus=8, gpus=2)], Path("s"))
    assert p["additional_parameters"] == {"ntasks": 5}
    assert p["srun_args"] == ["--mpi=pmi2", "--kill-on-bad-exit=1"]  # a lost task ends the step
    assert (p["nodes"], p["ntasks_per_node"], p["gpus_per_task"]) == (3, 2, 1)


def test_gang_shape_options_are_refused_with_array_jobs(tmp_path):
    result = cli("launch", "--executor", "slurm", "--dry-run", "--run-dir", tmp_path / "run", "--array",
                 "--nodes", 2)
    assert result.exit_code == 2 and "with --array every job is one task on one node" in result.stderr


def test_array_parameters_are_one_single_task_job_per_split():
    p = executor_parameters(Request(array=True, gpus_per_task=0), 4, "hpc-mto-x", 3, None, Path("s"))
    assert (p["nodes"], p["ntasks_per_node"], p["cpus_per_task"]) == (1, 1, 3)  # CPUs default to threads
    assert not {"srun_args", "additional_parameters", "gpus_per_task", "setup"} & p.keys()


FAKE_SRUN = """#!/bin/bash
# What the batch script's srun would do, one line of $PLAN per call: fail before the MPI world is up,
# fail after it is up, or succeed.
n=$(( $(cat "$CALLS" 2>/dev/null || echo 0) + 1 )); echo $n > "$CALLS"; echo "$@" >> "$CALLS.args"
case $(sed -n ${n}p "$PLAN") in
  fail) exit 7;;
  fail-up) touch "$HPC_MTO_MPI_UP"; exit 9;;
  *) touch "$HPC_MTO_MPI_UP"; exit 0;;
esac
"""


@pytest.mark.parametrize("plan, calls, rc", [
    (["fail", "ok"], 2, 0),                # a failed start is tried again, and the run goes on
    (["fail", "fail", "fail", "ok"], MPI_START_ATTEMPTS, 7),  # at most this many times
    (["fail-up", "ok"], 1, 9),             # a failure once the world is up is the run's own: not repeated
    (["ok"], 1, 0),
])
def test_the_batch_script_starts_the_tasks_again_only_while_their_mpi_world_has_not_come_up(
        tmp_path, plan, calls, rc):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text(FAKE_SRUN)
    (tmp_path / "bin" / "srun").chmod(0o755)
    (tmp_path / "plan").write_text("\n".join(plan) + "\n")
    script = "\n".join([*mpi_start_retry(tmp_path / "slurm"), "srun --mpi=pmi2 'two words'", "echo rc=$?"])
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "SLURM_JOB_ID": "42", "PLAN": str(tmp_path / "plan"),
           "CALLS": str(tmp_path / "calls")}
    (tmp_path / "slurm").mkdir()
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env)
    assert done.stdout == f"rc={rc}\n"
    assert int((tmp_path / "calls").read_text()) == calls
    assert (tmp_path / "calls.args").read_text() == "--mpi=pmi2 two words\n" * calls  # arguments kept
    assert done.stderr.count("the MPI world did not come up (srun exit 7)") == calls - 1


@pytest.mark.parametrize("gres, gpus", [("gpu:2", 2), ("gpu:a100:4(S:0-1)", 4), ("gpu:a:2,gpu:b:1", 3),
                                        ("(null)", 0), ("mps:100,gpu:1", 1)])
def test_gpus_per_node_are_read_from_sinfo_gres(gres, gpus):
    assert parse_gpus(gres) == gpus


SRUN_STDERR = """srun: error: n2: task 3: Killed
srun: launch/slurm: _step_signal: Terminating StepId=6.0
slurmstepd-n1: error: *** STEP 6.0 ON n1 CANCELLED AT 2026-12-01T12:22:06 ***
srun: error: n2: task 2: Killed
srun: error: n1: tasks 0-1: Killed
"""


def test_the_lost_node_and_all_its_tasks_are_read_from_srun_errors():
    assert lost_node(SRUN_STDERR) == ("n2", [2, 3], "Killed")  # task 2 noticed after the step ended
    assert lost_node("srun: error: gpu07: task 5: Exited with exit code 1\n") == ("gpu07", [5],
                                                                                 "Exited with exit code 1")
    assert lost_node("srun: error: a: tasks 0,2-3: Killed\n")[1] == [0, 2, 3]
    assert lost_node("all well\n") is None


@pytest.mark.parametrize("text, minutes", [("90", 90), ("1:30", 2), ("1:30:00", 90), ("2-00:00:00", 2880),
                                           ("1-12", 2160), ("0-0:45", 45), (120, 120)])
def test_time_takes_slurms_formats_in_whole_minutes(text, minutes):
    assert Request(time=text).minutes == minutes


@pytest.mark.parametrize("text", ["1h", "1:2:3:4", "-5", "0", "0:00:30x"])
def test_a_time_slurm_would_not_read_is_refused(text):
    with pytest.raises(LaunchError, match="--time"):
        Request(time=text)


def test_site_options_pass_through_to_the_job_script(tmp_path):
    """--sbatch-arg (KEY=VALUE, KEY= for a flag), --setup lines before the tasks start, and
    --array-parallelism reach the script; the MPI start-up wrapper still follows the user's lines."""
    array = dry_run(tmp_path / "a", "--partition", "gpu", "--splits", 3, "--array", "--array-parallelism", 2,
                    "--sbatch-arg", "reservation=r1", "--sbatch-arg", "exclusive=", "--setup", "module load cuda/12")
    assert {"#SBATCH --array=0-2%2", "#SBATCH --reservation=r1", "#SBATCH --exclusive"} <= set(array.splitlines())
    assert "# setup\nmodule load cuda/12\n" in array
    gang = dry_run(tmp_path / "g", "--partition", "gpu", "--splits", 2, "--tasks-per-node", 2,
                   "--setup", "module load cuda/12", "--setup", "export NCCL_DEBUG=WARN")
    assert "# setup\nmodule load cuda/12\nexport NCCL_DEBUG=WARN\n# hpc-mto: start the tasks again" in gang
    assert "#SBATCH --ntasks=2" in gang.splitlines()


@pytest.mark.parametrize("args, message", [
    (["--sbatch-arg", "time=5"], "hpc-mto sets --time itself"),
    (["--sbatch-arg", "wrap=rm -rf ~"], "use KEY=VALUE"),
    (["--sbatch-arg", "comment=a\nb"], "use KEY=VALUE"),
    (["--sbatch-arg", "export=NONE"], "--export would change how the job runs its tasks"),
    (["--setup", "module load a\nrm -rf ~"], "one non-empty line of shell per --setup"),
    (["--array-parallelism", 2], "--array-parallelism needs --array"),
])
def test_site_options_that_would_break_the_job_are_refused(tmp_path, args, message):
    result = cli("launch", "--executor", "slurm", "--dry-run", "--partition", "gpu", "--run-dir", tmp_path / "r", *args)
    assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr
