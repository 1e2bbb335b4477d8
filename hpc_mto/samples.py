"""What a task trains and scores on: a set of samples with their labels, in one of two forms.

- ``Arrays``: tensors already on the task's device (the built-in datasets and npz/hdf5 files). Batches
  are slices, no DataLoader; ``data.augment=standard`` is applied to a batch on the device.
- ``Streamed``: a user's map-style ``Dataset`` (``data.factory``), read through a ``DataLoader``
  (``train.num_workers`` processes, pinned memory on a GPU).

Both give a training epoch as batches of positions from a given step on, so a resumed epoch replays
the same batches. Randomness of augmentation is per sample, derived from (seed, task, epoch, position)
and nothing else: the same bits with 0 or 8 loader workers, before and after a resume.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from . import rng

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (positions, inputs, labels), on the device


def per_sample_seeds(key: tuple[int, int, int], n: int) -> np.ndarray:
    """One 63-bit seed per position of an epoch, from (seed, task, epoch) = ``key``."""
    return np.random.default_rng(np.random.SeedSequence([*key, 0x5EED])).integers(0, 2**63 - 1, n)


class Crop:
    """``data.augment=standard`` on in-memory images: a random crop of the image padded by ``pad``
    pixels (the padding is raw black, i.e. the normalised value of 0), and a horizontal flip when
    ``flip``. Each sample's draw depends on (seed, task, epoch, position) only."""

    def __init__(self, pad: int, flip: bool, fill: list[float] | None):
        self.pad, self.flip, self.fill = pad, flip, fill

    def draws(self, key: tuple[int, int, int], n: int, device) -> torch.Tensor:
        """(n, 3): row offset, column offset, flip, per position of the epoch."""
        g = np.random.default_rng(np.random.SeedSequence([*key, 0xC409]))
        d = np.stack([g.integers(0, 2 * self.pad + 1, n), g.integers(0, 2 * self.pad + 1, n),
                      (g.random(n) < 0.5) & self.flip], axis=1)
        return torch.from_numpy(d.astype(np.int64)).to(device)

    def __call__(self, x: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.pad
        padded = F.pad(x, (p, p, p, p))
        if self.fill is not None:  # normalised data: raw black is -mean/std, not 0
            fill = torch.tensor(self.fill, dtype=x.dtype, device=x.device).view(1, c, 1, 1)
            border = torch.ones_like(padded)
            border[:, :, p:p + h, p:p + w] = 0
            padded = padded + border * fill
        rows = draws[:, 0:1] + torch.arange(h, device=x.device)
        cols = draws[:, 1:2] + torch.arange(w, device=x.device)
        cols = torch.where(draws[:, 2:3].bool(), cols.flip(1), cols)
        return padded[torch.arange(b, device=x.device)[:, None, None, None],
                      torch.arange(c, device=x.device)[None, :, None, None],
                      rows[:, None, :, None], cols[:, None, None, :]]


class Arrays:
    """Samples as tensors on the device; ``augment`` (a ``Crop``) applies to training batches only."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, augment: Crop | None = None):
        self.x, self.y, self.augment = x, y, augment

    @classmethod
    def of(cls, x: np.ndarray, y: np.ndarray, device, augment: Crop | None = None) -> "Arrays":
        return cls(torch.from_numpy(np.ascontiguousarray(x)).to(device),
                   torch.from_numpy(np.ascontiguousarray(y)).to(device), augment)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def subset(self, positions) -> "Arrays":
        positions = torch.as_tensor(np.asarray(positions, dtype=np.int64), device=self.x.device)
        return Arrays(self.x[positions], self.y[positions], self.augment)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every sample in order, as stored (no augmentation): for scoring."""
        for start in range(0, len(self), batch_size):
            yield self.x[start:start + batch_size], self.y[start:start + batch_size]

    def training_batches(self, order: torch.Tensor, batch_size: int, first_step: int,
                         key: tuple[int, int, int]) -> Iterator[Batch]:
        draws = self.augment.draws(key, len(self), self.x.device) if self.augment else None
        for start in range(first_step * batch_size, len(order), batch_size):
            idx = order[start:start + batch_size]
            x = self.x[idx]
            yield idx, (self.augment(x, draws[idx]) if draws is not None else x), self.y[idx]


class _Seeded(torch.utils.data.Dataset):
    """Item ``(dataset index, seed)``: the dataset's item drawn with every global RNG seeded by
    ``seed``, so whatever randomness the user's ``__getitem__`` uses is fixed per sample."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, item):
        index, seed = item
        if seed is not None:
            rng.seed_everything(int(seed))
        return _sample(self.dataset[int(index)])

    def __len__(self):
        return len(self.dataset)


def _sample(item) -> torch.Tensor:
    return torch.as_tensor(np.asarray(item[0], dtype=np.float32))


class Streamed:
    """A user's map-style dataset read through a DataLoader: positions ``index`` of it, labels from its
    ``.targets``. ``train_view`` is what training batches come from (it may augment), ``eval_view``
    what scoring reads (without augmentation; the same object when the factory has no ``augment``)."""

    def __init__(self, train_view, eval_view, index: np.ndarray, labels: np.ndarray, input_shape: tuple,
                 device, num_workers: int):
        self.train_view, self.eval_view, self.index = train_view, eval_view, np.asarray(index, dtype=np.int64)
        self.y = torch.from_numpy(np.ascontiguousarray(labels[self.index])).to(device)
        self._labels, self.input_shape, self.num_workers = labels, input_shape, num_workers
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.index)

    def subset(self, positions) -> "Streamed":
        return Streamed(self.train_view, self.eval_view, self.index[np.asarray(positions, dtype=np.int64)],
                        self._labels, self.input_shape, self.device, self.num_workers)

    def _loader(self, dataset, batches: list[list]):
        # An own generator: a loader would otherwise draw its workers' base seed from torch's global
        # RNG, which training's dropout draws from too.
        return torch.utils.data.DataLoader(_Seeded(dataset), batch_sampler=batches, num_workers=self.num_workers,
                                           pin_memory=self.device.type == "cuda", collate_fn=torch.stack,
                                           generator=torch.Generator())

    def _read(self, dataset, batches: list[list], seeded: bool) -> Iterator[torch.Tensor]:
        if not batches:
            return
        loader = iter(self._loader(dataset, batches))
        # Without workers the per-sample seeding runs in this process: training's RNG streams
        # (dropout) are put back as they were before each batch was read.
        keep = seeded and self.num_workers == 0
        while True:
            kept = rng.Kept() if keep else None
            try:
                x = next(loader)
            except StopIteration:
                return
            if kept is not None:
                kept.restore()
            yield x.to(self.device, non_blocking=True)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plan = [[(i, None) for i in self.index[s:s + batch_size]] for s in range(0, len(self), batch_size)]
        for b, x in enumerate(self._read(self.eval_view, plan, seeded=False)):
            yield x, self.y[b * batch_size:(b + 1) * batch_size]

    def training_batches(self, order: torch.Tensor, batch_size: int, first_step: int,
                         key: tuple[int, int, int]) -> Iterator[Batch]:
        seeds = per_sample_seeds(key, len(self))
        order_np = order.cpu().numpy()
        starts = range(first_step * batch_size, len(order_np), batch_size)
        plan = [[(self.index[p], seeds[p]) for p in order_np[s:s + batch_size]] for s in starts]
        for s, x in zip(starts, self._read(self.train_view, plan, seeded=True)):
            idx = order[s:s + batch_size]
            yield idx, x, self.y[idx]


Samples = Arrays | Streamed
