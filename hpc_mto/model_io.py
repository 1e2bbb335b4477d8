"""Load what a finished run produced without unpickling arbitrary code.

``model.pt`` and ``ensemble/member-<t>.pt`` hold plain state dicts (loaded with
``torch.load(weights_only=True)``, which refuses anything but tensors and containers); ``model.json``
says how to rebuild the network and which output the run chose.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import models
from .config import ModelConfig
from .errors import RunDirError
from .records import ModelInfo
from .rundir import RunDir


class Ensemble(torch.nn.Module):
    """The K-model ensemble: the mean of its members' logits."""

    def __init__(self, members: list[torch.nn.Module]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, x):
        return torch.stack([m(x) for m in self.members]).mean(0)


def _network(info: ModelInfo, path: Path) -> torch.nn.Module:
    net = models.build(ModelConfig(**info.model), tuple(info.input_shape), info.num_classes)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RunDirError(f"{path} is missing: the run directory is incomplete") from None
    except Exception as exc:  # weights_only refuses pickled code: report, never run it
        raise RunDirError(f"{path} is not a plain tensor state dict: {str(exc).splitlines()[0]}") from None
    net.load_state_dict(state)
    return net.eval()


def load_selected(run_dir: str | Path) -> torch.nn.Module:
    """The single network in ``model.pt``: the run's output, or with an ensemble output the best
    single network (``model.json``'s ``candidate`` says which)."""
    run = RunDir(run_dir)
    return _network(run.model_record(), run.model_file)


def load_ensemble(run_dir: str | Path) -> Ensemble:
    run = RunDir(run_dir)
    info = run.model_record()
    return Ensemble([_network(info, run.path / member) for member in info.ensemble]).eval()


def load_output(run_dir: str | Path, ensemble: bool | None = None) -> torch.nn.Module:
    """Whatever the run chose as its output (``selection.output``): the ensemble or one network;
    ``ensemble`` True or False asks for one of them instead."""
    run = RunDir(run_dir)
    if ensemble is None:
        ensemble = run.model_record().output == "ensemble"
    return load_ensemble(run_dir) if ensemble else load_selected(run_dir)
