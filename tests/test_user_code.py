"""Your own network: ``model.factory`` names a function in the user's package (examples/mto_example),
which every rank imports; the run keeps a copy of its code and refuses to continue with other code
unless told to."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import result, run_cli
from hpc_mto import data, models
from hpc_mto.config import Config, DataConfig, ModelConfig, build
from hpc_mto.errors import ConfigError, DataError
from hpc_mto.faults import ENV as INJECT_ENV
from hpc_mto.signals import EXIT_REQUEUE
from test_resume import outcome, same_model

EXAMPLES = Path(__file__).parent.parent / "examples"
FACTORY = "mto_example.models:residual_mlp"
CONFIG = ["--splits", 2, "--set", "train.epochs=3", "--set", "transfer.interval=1", "--set", "checkpoint.every=0",
          "--set", f"model.factory={FACTORY}", "--set", "model.kwargs={hidden: 32, blocks: 1}",
          "--set", "data.factory=mto_example.data:blobs", "--set", "data.kwargs={n: 1000}", "--no-progress"]


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


@pytest.fixture
def user_data(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "user_data.py").write_text(
        "import torch\n"
        "class Items(torch.utils.data.Dataset):\n"
        "    def __init__(self, labels, with_targets=True):\n"
        "        self.items = labels\n"
        "        if with_targets:\n"
        "            self.targets = labels\n"
        "    def __len__(self):\n"
        "        return len(self.items)\n"
        "    def __getitem__(self, i):\n"
        "        return torch.full((3,), float(i)), self.items[i]\n"
        "def good():\n"
        "    return Items([0, 1, 2, 1] * 10), Items([2, 1, 0])\n"
        "def a_number():\n"
        "    return 3\n"
        "def float_labels():\n"
        "    return Items([0.5, 1.0] * 10)\n"
        "def no_targets():\n"
        "    return Items([0, 1] * 10, with_targets=False)\n")


def test_a_data_factory_is_read_through_a_loader_with_its_labels(user_data):
    ds = data.load(DataConfig(factory="user_data:good"))
    assert ds.input_shape == (3,) and ds.y.tolist() == [0, 1, 2, 1] * 10
    assert ds.y_test.tolist() == [2, 1, 0] and ds.num_classes == 3 and ds.test_source == "official"
    cfg = Config()
    for workers in (0, 2):
        cfg.train.num_workers = workers
        picked = ds.samples(np.array([5, 7, 9]), "cpu", cfg)
        (x, y), = picked.batches(8)
        assert x.tolist() == [[5.0] * 3, [7.0] * 3, [9.0] * 3] and y.tolist() == [1, 1, 1]
        (x, y), = ds.test_samples("cpu", cfg).batches(8)
        assert x[:, 0].tolist() == [0.0, 1.0, 2.0] and y.tolist() == [2, 1, 0]


def test_augmentation_in_a_data_factory_is_drawn_per_sample_and_leaves_training_rngs_alone(monkeypatch):
    """The same sample at the same (seed, task, epoch) gets the same draw, whichever batch it falls in
    and however many loader workers there are; scoring reads the unaugmented view; and reading a batch
    in this process does not move the generators dropout draws from."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    ds = data.load(DataConfig(factory="mto_example.data:blobs", kwargs={"n": 64}))
    cfg = Config()
    drawn = {}
    for workers, batch_size, first_step in ((0, 8, 0), (2, 8, 0), (0, 4, 6), (2, 16, 0)):
        cfg.train.num_workers = workers
        train = ds.samples(np.arange(64), "cpu", cfg)
        order = torch.randperm(64, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(123)
        for idx, x, _ in train.training_batches(order, batch_size, first_step, (0, 1, 2)):
            for p, row in zip(idx.tolist(), x):
                assert torch.equal(drawn.setdefault(p, row), row), (workers, batch_size, p)
        after = torch.rand(3)
        torch.manual_seed(123)
        assert torch.equal(after, torch.rand(3)), workers
    plain = torch.cat([x for x, _ in train.batches(64)])
    assert torch.equal(plain, torch.from_numpy(ds.user.plain.samples[:64]))
    assert not torch.equal(drawn[0], plain[0])  # augmented
    other_epoch = next(train.training_batches(torch.arange(64), 64, 0, (0, 1, 3)))[1]
    assert not torch.equal(other_epoch[0], drawn[0])


@pytest.mark.parametrize("spec, message", [
    ("user_data:a_number", "returned a int as the train set; it must return a map-style torch.utils.data.Dataset"),
    ("user_data:float_labels", r"\.targets must be 20 integer labels 0..C-1, got shape \(20,\), dtype float64"),
    ("user_data:no_targets", r"has no \.targets \(or \.labels\)"),
])
def test_a_data_factory_whose_dataset_cannot_be_used_is_one_clear_error(user_data, spec, message):
    with pytest.raises(DataError, match=message):
        data.load(DataConfig(factory=spec))


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
    """The user's dataset augments (noise from torch's global generator) and is read by two loader
    workers per rank here, by none in the reference: the bits are the same, across a resume too."""
    run_dir = tmp_path / "run"
    stopped = run_cli("launch", "--run-dir", run_dir, *CONFIG, "--set", "train.num_workers=2",
                      env={**env, INJECT_ENV: "signal@step:1:50"}, check=False)
    assert stopped.returncode == EXIT_REQUEUE, stopped.stderr
    run_cli("resume", run_dir, "--no-progress", env=env)
    assert outcome(run_dir) == outcome(reference) and same_model(run_dir, reference)
    for key, module in (("model-factory", "models"), ("data-factory", "data")):
        assert (run_dir / "code" / f"{key}.py").read_text() == (EXAMPLES / "mto_example" / f"{module}.py").read_text()
    code = result(run_dir)["provenance"]["user_code"]["model.factory"]
    assert code["sha256"] == hashlib.sha256((EXAMPLES / "mto_example" / "models.py").read_bytes()).hexdigest()
    assert code["version"] == "0.1.0" and code["module"] == "mto_example.models"
    header = (run_dir / "config.yaml").read_text().splitlines()[2:4]  # after versions and command line
    line = f"# model.factory: mto_example.models 0.1.0, sha256 {code['sha256'][:16]}"
    # ", git <commit>" follows in a git checkout of the examples
    assert any(h == line or h.startswith(line + ", git ") for h in header), header
    # The selected model loads as the user's network, with its kwargs.
    proc = subprocess.run([sys.executable, "-c", "import sys; from hpc_mto.model_io import load_selected; "
                           "net = load_selected(sys.argv[1]); print(type(net[2]).__module__, net[1].out_features)",
                           str(run_dir)], capture_output=True, text=True, env={**os.environ, **env})
    assert proc.stdout.split() == ["mto_example.models", "32"], proc.stderr


@pytest.mark.mpi
def test_resume_with_changed_user_code_is_refused_with_the_diff_unless_allowed(tmp_path, env):
    package = tmp_path / "pkg"
    shutil.copytree(EXAMPLES / "mto_example", package / "mto_example")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(package), os.environ.get("PYTHONPATH")]))}
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
