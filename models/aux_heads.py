"""Auxiliary classifiers that give the client segment a local loss at the cut (DSL).

``fc`` is the paper's single fully connected layer on the flattened activations. Its input is
multiplied by the constant 1/sqrt(H*W): with C*H*W = 16,384 inputs at an early cut, plain SGD at
the paper's learning rate (0.1, and even 0.01) makes the aux loss explode and the client's ReLUs
die (test accuracy 9 % after 3 rounds, see README). The constant rescales the layer's
effective step to its fan-in; it adds no parameter. ``fc_unscaled`` keeps the literal layer for
anyone who wants to reproduce that failure. ``pool_fc`` pools first, so it has C x classes
weights instead of C*H*W x classes: far less to synchronise between clients. ``conv_mlp`` is the
deeper head of DGL/InfoPro (one conv, two linear layers).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Shape = tuple[int, int, int]


class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def fc(shape: Shape, num_classes: int) -> nn.Module:
    c, h, w = shape
    return nn.Sequential(nn.Flatten(), Scale((h * w) ** -0.5), nn.Linear(c * h * w, num_classes))


def fc_unscaled(shape: Shape, num_classes: int) -> nn.Module:
    c, h, w = shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, num_classes))


def pool_fc(shape: Shape, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(shape[0], num_classes))


def conv_mlp(shape: Shape, num_classes: int, hidden: int = 128) -> nn.Module:
    c = shape[0]
    return nn.Sequential(
        nn.Conv2d(c, c, 3, padding=1, bias=False),
        nn.BatchNorm2d(c),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * c, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


AUX_HEADS: dict[str, Callable[[Shape, int], nn.Module]] = {
    "fc": fc,
    "fc_unscaled": fc_unscaled,
    "pool_fc": pool_fc,
    "conv_mlp": conv_mlp,
}


def build_aux_head(name: str, shape: Shape, num_classes: int, seed: int | None = None) -> nn.Module:
    if name not in AUX_HEADS:
        raise ValueError(f"unknown aux-head {name!r}; choose one of {sorted(AUX_HEADS)}")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return AUX_HEADS[name](shape, num_classes)
