"""A dataset hpc-mto does not ship, as a map-style torch Dataset: Gaussian blobs, one per class.

Any function returning such a dataset (or a (train, test) pair) with integer labels in ``.targets``
will do; hpc-mto reads it through a DataLoader (``train.num_workers`` processes). A factory that takes
an ``augment`` argument is called twice: ``augment=True`` gives what training reads, ``augment=False``
what hpc-mto scores. Augmentation may draw from torch's, numpy's or Python's global generator:
hpc-mto seeds them per sample from (seed, task, epoch, sample), so runs stay exactly repeatable and
resumable whatever the number of loader workers.
"""

import numpy as np
import torch
from torch.utils.data import Dataset


class Blobs(Dataset):
    def __init__(self, n: int, classes: int, dim: int, seed: int, jitter: float = 0.0):
        rng = np.random.default_rng(seed)
        centres = np.random.default_rng(0).normal(0, 1.5, (classes, dim))  # the same in train and test
        self.targets = rng.integers(0, classes, n)
        self.samples = (centres[self.targets] + rng.normal(0, 1, (n, dim))).astype(np.float32)
        self.jitter = jitter

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        x = torch.from_numpy(self.samples[i])
        if self.jitter:  # augmentation: a little noise, drawn from torch's global generator
            x = x + self.jitter * torch.randn_like(x)
        return x, int(self.targets[i])


def blobs(n: int = 1200, classes: int = 4, dim: int = 16, augment: bool = False, jitter: float = 0.3):
    """(train, test): n and n // 4 samples; with ``augment`` the training samples get noise."""
    return (Blobs(n, classes, dim, seed=1, jitter=jitter if augment else 0.0),
            Blobs(n // 4, classes, dim, seed=2))
