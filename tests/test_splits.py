import numpy as np
import pytest

from hpc_mto import splits
from hpc_mto.errors import ConfigError


@pytest.fixture
def labels():
    rng = np.random.default_rng(1)
    return rng.integers(0, 5, size=503)


def test_each_split_is_disjoint_and_covers_the_pool(labels):
    s = splits.make(labels, 4, 0.2, 0.1, seed=3)
    pool = np.setdiff1d(np.arange(len(labels)), s.holdout)
    for tr, va in zip(s.train, s.val):
        assert len(np.intersect1d(tr, va)) == 0
        assert np.array_equal(np.union1d(tr, va), pool)
        assert len(np.intersect1d(tr, s.holdout)) == 0 and len(np.intersect1d(va, s.holdout)) == 0


def test_splits_are_stratified_and_equal_sized(labels):
    s = splits.make(labels, 4, 0.2, 0.1, seed=3)
    counts = [np.bincount(labels[va], minlength=5) for va in s.val]
    assert all(np.array_equal(c, counts[0]) for c in counts)  # same per-class counts in every split
    pool = np.setdiff1d(np.arange(len(labels)), s.holdout)
    expected = np.round(0.2 * np.bincount(labels[pool], minlength=5))
    assert np.array_equal(counts[0], expected)
    assert len({len(t) for t in s.train}) == 1


def test_splits_are_reproducible_and_differ_between_splits_and_seeds(labels):
    a, b = splits.make(labels, 3, 0.2, 0.1, seed=3), splits.make(labels, 3, 0.2, 0.1, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a.val, b.val))
    assert np.array_equal(a.holdout, b.holdout)
    assert not np.array_equal(a.val[0], a.val[1])
    c = splits.make(labels, 3, 0.2, 0.1, seed=4)
    assert not np.array_equal(a.val[0], c.val[0])


def test_holdout_can_be_disabled(labels):
    s = splits.make(labels, 2, 0.2, 0.0, seed=0)
    assert len(s.holdout) == 0
    assert len(s.train[0]) + len(s.val[0]) == len(labels)


def test_more_splits_than_a_class_has_samples_is_refused():
    y = np.array([0] * 50 + [1] * 3)
    with pytest.raises(ConfigError, match="class 1 has only 3 samples"):
        splits.make(y, 4, 0.2, 0.0, seed=0)


def test_write_once_and_read_back(tmp_path, labels):
    s = splits.make(labels, 2, 0.25, 0.1, seed=0)
    path = tmp_path / "splits.h5"
    splits.write(path, s, {"seed": 0})
    back, attrs = splits.read(path)
    assert all(np.array_equal(x, y) for x, y in zip(s.train + s.val, back.train + back.val))
    assert attrs["seed"] == 0
    with pytest.raises(Exception, match="never rewritten"):
        splits.write(path, s, {})


def test_holdout_halves_are_disjoint_stratified_and_make_up_the_holdout(labels):
    s = splits.make(labels, 4, 0.2, 0.2, seed=3)
    assert len(np.intersect1d(s.holdout_select, s.holdout_estimate)) == 0
    assert np.array_equal(np.union1d(s.holdout_select, s.holdout_estimate), s.holdout)
    per_class = [np.bincount(labels[h], minlength=5) for h in (s.holdout_select, s.holdout_estimate)]
    assert np.abs(per_class[0] - per_class[1]).max() <= 1  # each class split in half (odd counts differ by 1)


def test_no_validation_fraction_trains_every_task_on_the_whole_pool(labels):
    s = splits.make(labels, 3, 0.0, 0.1, seed=3)
    pool = np.setdiff1d(np.arange(len(labels)), s.holdout)
    assert all(len(va) == 0 and np.array_equal(tr, pool) for tr, va in zip(s.train, s.val))
