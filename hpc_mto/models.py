"""The built-in networks (their names are listed in ``registry.MODELS``). Input shape and class count
come from the dataset; ``width``/``depth`` from the config. ``build`` checks the network accepts the
input shape, so a mismatch is a one-line error before any training, not a shape error deep inside a
forward pass.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig
from .errors import ConfigError, DataError
from .factories import resolve
from .registry import MODELS


def mlp(cfg: ModelConfig, shape, classes) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width_in = math.prod(shape)
    for _ in range(cfg.depth):
        layers += [nn.Linear(width_in, cfg.width), nn.ReLU()]
        width_in = cfg.width
    return nn.Sequential(*layers, nn.Linear(width_in, classes))


class ConvBase1d(nn.Module):
    """MNIST-1D's reference CNN (upstream ``ConvBase``), with the linear input size computed."""

    def __init__(self, shape, classes, channels):
        super().__init__()
        if len(shape) != 2:
            raise DataError(f"model cnn1d takes 1-D signals of shape (channels, length); "
                            f"this dataset has samples of shape {tuple(shape)}")
        self.conv1 = nn.Conv1d(shape[0], channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        length = shape[1]
        for k in (5, 3, 3):
            length = (length + 2 - k) // 2 + 1
        self.linear = nn.Linear(channels * length, classes)

    def forward(self, x):
        h = self.conv3(self.conv2(self.conv1(x).relu()).relu()).relu()
        return self.linear(h.flatten(1))


def lenet(cfg: ModelConfig, shape, classes) -> nn.Module:
    if len(shape) != 3:
        raise DataError(f"model lenet takes images of shape (channels, height, width); "
                        f"this dataset has samples of shape {tuple(shape)}")
    features = nn.Sequential(
        nn.Conv2d(shape[0], 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
    with torch.no_grad():
        try:
            n = features(torch.zeros(1, *shape)).shape[1]
        except RuntimeError:
            raise DataError(f"model lenet needs images of at least 12x12 pixels; this dataset has "
                            f"{shape[1]}x{shape[2]}") from None
    return nn.Sequential(features, nn.Linear(n, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                         nn.Linear(84, classes))


def resnet18(cfg: ModelConfig, shape, classes) -> nn.Module:
    import torchvision

    if len(shape) != 3:
        raise DataError(f"model resnet18 takes images of shape (channels, height, width); "
                        f"this dataset has samples of shape {tuple(shape)}")
    net = torchvision.models.resnet18(num_classes=classes)
    # Small inputs (32x32 and below): a 3x3 stride-1 stem and no max-pool keep enough resolution.
    net.conv1 = nn.Conv2d(shape[0], 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def cnn1d(cfg: ModelConfig, shape, classes) -> nn.Module:
    return ConvBase1d(shape, classes, cfg.width)


def user_code(cfg: ModelConfig) -> str | None:
    """The "module:function" of the user's network (a factory or an installed package's name), if any."""
    if cfg.factory:
        return cfg.factory
    return None if MODELS.is_builtin(cfg.name) else MODELS.spec(cfg.name)


def build(cfg: ModelConfig, input_shape: tuple, num_classes: int) -> nn.Module:
    """The configured network, checked on two zero samples: it must be an ``nn.Module`` giving one
    logit per class, or the run stops here with one line."""
    spec = user_code(cfg)
    if spec:
        key, what = ("model.factory", cfg.factory) if cfg.factory else (f"model.name={cfg.name}", cfg.name)
        try:
            model = resolve(key, spec)(tuple(input_shape), num_classes, **cfg.kwargs)
        except TypeError as exc:  # most often model.kwargs naming an argument the function lacks
            raise ConfigError(f"invalid config: {key} failed when called as f(input_shape={tuple(input_shape)}, "
                              f"num_classes={num_classes}, **{cfg.kwargs}): {exc}") from None
        if not isinstance(model, nn.Module):
            raise ConfigError(f"invalid config: {key} returned a {type(model).__name__}, not a torch.nn.Module")
    else:
        what = cfg.name
        model = MODELS.get(cfg.name)(cfg, tuple(input_shape), num_classes)
    model.eval()
    with torch.no_grad():
        try:
            out = model(torch.zeros(2, *input_shape))
        except RuntimeError as exc:
            raise DataError(f"model {what} cannot take samples of shape {tuple(input_shape)}: "
                            f"{str(exc).splitlines()[0]}") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DataError(f"model {what} gives {got} for 2 samples; it must give one logit per class: (2, {num_classes})")
    return model
