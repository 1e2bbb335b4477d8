"""The names of the built-in datasets and models, and where each is defined.

One place lists them: the config's choices, the README's table and the loaders all read these
registries. An entry is ``"module:function"`` and is imported on first use, so validating a config
in the launcher (or in ``status``/``report``) knows every name without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Callable


class Registry:
    """Built-in entries, plus (with ``group``) the names installed packages register under that
    entry-point group; a package's entry is a factory ``(input_shape, num_classes, **kwargs)``."""

    def __init__(self, kind: str, entries: dict[str, str], group: str | None = None):
        self.kind = kind
        self.group = group
        self._entries = dict(entries)

    def installed(self) -> dict[str, str]:
        if self.group is None:
            return {}
        from .factories import entry_points

        return {name: spec for name, spec in entry_points(self.group).items() if name not in self._entries}

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries) + tuple(self.installed())

    def is_builtin(self, name: str) -> bool:
        return name in self._entries

    def spec(self, name: str) -> str:
        return self._entries.get(name) or self.installed()[name]

    def get(self, name: str) -> Callable:
        module, _, attr = self.spec(name).partition(":")
        return getattr(importlib.import_module(module), attr)


DATASETS = Registry("dataset", {
    "digits": "hpc_mto.data:digits",
    "mnist1d": "hpc_mto.data:mnist1d",
    "mnist": "hpc_mto.data:mnist",
    "fashion_mnist": "hpc_mto.data:fashion_mnist",
    "cifar10": "hpc_mto.data:cifar10",
    "cifar100": "hpc_mto.data:cifar100",
    "npz": "hpc_mto.data:user_arrays",
    "hdf5": "hpc_mto.data:user_arrays",
})

MODELS = Registry("model", {
    "mlp": "hpc_mto.models:mlp",
    "cnn1d": "hpc_mto.models:cnn1d",
    "lenet": "hpc_mto.models:lenet",
    "resnet18": "hpc_mto.models:resnet18",
}, group="hpc_mto.models")
