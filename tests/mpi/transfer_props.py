"""Transfer-round properties on real MPI ranks (run by tests/test_mpi.py under mpiexec -n K).

Usage: transfer_props.py CASE [CASE ...] (a case with an argument: name=value). Every rank asserts;
any failure makes mpiexec exit non-zero. Several cases per call share one start-up of the ranks.
"""

import sys

import numpy as np
import torch

from hpc_mto import config, data, splits, transfer
from hpc_mto.blocks import BlockLayout
from hpc_mto.comm import MPIComm
from hpc_mto.task import Arrays, Task, evaluate

torch.set_num_threads(1)
comm = MPIComm()


def make_task(overrides, epochs: int, lr: float) -> Task:
    cfg = config.load(None, [f"splits={comm.size}", f"train.lr={lr}"] + overrides)
    ds = data.load(cfg.data)
    s = splits.make(ds.y, comm.size, cfg.data.val_fraction, cfg.data.selection_holdout, cfg.seed)
    k = comm.rank
    arr = lambda idx: Arrays.of(ds.x[idx], ds.y[idx], "cpu")
    task = Task(cfg, k, arr(s.train[k]), arr(s.val[k]), arr(s.val[k]), ds.input_shape, ds.num_classes, "cpu")
    for _ in range(epochs):
        task.train_steps(lambda: False)
        task.finish_epoch()
    return task


def all_states(task):
    return comm.comm.allgather({k: v.clone() for k, v in task.model.state_dict().items()})


def case_average():
    task = make_task(["transfer.policy=average"], epochs=1, lr=1e-3)
    layout = BlockLayout(task.model, task.optimizer, ["*"], True)
    buffers = comm.comm.allgather(layout.pack())
    expected = (np.sum(np.stack(buffers).astype(np.float64), axis=0) / comm.size).astype(np.float32)
    record = transfer.run_round(task, comm, task.cfg.transfer, 1)
    after = layout.pack()
    assert np.array_equal(after, expected), "average is not the exact mean of the blocks"
    assert all(np.array_equal(b, after) for b in comm.comm.allgather(after)), "ranks differ after average"
    assert record["sources"] == list(range(comm.size))


def case_best_known():
    # Rank 0 trained for 3 epochs, the others barely: every other rank must adopt rank 0's blocks.
    task = make_task(["transfer.policy=best"], epochs=3 if comm.rank == 0 else 1, lr=1e-3 if comm.rank == 0 else 1e-6)
    before = all_states(task)
    record = transfer.run_round(task, comm, task.cfg.transfer, 1)
    if comm.rank == 0:
        assert not record["accepted"], record
        assert all(torch.equal(v, before[0][k]) for k, v in task.model.state_dict().items())
    else:
        assert record["accepted"] and record["source"] == 0, record
        assert all(torch.equal(v, before[0][k]) for k, v in task.model.state_dict().items()
                   if v.is_floating_point())
        assert task.lineage == [0]


def case_best_scores(min_gain="0.0"):
    min_gain = float(min_gain)
    # Random peers: the recorded scores equal each candidate re-scored here, and the decision is the
    # rule applied to them (adopt the lowest loss iff it beats the own one by more than min_gain).
    task = make_task(["transfer.policy=best", f"transfer.min_gain={min_gain}", f"seed={comm.rank}"],
                     epochs=1 + comm.rank, lr=1e-3)
    states = all_states(task)
    own = {k: v.clone() for k, v in task.model.state_dict().items()}
    expected = []
    for st in states:
        task.model.load_state_dict(st)
        expected.append(evaluate(task.model, task.fitness, task.cfg.train.eval_batch_size)[0])
    task.model.load_state_dict(own)
    record = transfer.run_round(task, comm, task.cfg.transfer, 1)
    assert record["scores"] == expected, (record["scores"], expected)
    others = {j: s for j, s in enumerate(expected) if j != comm.rank}
    j = min(others, key=others.get)
    should = expected[comm.rank] - others[j] > min_gain
    assert record["accepted"] == should and (record["source"] == j if should else record["source"] is None)
    target = states[j] if should else own
    for k, v in task.model.state_dict().items():
        if v.is_floating_point():
            assert torch.equal(v, target[k]), k


def case_blocks_outside_patterns_never_change():
    task = make_task(["transfer.policy=best", "transfer.blocks=['1.*']"],
                     epochs=3 if comm.rank == 0 else 1, lr=1e-3 if comm.rank == 0 else 1e-6)
    before = all_states(task)
    own_opt = {k: {n: t.clone() for n, t in s.items()} for k, s in task.optimizer.state.items()}
    record = transfer.run_round(task, comm, task.cfg.transfer, 1)
    state = task.model.state_dict()
    for k, v in state.items():
        if k.startswith("1."):
            source = before[0] if comm.rank != 0 else before[comm.rank]
            assert torch.equal(v, source[k]), k
        else:
            assert torch.equal(v, before[comm.rank][k]), f"{k} changed but is outside the patterns"
    for p in list(task.model.parameters())[2:]:  # optimizer state of untouched params is untouched
        for n, t in task.optimizer.state[p].items():
            assert torch.equal(t, own_opt[p][n])
    assert record["accepted"] == (comm.rank != 0)


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}

if __name__ == "__main__":
    for spec in sys.argv[1:]:
        name, _, arg = spec.partition("=")
        CASES[name](*([arg] if arg else []))
        print(f"rank {comm.rank}: {spec} ok", flush=True)
