"""A task's exact state as named arrays plus JSON metadata, and the names of its entries.

An entry is ``<kind>:<name>``; the kind says whose tensor it is:

    model:<state_dict key>            the live network
    opt:<parameter name>:<state key>  the optimizer's per-parameter state (exp_avg, momentum_buffer, step)
    best:<state_dict key>             the best-validation snapshot
    swa:<state_dict key>              the running average of the task's own weights (SWA)
    teacher:logits                    the peers' mean logits on the task's training samples (distill)
    rng:<generator>                   a random generator's state

A ``BlockLayout`` names the blocks that travel in a transfer the same way, so a late peer's
checkpoint can stand in for the blocks it would have sent. Whoever owns exact state (the task, a
transfer policy's cache) produces a ``State``; ``checkpoint`` only stores and verifies it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MODEL, OPT, BEST, SWA, TEACHER, RNG = "model", "opt", "best", "swa", "teacher", "rng"


def entry(kind: str, name: str, key: str | None = None) -> str:
    return f"{kind}:{name}" if key is None else f"{kind}:{name}:{key}"


def split(name: str) -> tuple[str, str]:
    """``"model:0.weight"`` -> ``("model", "0.weight")``."""
    kind, _, rest = name.partition(":")
    return kind, rest


def split_opt(name: str) -> tuple[str, str]:
    """``"opt:<parameter>:<state key>"`` -> (parameter, state key); a parameter name may hold ':'."""
    param, _, key = split(name)[1].rpartition(":")
    return param, key


# HDF5 reads "/" in a name as a group separator. torch's own names have none, a user's module may.
def to_hdf5(name: str) -> str:
    return name.replace("/", "|")


def from_hdf5(key: str) -> str:
    return key.replace("|", "/")


@dataclass
class State:
    """Arrays keyed by entry name (numpy, or tensors converted on write) and JSON-able metadata."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def of_kind(self, kind: str) -> dict[str, np.ndarray]:
        """The arrays of one kind, keyed by their names without the kind."""
        return {split(n)[1]: a for n, a in self.arrays.items() if split(n)[0] == kind}
