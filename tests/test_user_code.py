"""Your own network: ``model.factory`` names a function in the user's package (examples/mto_example),
which every rank imports; the run keeps a copy of its code and refuses to continue with other code
unless told to."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from hpc_mto import models
from hpc_mto.config import ModelConfig, build
from hpc_mto.errors import ConfigError, DataError
from hpc_mto.faults import ENV as INJECT_ENV
from hpc_mto.signals import EXIT_REQUEUE
from test_resume import outcome, same_model

EXAMPLES = Path(__file__).parent.parent / "examples"
FACTORY = "mto_example.models:residual_mlp"
CONFIG = ["--splits", 2, "--set", "train.epochs=3", "--set", "transfer.interval=1", "--set", "checkpoint.every=0",
          "--set", f"model.factory={FACTORY}", "--set", "model.kwargs={hidden: 32, blocks: 1}", "--no-progress"]


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module of the user's, written to a directory on sys.path; returns its file."""
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "user_nets.py"
    path.write_text(
        "from torch import nn\n"
        "NOT_A_FUNCTION = 3\n"
        "def ok(input_shape, num_classes, width=8):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, num_classes))\n"
        "def too_few_classes(input_shape, num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes - 1))\n"
        "def not_a_module(input_shape, num_classes):\n"
        "    return 'a network'\n")
    return path


def factory(spec, **kwargs):
    return ModelConfig(factory=spec, kwargs=kwargs)


def test_a_factory_builds_the_network_with_its_kwargs(user_module):
    net = models.build(factory("user_nets:ok", width=5), (1, 8, 8), 10)
    assert net[1].out_features == 5 and net(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


@pytest.mark.parametrize("spec, kwargs, error, message", [
    ("user_nets:missing", {}, ConfigError, "module user_nets has no attribute 'missing'"),
    ("no_such_pkg.nets:f", {}, ConfigError, r"cannot import no_such_pkg.nets \(ModuleNotFoundError"),
    ("user_nets:NOT_A_FUNCTION", {}, ConfigError, "is a int, not a function"),
    ("user_nets:not_a_module", {}, ConfigError, "returned a str, not a torch.nn.Module"),
    ("user_nets:ok", {"depth": 2}, ConfigError, "unexpected keyword argument 'depth'"),
    ("user_nets:too_few_classes", {}, DataError, r"gives \(2, 9\) for 2 samples; it must give one logit per "
                                                 r"class: \(2, 10\)"),
])
def test_a_factory_that_cannot_make_the_network_is_one_clear_error(user_module, spec, kwargs, error, message):
    with pytest.raises(error, match=message):
        models.build(factory(spec, **kwargs), (1, 8, 8), 10)


@pytest.mark.parametrize("spec", ["user_nets", "user_nets.ok", "user nets:ok", "user_nets:ok:x", "1abc:f"])
def test_a_malformed_factory_is_refused_when_the_config_is_read(spec):
    with pytest.raises(ConfigError, match='expected "package.module:function"'):
        build([{"model": {"factory": spec}}])


def test_a_factory_that_cannot_be_imported_stops_the_launch_before_anything_is_written(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("launch", "--run-dir", run_dir, "--set", "model.factory=nowhere.nets:f", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("hpc-mto: error: invalid config: model.factory='nowhere.nets:f': cannot import")
    assert not run_dir.exists()


@pytest.fixture(scope="module")
def env():
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(EXAMPLES), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    run_dir = tmp_path_factory.mktemp("user") / "reference"
    run_cli("launch", "--run-dir", run_dir, *CONFIG, env=env)
    return run_dir


@pytest.mark.mpi
def test_a_user_network_trains_on_k2_ranks_stops_resumes_bitwise_and_loads(reference, tmp_path, env):
    run_dir = tmp_path / "run"
    stopped = run_cli("launch", "--run-dir", run_dir, *CONFIG, env={**env, INJECT_ENV: "signal@step:1:50"},
                      check=False)
    assert stopped.returncode == EXIT_REQUEUE, stopped.stderr
    run_cli("resume", run_dir, "--no-progress", env=env)
    assert outcome(run_dir) == outcome(reference) and same_model(run_dir, reference)
    code = (run_dir / "code" / "model-factory.py").read_text()
    assert code == (EXAMPLES / "mto_example" / "models.py").read_text()
    # The selected model loads as the user's network, with its kwargs.
    proc = subprocess.run([sys.executable, "-c", "import sys; from hpc_mto.model_io import load_selected; "
                           "net = load_selected(sys.argv[1]); print(type(net[2]).__module__, net[1].out_features)",
                           str(run_dir)], capture_output=True, text=True, env={**os.environ, **env})
    assert proc.stdout.split() == ["mto_example.models", "32"], proc.stderr


@pytest.mark.mpi
def test_resume_with_changed_user_code_is_refused_with_the_diff_unless_allowed(tmp_path, env):
    package = tmp_path / "pkg"
    shutil.copytree(EXAMPLES / "mto_example", package / "mto_example")
    env = {"PYTHONPATH": str(package)}
    run_dir = tmp_path / "run"
    stopped = run_cli("launch", "--run-dir", run_dir, *CONFIG, env={**env, INJECT_ENV: "signal@step:0:20"},
                      check=False)
    assert stopped.returncode == EXIT_REQUEUE, stopped.stderr
    source = package / "mto_example" / "models.py"
    source.write_text(source.read_text().replace("x + self.linear(", "x + 0.5 * self.linear("))
    refused = run_cli("resume", run_dir, "--no-progress", env=env, check=False)
    assert refused.returncode == 2
    assert refused.stderr.startswith("hpc-mto: error: the code of model.factory (mto_example.models) changed "
                                     "since the run started")
    assert "-        return x + self.linear(" in refused.stderr and "+        return x + 0.5 * self.linear(" \
        in refused.stderr
    assert not (run_dir / "result.json").exists()
    accepted = run_cli("resume", run_dir, "--no-progress", "--allow-code-change", env=env)
    assert "continuing with the changed code of model.factory" in accepted.stdout
    assert (run_dir / "result.json").exists()
    assert "0.5 * self.linear" in (run_dir / "code" / "model-factory.py").read_text()
