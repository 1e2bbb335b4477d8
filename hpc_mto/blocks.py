"""Parameter blocks: which state entries travel in a transfer, packed into one flat float32 buffer.

A ``BlockLayout`` is derived from the model, the optimizer and the ``transfer.blocks`` patterns only,
so every task computes the same layout without talking to the others. One contiguous buffer per
transfer lets MPI move it with a single buffer-based call (no pickling) and lets a task keep a
constant number of block-sized buffers whatever K is.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np
import torch

from .state import MODEL, OPT, entry

# Optimizer state entries that are per-parameter tensors of the parameter's own shape (or a scalar
# step count): they travel with an adopted block when transfer.optimizer_state is "copy".
OPT_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "step")


def select_names(state: dict[str, torch.Tensor], patterns) -> list[str]:
    """Floating-point entries matching any glob pattern, in the model's own order.

    Integer buffers (BatchNorm's num_batches_tracked) never travel: they count this task's steps.
    """
    return [n for n, t in state.items()
            if t.is_floating_point() and any(fnmatch.fnmatchcase(n, p) for p in patterns)]


@dataclass
class Entry:
    name: str  # a state entry (hpc_mto.state): model:<state key> or opt:<param name>:<state key>
    shape: tuple
    offset: int
    size: int


class BlockLayout:
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, patterns,
                 with_optimizer_state: bool):
        state = model.state_dict()
        self.model_names = select_names(state, patterns)
        self._model = model
        self._optimizer = optimizer
        self._param_by_name = dict(model.named_parameters())
        self.with_optimizer_state = with_optimizer_state and optimizer is not None
        self._pinned: torch.Tensor | None = None  # GPU: the host staging buffer (see _staging)
        self.entries: list[Entry] = []
        offset = 0
        for name in self.model_names:
            t = state[name]
            self.entries.append(Entry(entry(MODEL, name), tuple(t.shape), offset, t.numel()))
            offset += t.numel()
        if self.with_optimizer_state:
            for name in self.model_names:
                for key, t in self._opt_state(name).items():
                    self.entries.append(Entry(entry(OPT, name, key), tuple(t.shape), offset, t.numel()))
                    offset += t.numel()
        self.size = offset

    def _opt_state(self, name: str) -> dict[str, torch.Tensor]:
        param = self._param_by_name.get(name)
        if param is None or self._optimizer is None:
            return {}
        state = self._optimizer.state.get(param, {})
        return {k: state[k] for k in OPT_KEYS if isinstance(state.get(k), torch.Tensor)
                and state[k].is_floating_point()}

    def tensors(self) -> list[torch.Tensor]:
        """The live tensors behind each entry, in layout order (writes go into the model)."""
        state = self._model.state_dict()
        out = [state[n] for n in self.model_names]
        if self.with_optimizer_state:
            for name in self.model_names:
                out += list(self._opt_state(name).values())
        if len(out) != len(self.entries):
            raise RuntimeError("optimizer state appeared or vanished since the layout was built")
        return out

    def empty(self) -> np.ndarray:
        return np.empty(self.size, dtype=np.float32)

    def pack(self, out: np.ndarray | None = None) -> np.ndarray:
        out = self.empty() if out is None else out
        tensors = self.tensors()
        if tensors and tensors[0].is_cuda:
            # On a GPU: one buffer assembled on the device, one copy to the host through the pinned
            # staging buffer, instead of one small device-to-host copy per tensor.
            with torch.no_grad():
                staging = self._staging()
                staging.copy_(torch.cat([t.detach().reshape(-1).float() for t in tensors]))
            out[:] = staging.numpy()
            return out
        for e, t in zip(self.entries, tensors):
            out[e.offset:e.offset + e.size] = t.detach().reshape(-1).numpy()
        return out

    def unpack(self, buf: np.ndarray, model_only: bool = False) -> None:
        tensors = self.tensors()
        with torch.no_grad():
            if tensors and tensors[0].is_cuda:
                staging = self._staging()
                staging.numpy()[:] = buf
                on_device = staging.to(tensors[0].device)  # one host-to-device copy (synchronous: staging is reused)
            for e, t in zip(self.entries, tensors):
                if model_only and not e.name.startswith(MODEL + ":"):
                    continue
                if t.is_cuda:
                    t.copy_(on_device[e.offset:e.offset + e.size].view(e.shape))
                else:
                    t.copy_(torch.from_numpy(buf[e.offset:e.offset + e.size]).view(e.shape))

    def _staging(self) -> torch.Tensor:
        """The pinned host buffer every GPU pack and unpack goes through (one per layout, made once)."""
        if self._pinned is None:
            self._pinned = torch.empty(self.size, dtype=torch.float32, pin_memory=True)
        return self._pinned

    def reset_optimizer_state(self) -> None:
        """Zero the optimizer state of the selected parameters (transfer.optimizer_state=reset)."""
        if self._optimizer is None:
            return
        with torch.no_grad():
            for name in self.model_names:
                for t in self._opt_state(name).values():
                    t.zero_()

    def from_entries(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """Pack from arrays keyed by entry name (a peer's checkpoint read from disk)."""
        out = self.empty()
        for e in self.entries:
            out[e.offset:e.offset + e.size] = np.asarray(arrays[e.name], np.float32).reshape(-1)
        return out
