"""The Python API: hpc_mto.launch, hpc_mto.Run, predictions on raw samples, and export."""

import importlib.util
import shutil
import socket

import numpy as np
import pytest
import torch
from conftest import run_cli

import hpc_mto
from hpc_mto import data
from hpc_mto.api import _named_factories
from hpc_mto.errors import ConfigError, RunDirError
from hpc_mto.faults import ENV as INJECT_ENV
from hpc_mto.signals import EXIT_REQUEUE

CONFIG = {"splits": 2, "train": {"epochs": 2}, "transfer": {"interval": 1}, "checkpoint": {"every": 0}}


def local_function():
    pass


def test_a_module_level_function_becomes_its_name_and_anything_else_is_refused():
    named = _named_factories({"model": {"factory": data.digits, "kwargs": {}}})
    assert named["model"] == {"factory": "hpc_mto.data:digits", "kwargs": {}}

    def closure(input_shape, num_classes):
        pass

    for factory, what in [(lambda s, c: None, "got a lambda"), (closure, "got a closure")]:
        with pytest.raises(ConfigError, match=f"must be a module-level function .* fresh interpreters .*; {what}"):
            _named_factories({"model": {"factory": factory}})
    local_function.__module__ = "__main__"
    with pytest.raises(ConfigError, match="got a function defined in __main__"):
        _named_factories({"model": {"factory": local_function}})


def test_slurm_options_are_refused_for_a_local_launch(tmp_path):
    with pytest.raises(ConfigError, match="partition: only for executor='slurm'"):
        hpc_mto.launch(CONFIG, run_dir=tmp_path / "run", partition="gpu")
    with pytest.raises(ConfigError, match="valid SLURM options: partition, array"):
        hpc_mto.launch(CONFIG, run_dir=tmp_path / "run", executor="slurm", partitoin="gpu")
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return hpc_mto.launch(CONFIG, run_dir=tmp_path_factory.mktemp("api") / "run")


@pytest.mark.mpi
def test_launch_trains_and_the_run_predicts_raw_samples_as_in_training(trained):
    run = trained
    assert run.status()["state"] == "finished" and run.status()["epochs_done"] == 2
    result = run.result
    # Where it came from: versions, hosts, the command and the times.
    prov = result.provenance
    assert prov["hpc_mto"] == prov["tasks"]["hpc_mto"] == hpc_mto.__version__ and prov["torch"] == torch.__version__
    assert prov["hosts"] == [socket.gethostname()] and prov["mpi"].startswith("MPICH Version:")
    assert prov["launched"] <= prov["finished"] and prov["command"] and prov["user_code"] == {}
    # config.yaml opens with the same facts, as comments (it still reads as the run's config).
    header = (run.path / "config.yaml").read_text().splitlines()[:2]
    assert header == [f"# hpc-mto {hpc_mto.__version__} (python {prov['python']}, torch {torch.__version__}, "
                      f"numpy {np.__version__})",
                      f"# launched {prov['launched']} on {socket.gethostname()}: {prov['command']}"]
    ds = data.load(run.config.data)
    raw = np.rint(ds.x_test * 16).astype(np.int64)  # digits as scikit-learn stores them: 0..16
    # The single network on raw samples gives the bits it gives on the loader's preprocessed ones.
    single = run.predict(raw, ensemble=False)
    assert np.array_equal(single, run.load_model()(torch.from_numpy(ds.x_test)).detach().numpy())
    # The run's chosen output, on raw samples, scores what the run recorded for it on the test set.
    chosen = run.predict(raw)
    assert abs((chosen.argmax(1) == ds.y_test).mean() - result.outputs[result.output].test_acc) < 1e-9
    ensemble = run.load_ensemble()
    assert np.allclose(run.predict(raw, ensemble=True), ensemble(torch.from_numpy(ds.x_test)).detach().numpy())
    with pytest.raises(Exception, match=r"samples of shape \(64,\); this network takes \(1, 8, 8\)"):
        run.predict(raw.reshape(len(raw), 64))


@pytest.mark.mpi
def test_a_stopped_run_raises_says_where_it_stands_and_resumes_through_the_api(tmp_path, monkeypatch):
    monkeypatch.setenv(INJECT_ENV, "signal@step:0:40")
    with pytest.raises(hpc_mto.RunFailed, match="stopped with a checkpoint") as stopped:
        hpc_mto.launch(CONFIG, run_dir=tmp_path / "run")
    assert stopped.value.exit_code == EXIT_REQUEUE
    run = hpc_mto.Run(tmp_path / "run")
    assert run.status()["state"] == "stopped"
    with pytest.raises(RunDirError, match="has not finished: no result yet"):
        run.result
    monkeypatch.delenv(INJECT_ENV)
    assert run.resume().status()["state"] == "finished" and run.result.k == 2


@pytest.mark.mpi
def test_hpc_mto_predict_classifies_a_file_of_raw_samples_like_the_api(trained, tmp_path):
    run = trained
    raw = np.rint(data.load(run.config.data).x_test * 16).astype(np.int64)[:50]
    np.savez(tmp_path / "x.npz", x=raw)
    torch.save(torch.from_numpy(raw), tmp_path / "x.pt")
    out = run_cli("predict", run.path, tmp_path / "x.npz", "--single", "--out", tmp_path / "p.npz").stdout
    assert out.strip() == f"50 samples -> {tmp_path / 'p.npz'} (logits, classes)"
    with np.load(tmp_path / "p.npz") as p:
        assert np.array_equal(p["logits"], run.predict(raw, ensemble=False))
        assert np.array_equal(p["classes"], p["logits"].argmax(1))
    printed = run_cli("predict", run.path, tmp_path / "x.pt").stdout.split()
    assert printed == [str(c) for c in run.predict(raw).argmax(1)]
    bad = run_cli("predict", run.path, tmp_path / "p.npz", check=False)
    assert bad.returncode == 2 and bad.stderr == f"hpc-mto: error: {tmp_path / 'p.npz'} has no array x (found: " \
                                                 "logits, classes)\n"


@pytest.mark.mpi
def test_hpc_mto_export_writes_a_program_that_gives_the_in_process_logits(trained, tmp_path):
    out = run_cli("export", trained.path, "--single", "--out", tmp_path / "m.pt2").stdout
    assert out.startswith(f"wrote {tmp_path / 'm.pt2'} (torch-export")
    x = torch.from_numpy(data.load(trained.config.data).x_test[:7])
    exported = torch.export.load(str(tmp_path / "m.pt2")).module()
    assert torch.equal(exported(x), trained.load_model()(x))  # any batch size: 7 was never seen
    run_cli("export", trained.path, "--ensemble")
    ensemble = torch.export.load(str(trained.path / "ensemble.pt2")).module()
    assert torch.equal(ensemble(x), trained.load_ensemble()(x))
    if importlib.util.find_spec("onnx") and importlib.util.find_spec("onnxscript"):
        return  # the optional extra is installed: the message below is for when it is not
    missing = run_cli("export", trained.path, "--format", "onnx", check=False)
    assert missing.returncode == 2 and missing.stderr == ("hpc-mto: error: --format onnx needs the onnx and onnxscript "
                                                          "packages: pip install 'hpc-mto[onnx]'\n")


@pytest.mark.mpi
def test_the_output_is_safetensors_any_reader_loads_and_older_pt_run_directories_still_load(trained, tmp_path):
    import safetensors.numpy
    import safetensors.torch

    x = torch.from_numpy(data.load(trained.config.data).x_test[:5])
    model = trained.load_model()
    # Readable without torch or hpc-mto: the same arrays as the network's state dict.
    arrays = safetensors.numpy.load_file(str(trained.path / "model.safetensors"))
    assert arrays.keys() == model.state_dict().keys()
    assert all(np.array_equal(arrays[k], v.numpy()) for k, v in model.state_dict().items())
    members = sorted(p.name for p in (trained.path / "ensemble").iterdir())
    assert members == ["member-0.safetensors", "member-1.safetensors"]
    # export --format safetensors of the ensemble: every member's weights under members.<t>.
    run_cli("export", trained.path, "--ensemble", "--format", "safetensors", "--out", tmp_path / "e.safetensors")
    exported = safetensors.numpy.load_file(str(tmp_path / "e.safetensors"))
    assert exported.keys() == trained.load_ensemble().state_dict().keys()
    # A run directory of hpc-mto < 0.3 (torch.save'd .pt files) loads as before.
    old = tmp_path / "old"
    shutil.copytree(trained.path, old)
    for path in [old / "model.safetensors", *(old / "ensemble").iterdir()]:
        torch.save(safetensors.torch.load_file(str(path)), path.with_suffix(".pt"))
        path.unlink()
    old_run = hpc_mto.Run(old)
    assert torch.equal(old_run.load_model()(x), model(x))
    assert torch.equal(old_run.load_ensemble()(x), trained.load_ensemble()(x))
