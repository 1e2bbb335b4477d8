"""Bad input, faults and trust: every user error is one clear line and a non-zero exit with no
traceback; no fault loses a checkpoint or a result; nothing the tool reads can execute code."""

import json
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import HPC_MTO, read_jsonl, result, run_cli
from hpc_mto import checkpoint
from hpc_mto.cli import main
from hpc_mto.errors import RunDirError
from hpc_mto.faults import ENV as INJECT_ENV
from hpc_mto.model_io import load_selected
from hpc_mto.prepare import prepare
from hpc_mto.rundir import RunLock

ROOT = Path(__file__).parent.parent
PKG = ROOT / "hpc_mto"


def npz(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


def h5(path: Path, **arrays) -> str:
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v)
    return str(path)


def user_error(*args) -> str:
    """Run the CLI in-process; assert it failed as a user error; return the one line it printed."""
    res = CliRunner().invoke(main, list(map(str, args)))
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert res.exit_code == 2, (res.exit_code, res.output)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.output, res.stderr
    return lines[0]


X = np.random.default_rng(0).normal(size=(60, 5)).astype(np.float32)
Y = np.arange(60) % 3

DATA_CASES = {
    "missing data_root": (["--set", "data.name=mnist"], "set data.data_root"),
    "augment a 1-D dataset": (["--set", "data.name=mnist1d", "--set", "data.augment=standard"],
                              "data.augment=standard is for the built-in image datasets (digits, mnist, "
                              "fashion_mnist, cifar10, cifar100), not mnist1d"),
    "absent data_root": (["--set", "data.name=mnist", "--set", "data.data_root=/nonexistent/x"], "does not exist"),
    "empty data_root": (["--set", "data.name=fashion_mnist", "--set", "data.data_root={tmp}"], "not found under"),
    "missing file": (["--set", "data.name=npz", "--set", "data.path={tmp}/none.npz"], "does not exist"),
    "no path": (["--set", "data.name=hdf5"], "needs data.path"),
    "npz without y": (["--set", "data.name=npz", "--set", "data.path={npz_no_y}"], "lacks array(s) y"),
    "hdf5 without x": (["--set", "data.name=hdf5", "--set", "data.path={h5_no_x}"], "lacks array(s) x"),
    "length mismatch": (["--set", "data.name=npz", "--set", "data.path={npz_len}"], "60 samples but y has 59"),
    "non-integer labels": (["--set", "data.name=npz", "--set", "data.path={npz_float}"], "integer class labels"),
    "negative labels": (["--set", "data.name=npz", "--set", "data.path={npz_neg}"], "negative labels"),
    "test label out of range": (["--set", "data.name=npz", "--set", "data.path={npz_test_range}"],
                                "y_test has label 7"),
    "NaN inputs": (["--set", "data.name=npz", "--set", "data.path={npz_nan}"], "non-finite values"),
    "empty dataset": (["--set", "data.name=npz", "--set", "data.path={npz_empty}"], "x is empty"),
    "pickled npz": (["--set", "data.name=npz", "--set", "data.path={npz_pickle}"], "cannot read npz"),
    "shape the model cannot take": (["--set", "model.name=cnn1d"], "cnn1d takes 1-D signals"),
    "image too small for lenet": (["--set", "model.name=lenet"], "at least 12x12"),
    "more splits than a class has": (["--set", "data.name=npz", "--set", "data.path={npz_rare}", "--splits", "4"],
                                     "class 2 has only"),
}

CONFIG_CASES = {
    "unknown key": (["--set", "trian.epochs=3"], "unknown config key 'trian'"),
    "wrong type": (["--set", "train.batch_size=big"], "train.batch_size must be int"),
    "splits < 1": (["--splits", "0"], "splits must be >= 1"),
    "negative loader workers": (["--set", "train.num_workers=-1"], "train.num_workers must be >= 0"),
    "val fraction out of range": (["--set", "data.val_fraction=1"], "val_fraction must be in [0, 1)"),
    "blocks pattern matching nothing": (["--set", "transfer.blocks=[conv*]"],
                                        "transfer.blocks pattern 'conv*' matches no floating-point state entry"),
    "interval <= 0": (["--set", "transfer.interval=0"], "interval must be >= 1"),
    "negative lr": (["--set", "train.lr=-1"], "train.lr must be > 0"),
    "bad choice": (["--set", "transfer.fitness=test"], "valid: unseen, val, train"),
    "lr_scale length": (["--set", "train.lr_scale=[1, 2]"], "one multiplier per split"),
    "candidates >= splits": (["--splits", "4", "--set", "transfer.candidates=4"],
                             "transfer.candidates must be between 1 and splits - 1 = 3"),
    "candidates 0": (["--set", "transfer.candidates=0"], "transfer.candidates must be between 1 and"),
    "candidates with average": (["--set", "transfer.policy=average", "--set", "transfer.candidates=1"],
                                "transfer.candidates applies to policies best, interpolate and distill"),
    "missing config file": (["--config", "{tmp}/nope.yaml"], "config file not found"),
    "YAML syntax error": (["--config", "{bad_yaml}"], "started at line 3"),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    nan = X.copy()
    nan[3, 2] = np.nan

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {d}/pwned",))

    (d / "bad.yaml").write_text("splits: 2\ntrain:\n  epochs: [1,\n  lr: 3\n")
    return {
        "tmp": str(d), "bad_yaml": str(d / "bad.yaml"),
        "npz_no_y": npz(d / "no_y.npz", x=X),
        "h5_no_x": h5(d / "no_x.h5", y=Y),
        "npz_len": npz(d / "len.npz", x=X, y=Y[:59]),
        "npz_float": npz(d / "float.npz", x=X, y=Y + 0.5),
        "npz_neg": npz(d / "neg.npz", x=X, y=Y - 1),
        "npz_test_range": npz(d / "test_range.npz", x=X, y=Y, x_test=X[:5], y_test=np.full(5, 7)),
        "npz_nan": npz(d / "nan.npz", x=nan, y=Y),
        "npz_empty": npz(d / "empty.npz", x=X[:0], y=Y[:0]),
        "npz_pickle": npz(d / "pickle.npz", x=np.array([Evil()], dtype=object), y=Y[:1]),
        "npz_rare": npz(d / "rare.npz", x=X, y=np.where(np.arange(60) < 3, 2, Y % 2)),
    }


@pytest.mark.parametrize("case", list(CONFIG_CASES) + list(DATA_CASES))
def test_bad_input_is_one_clear_line_and_writes_nothing(case, files, tmp_path):
    args, expected = {**CONFIG_CASES, **DATA_CASES}[case]
    args = [a.format(**{**files, "tmp": files["tmp"]}) for a in args]
    run_dir = tmp_path / "run"
    line = user_error("launch", "--run-dir", run_dir, "--no-progress", *args)
    assert line.startswith("hpc-mto: error: ") and expected in line, line
    assert not run_dir.exists()
    assert not Path(files["tmp"], "pwned").exists()


@pytest.mark.parametrize("command", [[HPC_MTO], [sys.executable, "-m", "hpc_mto"]])
def test_errors_from_a_real_process_have_no_traceback(tmp_path, command):
    proc = subprocess.run([*command, "launch", "--set", "transfer.policy=greedy"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "hpc-mto: error: invalid config: transfer.policy='greedy'; valid: none, best, interpolate, average, distill"]


def test_a_launch_refused_after_its_tasks_started_leaves_no_process_and_writes_nothing(files, tmp_path):
    """A local launch starts its tasks before it checks the data (they import torch meanwhile, at a
    gate): when the check fails, the error is still one line, nothing is written, and no task
    process or gate is left behind."""
    run_dir, gates = tmp_path / "run", tmp_path / "gates"
    gates.mkdir()
    proc = subprocess.run([HPC_MTO, "launch", "--run-dir", run_dir, "--splits", "2", "--no-progress", "--set",
                           "data.name=npz", "--set", f"data.path={files['npz_neg']}"],
                          capture_output=True, text=True, env={**os.environ, "TMPDIR": str(gates)}, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpc-mto: error: ") and "negative labels" in lines[0], lines
    assert not run_dir.exists()
    assert not any(gates.iterdir()), list(gates.iterdir())  # the gate went with the tasks
    left = [c for c in Path("/proc").glob("[0-9]*/cmdline") if str(run_dir).encode() in _read(c)]
    assert not left, [_read(c) for c in left]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""  # the process ended while we looked


@pytest.fixture
def prepared(tmp_path):
    """A run directory as launch writes it before the tasks start."""
    from hpc_mto import config

    run = __import__("hpc_mto.rundir", fromlist=["RunDir"]).RunDir(tmp_path / "run")
    prepare(run, config.load(None, ["splits=2", "train.epochs=1"]))
    return run


def test_launch_into_an_existing_run_directory_refuses_and_keeps_it(prepared):
    before = {p: p.read_bytes() for p in prepared.path.rglob("*") if p.is_file()}
    line = user_error("launch", "--run-dir", prepared.path, "--splits", 2)
    assert "already exists" in line and "hpc-mto resume" in line
    assert before == {p: p.read_bytes() for p in prepared.path.rglob("*") if p.is_file()}


def test_second_resume_while_one_holds_the_lock_is_refused_naming_the_holder(prepared):
    with prepared.lock():
        line = user_error("resume", prepared.path)
    assert f"in use by pid {os.getpid()}" in line and os.uname().nodename in line


def test_stale_lock_of_a_dead_process_is_taken_over(prepared):
    dead = subprocess.Popen(["true"])
    dead.wait()
    prepared.lock_file.write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "since": 0}))
    lock = RunLock(prepared.lock_file).acquire()
    assert json.loads(prepared.lock_file.read_text())["pid"] == os.getpid()
    lock.release()
    assert not prepared.lock_file.exists()


def test_resume_of_a_directory_that_is_not_a_run(tmp_path):
    assert "is not an hpc-mto run directory" in user_error("resume", tmp_path)
    assert "is not a directory" in user_error("resume", tmp_path / "absent")


def test_resume_with_a_changed_config_is_refused_with_a_diff(prepared):
    line = user_error("resume", prepared.path, "--set", "train.lr=0.5", "--set", "transfer.policy=none")
    assert "train.lr: 0.001 -> 0.5" in line and "transfer.policy: 'distill' -> 'none'" in line
    assert "train.epochs" in line  # the keys that are safe to change are named
    assert "lr: 0.001" in prepared.config_file.read_text()


@pytest.mark.mpi
@pytest.mark.parametrize("policy", ["best", "distill"])
def test_a_diverging_task_never_spreads_nan_and_the_run_still_selects(tmp_path, policy):
    run_dir = tmp_path / "nan"
    run_cli("launch", "--run-dir", run_dir, "--splits", 2, "--set", "train.epochs=4", "--set", "train.optimizer=sgd",
            "--set", "train.lr=0.05", "--set", "train.lr_scale=[1, 1e12]", "--set", f"transfer.policy={policy}",
            "--set", "transfer.interval=1", "--set", "transfer.min_samples=20", "--no-progress")
    m1 = read_jsonl(run_dir / "metrics" / "task-1.jsonl")
    assert any(not np.isfinite(m["train_loss"]) for m in m1), "task 1 should have diverged"
    for m in read_jsonl(run_dir / "metrics" / "task-0.jsonl"):
        assert np.isfinite(m["train_loss"]) and np.isfinite(m["val_loss"])
    decisions = read_jsonl(run_dir / "transfers" / "task-0.jsonl")
    assert len(decisions) == 3  # rounds after epochs 1-3
    for d in decisions:
        if policy == "best":
            assert d["source"] != 1 or d["scores"][1] is not None  # never adopted from a non-finite peer
        else:  # a teacher is never built from a non-finite peer's predictions
            assert 1 not in d["sources"] or np.isfinite(m1[d["epoch"] - 1]["train_loss"])
    r = result(run_dir)
    chosen = r["candidates"][r["selected"]["index"]]
    assert chosen["finite"] and r["selected"]["test_acc"] > 0.5
    assert all(np.isfinite(p.detach().numpy()).all() for p in load_selected(run_dir).parameters())


@pytest.mark.mpi
def test_a_crashing_rank_ends_the_mpi_job_promptly_naming_the_task(tmp_path):
    started = time.monotonic()
    proc = run_cli("launch", "--run-dir", tmp_path / "crash", "--splits", 2, "--set", "train.epochs=3",
                   "--no-progress", env={INJECT_ENV: "crash@step:1:10"}, check=False)
    assert proc.returncode != 0 and time.monotonic() - started < 90
    assert "task 1: InjectedCrash" in proc.stderr
    assert "hpc-mto resume" in proc.stderr


def processes_mentioning(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue  # exited while we looked
    return found


@pytest.mark.mpi
def test_a_frozen_rank_ends_the_job_within_the_heartbeat_timeout_naming_it_and_resume_finishes(tmp_path):
    """A rank that stops (SIGSTOP: alive but silent, like a rank on a lost node) leaves its peers in
    an MPI collective; their heartbeat watchdog ends the job, and the frozen rank goes with it."""
    run_dir = tmp_path / "frozen"
    started = time.monotonic()
    proc = run_cli("launch", "--run-dir", run_dir, "--splits", 2, "--set", "train.epochs=3",
                   "--set", "transfer.heartbeat_timeout=6", "--no-progress",
                   env={INJECT_ENV: "freeze@step:1:40"}, check=False)
    assert proc.returncode != 0 and time.monotonic() - started < 120
    assert "task 1 stopped responding (no heartbeat for 6s" in proc.stderr
    assert not processes_mentioning(str(run_dir))  # the frozen rank was ended too
    run_cli("resume", run_dir, "--no-progress")
    assert result(run_dir)["k"] == 2


def test_disk_full_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    script = f"""
import resource, signal, sys
sys.path.insert(0, {str(Path(__file__).parent / 'helpers')!r})
from write_checkpoints import big_task
from hpc_mto import checkpoint
task = big_task()
first = checkpoint.save({str(tmp_path)!r}, 0, task.global_step, task.state_dict())
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a full disk is an error from write(), not a signal
resource.setrlimit(resource.RLIMIT_FSIZE, (first.stat().st_size // 3, resource.RLIM_INFINITY))
task.epoch += 1
try:
    checkpoint.save({str(tmp_path)!r}, 0, task.global_step, task.state_dict())
except Exception as exc:  # h5py reports EFBIG as OSError or RuntimeError depending on where it hits
    print("write failed:", type(exc).__name__, exc)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "write failed" in proc.stdout, proc.stderr
    steps = checkpoint.steps(tmp_path, 0)
    assert steps == [0]
    assert checkpoint.verify(checkpoint.path_for(tmp_path, 0, 0)) is None
    assert not list(checkpoint.task_dir(tmp_path, 0).glob(".*tmp*"))  # no half-written file left


def test_no_file_the_tool_reads_can_execute_code():
    """No pickle, no unsafe YAML, torch.load only with weights_only, no shell."""
    source = "\n".join(p.read_text() for p in PKG.rglob("*.py"))
    assert not re.search(r"\bimport pickle\b|\bpickle\.load|\bcloudpickle\b", source)
    assert "yaml.load(" not in source and "yaml.unsafe_load" not in source
    assert "allow_pickle=True" not in source
    assert "shell=True" not in source and "os.system(" not in source
    for call in re.findall(r"torch\.load\([^)]*\)", source):
        assert "weights_only=True" in call, call


def test_a_pickled_model_file_is_refused_without_running_it(prepared, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    prepared.model_file.write_bytes(pickle.dumps({"w": Evil()}))
    prepared.model_info.write_text(json.dumps({"schema": 1, "candidate": "task-0/final",
                                               "model": {"name": "mlp", "width": 8, "depth": 1, "shared_init": False},
                                               "input_shape": [1, 8, 8], "num_classes": 10}))
    with pytest.raises(RunDirError, match="not a plain tensor state dict"):
        load_selected(prepared.path)
    assert not marker.exists()
