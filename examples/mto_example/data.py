"""A dataset hpc-mto does not ship, as a map-style torch Dataset: Gaussian blobs, one per class.
Any function returning such a dataset (or a (train, test) pair) with integer labels in ``.targets``
will do; hpc-mto reads it into memory once."""

import numpy as np
import torch
from torch.utils.data import Dataset


class Blobs(Dataset):
    def __init__(self, n: int, classes: int, dim: int, seed: int):
        rng = np.random.default_rng(seed)
        centres = np.random.default_rng(0).normal(0, 1.5, (classes, dim))  # the same in train and test
        self.targets = rng.integers(0, classes, n)
        self.samples = (centres[self.targets] + rng.normal(0, 1, (n, dim))).astype(np.float32)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return torch.from_numpy(self.samples[i]), int(self.targets[i])


def blobs(n: int = 1200, classes: int = 4, dim: int = 16):
    """(train, test): n and n // 4 samples."""
    return Blobs(n, classes, dim, seed=1), Blobs(n // 4, classes, dim, seed=2)
