"""Write and load what a finished run produces, without unpickling anything.

``model.safetensors`` and ``ensemble/member-<t>.safetensors`` hold the networks' state dicts in the
safetensors format (readable by any safetensors library, in any language); ``model.json`` says how to
rebuild the network, how raw samples were preprocessed and which output the run chose. Run directories
of hpc-mto < 0.3 hold ``.pt`` files instead: those are read with ``torch.load(weights_only=True)``,
which refuses anything but tensors and containers.
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch

from . import __version__, models
from .atomic import atomic_path
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


def write_weights(path: Path, state: dict[str, torch.Tensor]) -> None:
    """A state dict as a safetensors file, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        safetensors.torch.save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp),
                                    metadata={"format": "pt", "written_by": f"hpc-mto {__version__}"})


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a safetensors file (or an older run's .pt file), on the CPU."""
    try:
        if path.suffix == ".pt":
            return torch.load(path, map_location="cpu", weights_only=True)
        return safetensors.torch.load_file(str(path))
    except FileNotFoundError:
        raise RunDirError(f"{path} is missing: the run directory is incomplete") from None
    except Exception as exc:  # weights_only refuses pickled code: report, never run it
        raise RunDirError(f"{path} is not a plain tensor state dict: {str(exc).splitlines()[0]}") from None


def _network(info: ModelInfo, path: Path) -> torch.nn.Module:
    net = models.build(ModelConfig(**info.model), tuple(info.input_shape), info.num_classes)
    net.load_state_dict(read_weights(path))
    return net.eval()


def load_selected(run_dir: str | Path) -> torch.nn.Module:
    """The single network in ``model.safetensors``: the run's output, or with an ensemble output the best
    single network (``model.json``'s ``candidate`` says which)."""
    run = RunDir(run_dir)
    return _network(run.model_record(), run.model_file)


def load_ensemble(run_dir: str | Path) -> Ensemble:
    run = RunDir(run_dir)
    info = run.model_record()
    # member_file, not the names model.json lists: it also finds an older run's .pt members.
    return Ensemble([_network(info, run.member_file(t)) for t in range(len(info.ensemble))]).eval()


def load_output(run_dir: str | Path, ensemble: bool | None = None) -> torch.nn.Module:
    """Whatever the run chose as its output (``selection.output``): the ensemble or one network;
    ``ensemble`` True or False asks for one of them instead."""
    run = RunDir(run_dir)
    if ensemble is None:
        ensemble = run.model_record().output == "ensemble"
    return load_ensemble(run_dir) if ensemble else load_selected(run_dir)
