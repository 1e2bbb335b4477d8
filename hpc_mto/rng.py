"""The global random generators training draws from: seeding them, and capturing their state for
exact resume (torch, CUDA when in use, numpy's legacy generator, Python's ``random``)."""

from __future__ import annotations

import random

import numpy as np
import torch

from .state import RNG, State, entry


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture(state: State) -> None:
    """Add every generator's state to ``state`` (arrays for the big ones, JSON for the rest)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state.arrays[entry(RNG, "torch")] = torch.get_rng_state().numpy()
    state.arrays[entry(RNG, "numpy_keys")] = keys
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state.arrays[entry(RNG, "cuda")] = torch.cuda.get_rng_state().numpy()
    version, internal, gauss_next = random.getstate()
    state.meta["rng"] = {"numpy": [int(pos), int(has_gauss), float(gauss)],
                         "python": [version, list(internal), gauss_next]}


def restore(state: State) -> None:
    arrays, meta = state.of_kind(RNG), state.meta["rng"]
    torch.set_rng_state(torch.from_numpy(np.asarray(arrays["torch"])))
    if "cuda" in arrays and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.from_numpy(np.asarray(arrays["cuda"])))
    pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state(("MT19937", np.asarray(arrays["numpy_keys"]), pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


class Kept:
    """The generators' state at construction, put back by ``restore()``: for code that must draw
    (or seed) without moving the streams training draws from."""

    def __init__(self):
        self.torch, self.numpy, self.python = torch.get_rng_state(), np.random.get_state(), random.getstate()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() \
            else None

    def restore(self) -> None:
        torch.set_rng_state(self.torch)
        np.random.set_state(self.numpy)
        random.setstate(self.python)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
