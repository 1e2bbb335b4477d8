"""Load the selected model of a finished run without unpickling arbitrary code.

``model.pt`` holds a plain state dict (loaded with ``torch.load(weights_only=True)``, which refuses
anything but tensors and containers); ``model.json`` says how to rebuild the network.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import models
from .config import ModelConfig
from .errors import RunDirError
from .rundir import RunDir


def load_selected(run_dir: str | Path) -> torch.nn.Module:
    run = RunDir(run_dir)
    if not run.model_file.is_file() or not run.model_info.is_file():
        raise RunDirError(f"{run.path} has no selected model (model.pt, model.json): the run has not finished")
    info = json.loads(run.model_info.read_text())
    net = models.build(ModelConfig(**info["model"]), tuple(info["input_shape"]), info["num_classes"])
    try:
        state = torch.load(run.model_file, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses pickled code: report, never run it
        raise RunDirError(f"{run.model_file} is not a plain tensor state dict: {str(exc).splitlines()[0]}") from None
    net.load_state_dict(state)
    return net.eval()
