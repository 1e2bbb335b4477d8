"""A network hpc-mto does not ship: a small residual MLP. Any function
``(input_shape, num_classes, **kwargs) -> torch.nn.Module`` will do."""

import math

from torch import nn


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.linear = nn.Linear(width, width)

    def forward(self, x):
        return x + self.linear(self.norm(x).relu())


def residual_mlp(input_shape, num_classes, hidden: int = 64, blocks: int = 2) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden),
                         *[Block(hidden) for _ in range(blocks)], nn.LayerNorm(hidden),
                         nn.Linear(hidden, num_classes))
