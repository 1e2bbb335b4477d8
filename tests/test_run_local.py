"""End-to-end local runs: the real CLI, mpiexec, digits."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import QUICK, result, run_cli
from hpc_mto.model_io import read_weights
from hpc_mto import checkpoint, data, models, splits
from hpc_mto.config import load
from hpc_mto.model_io import load_ensemble, load_output
from hpc_mto.samples import Arrays
from hpc_mto.task import evaluate

pytestmark = pytest.mark.mpi


def final_states(run_dir: Path, k: int) -> list[dict]:
    """Each task's final and best weights, read from its newest checkpoint."""
    out = []
    for t in range(k):
        step = checkpoint.steps(run_dir / "checkpoints", t)[-1]
        state = checkpoint.load(checkpoint.path_for(run_dir / "checkpoints", t, step))
        out.append({kind: {n: torch.from_numpy(a) for n, a in state.of_kind(kind).items()}
                    for kind in ("model", "best")})
    return out


@pytest.fixture(scope="module", params=[2, 4])
def finished_run(request, tmp_path_factory, best_k2):
    if request.param == 2:
        return best_k2, 2
    run_dir = tmp_path_factory.mktemp(f"k{request.param}") / "run"
    run_cli("launch", "--run-dir", run_dir, "--splits", request.param, *QUICK)
    return run_dir, request.param


def test_cv_matrix_equals_each_model_rescored_independently(finished_run):
    run_dir, k = finished_run
    r = result(run_dir)
    cfg = load(run_dir / "config.yaml")
    ds = data.load(cfg.data)
    s, _ = splits.read(run_dir / "splits.h5")
    net = models.build(cfg.model, ds.input_shape, ds.num_classes)
    torch.set_num_threads(cfg.train.threads)
    cv = np.asarray(r["cv_acc"])
    assert cv.shape == (2 * k, k)
    for t, states in enumerate(final_states(run_dir, k)):
        for kind_index, kind in enumerate(("model", "best")):
            net.load_state_dict(states[kind])
            for j in range(k):
                loss, acc = evaluate(net, Arrays.of(ds.x[s.val[j]], ds.y[s.val[j]], "cpu"), 1024)
                assert cv[2 * t + kind_index, j] == acc
                assert r["cv_loss"][2 * t + kind_index][j] == pytest.approx(loss, rel=1e-6)
            test_loss, test_acc = evaluate(net, Arrays.of(ds.x_test, ds.y_test, "cpu"), 1024)
            assert r["candidates"][2 * t + kind_index]["test_acc"] == test_acc


def test_selected_model_is_the_argmax_of_row_means_and_is_saved(finished_run):
    run_dir, k = finished_run
    r = result(run_dir)
    means = np.asarray(r["cv_acc"]).mean(axis=1)
    assert r["selected"]["index"] == int(np.argmax(means))
    select = [c["select_acc"] for c in r["candidates"]]
    assert r["choices"]["holdout"]["index"] == int(np.argmax(select))
    chosen = r["candidates"][r["selected"]["index"]]
    assert json.loads((run_dir / "model.json").read_text())["candidate"] == chosen["id"]
    saved = read_weights(run_dir / "model.safetensors")
    states = final_states(run_dir, k)[chosen["task"]]
    expected = states["model" if chosen["kind"] == "final" else "best"]
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[n], expected[n]) for n in saved)


def test_none_policy_on_k_ranks_equals_k_separate_single_process_runs(tmp_path):
    # MPI world of 2 ranks vs two unrelated processes (the file backend starts one per task).
    mpi, separate = tmp_path / "mpi", tmp_path / "separate"
    for run_dir, backend in ((mpi, "mpi"), (separate, "file")):
        run_cli("launch", "--run-dir", run_dir, "--splits", 2, "--set", "transfer.policy=none",
                "--set", f"transfer.backend={backend}", "--set", "train.epochs=3", "--no-progress")
    a, b = final_states(mpi, 2), final_states(separate, 2)
    for t in range(2):
        for kind in ("model", "best"):
            assert all(torch.equal(a[t][kind][n], b[t][kind][n]) for n in a[t][kind]), (t, kind)
    assert result(mpi)["cv_acc"] == result(separate)["cv_acc"]


def test_default_config_reaches_090_test_accuracy_and_keeps_half_the_lineages(tmp_path):
    """What `make demo` runs: the embedded default config. Its stdout is not a terminal here, so the
    launcher prints a plain progress line now and then (every 2 s in this test) instead of live lines."""
    run_dir = tmp_path / "demo"
    out = run_cli("launch", "--run-dir", run_dir, env={"HPC_MTO_PROGRESS_EVERY": "2"})
    plain = re.findall(r"^progress: epoch (\d+)/30 \(slowest task\), \d+m\d\ds watched(, about \d+m\d\ds left)?$",
                       out.stdout, re.M)
    assert plain and [int(e) for e, _ in plain] == sorted(int(e) for e, _ in plain), out.stdout
    assert any(eta for _, eta in plain) and "\x1b[" not in out.stdout  # an ETA once epochs pass; no redraws
    r = result(run_dir)
    output = r["outputs"][r["output"]]
    assert output["test_acc"] >= 0.90 and r["selected"]["test_acc"] >= 0.90, r["outputs"]
    assert r["lineages_left"] >= r["k"] / 2
    assert out.stdout.splitlines()[-1].startswith(f"output {r['output']} ({output['id']}): estimated acc "
                                                  f"{r['estimate']:.4f}")


def test_whole_set_baseline_trains_on_the_whole_pool_with_final_and_swa_candidates(tmp_path):
    run_dir = tmp_path / "whole"
    run_cli("launch", "--run-dir", run_dir, "--splits", 1, "--set", "data.val_fraction=0", "--set", "train.epochs=3",
            "--set", "train.swa_epochs=2", "--set", "selection.rule=holdout", "--set", "transfer.policy=none",
            "--set", "checkpoint.keep=10", "--set", "checkpoint.every=0", "--no-progress")
    r = result(run_dir)
    assert [c["kind"] for c in r["candidates"]] == ["final", "swa"] and r["cv_acc"] == []
    s, _ = splits.read(run_dir / "splits.h5")
    gross = len(data.load(load(run_dir / "config.yaml").data).y)
    assert np.array_equal(s.train[0], np.setdiff1d(np.arange(gross), s.holdout)) and len(s.val[0]) == 0
    assert r["selected"]["index"] == int(np.argmax([c["select_acc"] for c in r["candidates"]]))
    # SWA is the mean of the weights at the ends of the last two epochs (checkpointed at each).
    ckpts = run_dir / "checkpoints"
    ends = [checkpoint.load(checkpoint.path_for(ckpts, 0, step)) for step in checkpoint.steps(ckpts, 0)[-2:]]
    for name, swa in ends[-1].of_kind("swa").items():
        if swa.dtype.kind == "f":
            np.testing.assert_allclose(swa, (ends[0].of_kind("model")[name] + ends[1].of_kind("model")[name]) / 2,
                                       rtol=1e-6, atol=1e-7)


def test_outputs_soup_student_ensemble_are_built_saved_and_loadable(tmp_path):
    """Shared initialisation, a student, the soup forced as the output: model.safetensors is the mean of the
    soup's members (their saved ensemble files), and the ensemble module gives the recorded accuracy."""
    run_dir = tmp_path / "outputs"
    run_cli("launch", "--run-dir", run_dir, "--splits", 3, "--set", "train.epochs=3", "--set", "model.shared_init=true",
            "--set", "selection.distill_output=true", "--set", "selection.output=soup",
            "--set", "transfer.policy=distill", "--no-progress")
    r = result(run_dir)
    assert set(r["outputs"]) == {"single", "ensemble", "soup", "student"} and r["output"] == "soup"
    assert r["estimate"] == r["outputs"]["soup"]["estimate_acc"]
    info = json.loads((run_dir / "model.json").read_text())
    assert info["candidate"] == "soup" and len(info["ensemble"]) == 3
    members = [read_weights(run_dir / m) for m in info["ensemble"]]
    soup_members = [int(m.split("/")[0].removeprefix("task-")) for m in r["outputs"]["soup"]["members"]]
    saved = read_weights(run_dir / "model.safetensors")
    for name, tensor in saved.items():
        mean = sum(members[t][name].double() for t in soup_members) / len(soup_members)
        assert torch.equal(tensor, mean.float()), name
    ensemble = load_ensemble(run_dir)
    cfg = load(run_dir / "config.yaml")
    ds = data.load(cfg.data)
    with torch.no_grad():
        logits = [m(torch.from_numpy(ds.x_test)).double() for m in ensemble.members]
    accuracy = ((sum(logits) / len(logits)).argmax(1).numpy() == ds.y_test).mean()
    assert accuracy == r["outputs"]["ensemble"]["test_acc"]
    assert len(ensemble.members) == 3 and load_output(run_dir)(torch.from_numpy(ds.x_test[:2])).shape == (2, 10)
