"""Transfer-round properties on real MPI ranks (run by tests/test_mpi.py under mpiexec -n K).

Usage: transfer_props.py CASE [CASE ...] (a case with an argument: name=value). Every rank asserts;
any failure makes mpiexec exit non-zero. Several cases per call share one start-up of the ranks.
"""

import sys

import numpy as np
import torch

from functools import reduce

from hpc_mto import config, data, splits, transfer
from hpc_mto.blocks import BlockLayout
from hpc_mto.comm import MPIComm
from hpc_mto.samples import Arrays
from hpc_mto.task import Task, evaluate, model_logits

torch.set_num_threads(1)
comm = MPIComm()
SPLITS = {}


def make_task(overrides, epochs: int, lr: float) -> Task:
    cfg = config.load(None, [f"splits={comm.size}", f"train.lr={lr}"] + overrides)
    ds = data.load(cfg.data)
    s = splits.make(ds.y, comm.size, cfg.data.val_fraction, cfg.data.selection_holdout, cfg.seed)
    SPLITS.update(ds=ds, s=s)
    k = comm.rank
    arr = lambda idx: Arrays.of(ds.x[idx], ds.y[idx], "cpu")
    task = Task(cfg, k, arr(s.train[k]), arr(s.val[k]), arr(s.val[k]), ds.input_shape, ds.num_classes, "cpu")
    for _ in range(epochs):
        task.train_steps(lambda: False)
        task.finish_epoch()
    return task


def exchange(task: Task) -> transfer.Exchange:
    cfg = task.cfg.transfer
    if cfg.fitness == "unseen":
        ds = SPLITS["ds"]
        judge = transfer.UnseenJudge(lambda ids: Arrays.of(ds.x[ids], ds.y[ids], "cpu"), SPLITS["s"].val, cfg.min_samples)
    else:
        judge = transfer.FixedJudge(task.fitness)
    return transfer.Exchange(task, comm, cfg, judge)


def all_states(task):
    return comm.comm.allgather({k: v.clone() for k, v in task.model.state_dict().items()})


def case_average():
    # optimizer_state=copy: the optimizer moments are averaged too, so the whole buffer is the mean
    task = make_task(["transfer.policy=average", "transfer.optimizer_state=copy"], epochs=1, lr=1e-3)
    layout = BlockLayout(task.model, task.optimizer, ["*"], True)
    buffers = comm.comm.allgather(layout.pack())
    expected = np.zeros_like(buffers[0])  # float32, added in task order, divided in float32
    for b in buffers:
        expected += b
    expected /= comm.size
    record = exchange(task).run_round()
    after = layout.pack()
    assert np.array_equal(after, expected), "average is not the exact mean of the blocks"
    assert all(np.array_equal(b, after) for b in comm.comm.allgather(after)), "ranks differ after average"
    assert record.sources == list(range(comm.size))


def case_best_known():
    # Rank 0 trained for 3 epochs, the others barely: every other rank must adopt rank 0's blocks.
    task = make_task(["transfer.policy=best", "transfer.fitness=val", "transfer.keep_lineages=0"],
                     epochs=3 if comm.rank == 0 else 1, lr=1e-3 if comm.rank == 0 else 1e-6)
    task.epoch = 1  # the same round on every rank
    before = all_states(task)
    record = exchange(task).run_round()
    if comm.rank == 0:
        assert not record.accepted, record
        assert all(torch.equal(v, before[0][k]) for k, v in task.model.state_dict().items())
    else:
        assert record.accepted and record.source == 0, record
        assert all(torch.equal(v, before[0][k]) for k, v in task.model.state_dict().items()
                   if v.is_floating_point())
        assert task.lineage == [0]


def case_best_scores(min_gain="0.0"):
    min_gain = float(min_gain)
    # Random peers: the recorded scores equal each candidate re-scored here, and the decision is the
    # rule applied to them (adopt the lowest loss iff it beats the own one by more than min_gain).
    task = make_task(["transfer.policy=best", "transfer.fitness=val", f"transfer.min_gain={min_gain}",
                      "transfer.keep_lineages=0", f"seed={comm.rank}"], epochs=1 + comm.rank, lr=1e-3)
    task.epoch = 1
    states = all_states(task)
    own = {k: v.clone() for k, v in task.model.state_dict().items()}
    expected = []
    for st in states:
        task.model.load_state_dict(st)
        expected.append(evaluate(task.model, task.fitness, task.cfg.train.eval_batch_size)[0])
    task.model.load_state_dict(own)
    record = exchange(task).run_round()
    assert record.scores == expected, (record.scores, expected)
    others = {j: s for j, s in enumerate(expected) if j != comm.rank}
    j = min(others, key=others.get)
    should = expected[comm.rank] - others[j] > min_gain
    assert record.accepted == should and (record.source == j if should else record.source is None)
    target = states[j] if should else own
    for k, v in task.model.state_dict().items():
        if v.is_floating_point():
            assert torch.equal(v, target[k]), k


def case_candidates_scores_only_the_drawn_peers(m="1"):
    # transfer.candidates m: each task scores the m peers drawn for it (and only those), records
    # them, and adopts by the rule applied to them alone.
    m = int(m)
    task = make_task(["transfer.policy=best", "transfer.fitness=val", f"transfer.candidates={m}",
                      "transfer.keep_lineages=0"], epochs=1 + comm.rank, lr=1e-3)  # one seed: one draw
    task.epoch = 3 * task.cfg.transfer.interval  # round 3
    states = all_states(task)
    own = {k: v.clone() for k, v in task.model.state_dict().items()}
    drawn = transfer.scored_peers(task.cfg.seed, 3, comm.rank, comm.size, m)
    expected = [None] * comm.size
    for j in drawn + [comm.rank]:
        task.model.load_state_dict(states[j])
        expected[j] = evaluate(task.model, task.fitness, task.cfg.train.eval_batch_size)[0]
    task.model.load_state_dict(own)
    record = exchange(task).run_round()
    assert record.peers == drawn and len(drawn) == m and comm.rank not in drawn, (record.peers, drawn)
    assert record.scores == expected, (record.scores, expected)
    j = min(drawn, key=lambda i: (expected[i], i))
    should = expected[comm.rank] - expected[j] > 0
    assert record.accepted == should and (record.source == j if should else record.source is None), record


def case_keep_lineages_refuses_the_smallest_gains_that_would_leave_too_few():
    # Every other rank prefers rank 0's model; with keep_lineages 0.5 of 4 tasks two lineages must
    # remain, so the two largest gains adopt and the smallest is refused.
    task = make_task(["transfer.policy=best", "transfer.fitness=val", "transfer.keep_lineages=0.5"],
                     epochs=3 if comm.rank == 0 else 1, lr=1e-3 if comm.rank == 0 else 1e-6)
    task.epoch = 1
    record = exchange(task).run_round()
    records = comm.comm.allgather(record)
    proposers = [r for r in records if r.proposed is not None]
    assert [r.target for r in proposers] == [1, 2, 3] and all(r.proposed == 0 for r in proposers)
    refused = min(proposers, key=lambda r: (r.gain, -r.target))
    assert refused.veto == "keep_lineages" and not refused.accepted
    assert all(r.accepted for r in proposers if r is not refused)
    assert len({tuple(r.lineage) for r in records}) == 2


def case_blocks_outside_patterns_never_change():
    task = make_task(["transfer.policy=best", "transfer.fitness=val", "transfer.blocks=['1.*']"],
                     epochs=3 if comm.rank == 0 else 1, lr=1e-3 if comm.rank == 0 else 1e-6)
    task.epoch = 1
    before = all_states(task)
    own_opt = {k: {n: t.clone() for n, t in s.items()} for k, s in task.optimizer.state.items()}
    record = exchange(task).run_round()
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
    assert record.accepted == (comm.rank != 0)


def case_unseen_compares_on_samples_neither_lineage_trained_on(min_samples="1"):
    # Each candidate is judged on the intersection of the two tasks' validation sets, the own model
    # on the same samples; comparisons on fewer than min_samples are not made.
    min_samples = int(min_samples)
    task = make_task(["transfer.policy=best", "transfer.fitness=unseen", f"transfer.min_samples={min_samples}",
                      "transfer.keep_lineages=0", f"seed={comm.rank}", "data.val_fraction=0.5"],
                     epochs=1 + comm.rank, lr=1e-3)
    task.epoch = 1
    states = all_states(task)
    own = {k: v.clone() for k, v in task.model.state_dict().items()}
    ds, val = SPLITS["ds"], SPLITS["s"].val
    me = comm.rank
    expected, own_expected, counts = [], [], []
    for j, st in enumerate(states):
        ids = reduce(np.intersect1d, [val[me]] if j == me else [val[me], val[j]])
        counts.append(len(ids))
        samples = Arrays.of(ds.x[ids], ds.y[ids], "cpu")
        task.model.load_state_dict(own)
        own_expected.append(evaluate(task.model, samples, 1024)[0])
        task.model.load_state_dict(st)
        expected.append(evaluate(task.model, samples, 1024)[0] if len(ids) >= min_samples or j == me else None)
    task.model.load_state_dict(own)
    record = exchange(task).run_round()
    assert record.samples == counts, (record.samples, counts)
    assert record.scores == expected, (record.scores, expected)
    compared = {j: (own_expected[j] - s, s) for j, s in enumerate(expected) if j != me and s is not None}
    source, _ = transfer.choose_source(compared, 0.0)
    assert record.source == source and record.accepted == (source is not None), record
    if source is not None:
        assert task.trained_on == sorted({me, source}) and task.lineage == [source]


def case_distill_teacher_is_the_peers_mean_logits_on_own_training_samples():
    task = make_task(["transfer.policy=distill", f"seed={comm.rank}"], epochs=1, lr=1e-3)
    states = all_states(task)
    own = {k: v.clone() for k, v in task.model.state_dict().items()}
    peers = []
    for j, st in enumerate(states):
        if j != comm.rank:
            task.model.load_state_dict(st)
            peers.append(model_logits(task.model, task.train, 1024).double())
    task.model.load_state_dict(own)
    record = exchange(task).run_round()
    assert record.sources == [j for j in range(comm.size) if j != comm.rank]
    assert torch.equal(task.teacher, (sum(peers) / len(peers)).float())
    assert all(torch.equal(v, own[k]) for k, v in task.model.state_dict().items())  # no weights adopted
    assert task.lineage == [comm.rank]


def case_gradual_average_pulls_by_the_rate():
    task = make_task(["transfer.policy=average", "transfer.average_steps=5", "transfer.average_rate=0.25",
                      f"seed={comm.rank}"], epochs=1, lr=1e-3)
    layout = BlockLayout(task.model, None, ["*"], False)
    own = layout.pack()
    mean = np.sum(np.stack(comm.comm.allgather(own)).astype(np.float64), axis=0) / comm.size
    ex = exchange(task)
    task.step, task.epoch = 5, 0  # global step 5: a pull is due
    ex.after_step()
    assert np.array_equal(layout.pack(), (0.75 * own.astype(np.float64) + 0.25 * mean).astype(np.float32))
    task.step = 6
    before = layout.pack()
    ex.after_step()
    assert np.array_equal(layout.pack(), before)  # not a multiple of average_steps: nothing moves


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}

if __name__ == "__main__":
    for spec in sys.argv[1:]:
        name, _, arg = spec.partition("=")
        try:
            CASES[name](*([arg] if arg else []))
        except BaseException:
            import traceback

            traceback.print_exc()
            comm.comm.Abort(1)  # the other ranks would wait for this one in a collective forever
        print(f"rank {comm.rank}: {spec} ok", flush=True)
