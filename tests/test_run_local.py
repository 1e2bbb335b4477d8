"""End-to-end local runs: the real CLI, mpiexec, digits."""

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import QUICK, result, run_cli
from hpc_mto import checkpoint, data, models, splits
from hpc_mto.config import load
from hpc_mto.task import Arrays, evaluate

pytestmark = pytest.mark.mpi


def final_states(run_dir: Path, k: int) -> list[dict]:
    """Each task's final and best weights, read from its newest checkpoint."""
    out = []
    for t in range(k):
        step = checkpoint.steps(run_dir / "checkpoints", t)[-1]
        with h5py.File(checkpoint.path_for(run_dir / "checkpoints", t, step), "r") as f:
            out.append({g: {n.replace("|", "/"): torch.from_numpy(f[g][n][()]) for n in f[g]}
                        for g in ("model", "best")})
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
    holdout = [c["holdout_acc"] for c in r["candidates"]]
    assert r["choices"]["holdout"]["index"] == int(np.argmax(holdout))
    chosen = r["candidates"][r["selected"]["index"]]
    saved = torch.load(run_dir / "model.pt", weights_only=True)
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


def test_default_config_reaches_090_test_accuracy(tmp_path):
    """What `make demo` runs: digits, K=4, policy best, 30 epochs."""
    run_dir = tmp_path / "demo"
    out = run_cli("launch", "--run-dir", run_dir, "--no-progress")
    r = result(run_dir)
    assert r["selected"]["test_acc"] >= 0.90, r["selected"]
    assert f"test acc {r['selected']['test_acc']:.4f}" in out.stdout
