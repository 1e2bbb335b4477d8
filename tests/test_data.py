"""The built-in datasets' in-memory path: the digits file read without importing scikit-learn, and
data.augment=standard on the device."""

import numpy as np
import torch

from hpc_mto import data
from hpc_mto.config import Config, DataConfig
from hpc_mto.samples import Crop


def test_digits_read_from_the_bundled_file_are_what_scikit_learn_loads():
    from sklearn.datasets import load_digits

    x, y = data.digits_arrays()
    d = load_digits()
    assert x.dtype == d.data.dtype and np.array_equal(x, d.data)
    assert y.dtype == d.target.dtype and np.array_equal(y, d.target)


def test_a_standard_crop_is_the_padded_image_cut_at_the_drawn_offset_and_flipped_when_drawn():
    crop = Crop(4, True, [-2.0, -1.0, 0.5])
    x = torch.randn(3, 3, 6, 6)
    # (row offset, column offset, flip): the top-left corner flipped; centred; centred and flipped.
    out = crop(x, torch.tensor([[0, 0, 1], [4, 4, 0], [4, 4, 1]]))
    assert torch.equal(out[1], x[1]) and torch.equal(out[2], x[2].flip(-1))
    # The padding is the normalised value of black per channel, and the image's corner lands flipped.
    assert (out[0, :, :4, :] == torch.tensor([-2.0, -1.0, 0.5]).view(3, 1, 1)).all()
    assert torch.equal(out[0, :, 4:, :2], x[0, :, :2, :2].flip(-1))


def test_standard_augmentation_draws_per_sample_from_seed_task_and_epoch_only():
    ds = data.load(DataConfig(name="digits", augment="standard"))
    assert (ds.augment.pad, ds.augment.flip, ds.augment.fill) == (1, False, None)
    train = ds.samples(np.arange(100), "cpu", Config())
    order = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    seen = {}
    for batch_size, first_step in ((10, 0), (25, 0), (10, 4)):  # other batchings, a resumed epoch
        for idx, x, y in train.training_batches(order, batch_size, first_step, (0, 1, 2)):
            assert torch.equal(y, train.y[idx])
            for p, row in zip(idx.tolist(), x):
                assert torch.equal(seen.setdefault(p, row), row)
    assert sum(not torch.equal(seen[p], train.x[p]) for p in seen) > 50  # most samples moved
    other = next(train.training_batches(torch.arange(100), 100, 0, (0, 2, 2)))[1]  # another task
    assert sum(not torch.equal(other[p], seen[p]) for p in range(100)) > 50
    assert torch.equal(torch.cat([x for x, _ in train.batches(30)]), train.x)  # scoring is never augmented
