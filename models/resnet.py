"""CIFAR ResNets (He et al. 2016, option-A shortcuts) as an ordered list of residual blocks.

The network is a stem, ``3n`` residual blocks and a head, so that split learning can cut it after
any block: the client keeps the stem and the first ``cut`` blocks, the server keeps the rest.
Both sides build the *whole* network from the same seed and keep their part, so a split model
starts from exactly the weights of the unsplit one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

STAGE_CHANNELS = (16, 32, 64)


class ShortcutA(nn.Module):
    """Parameter-free shortcut: subsample by 2 and zero-pad the new channels (option A)."""

    def __init__(self, pad_channels: int) -> None:
        super().__init__()
        self.pad_channels = pad_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.pad_channels, self.pad_channels))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        needs_projection = stride != 1 or in_planes != planes
        self.shortcut = ShortcutA(planes // 4) if needs_projection else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def blocks_per_stage(depth: int) -> int:
    """n in depth = 6n + 2."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n+2 with n >= 1 (8, 20, 32, 56, 110, ...), got {depth}")
    return (depth - 2) // 6


def num_blocks(depth: int) -> int:
    return 3 * blocks_per_stage(depth)


def check_cut(depth: int, cut: int) -> None:
    total = num_blocks(depth)
    if not 1 <= cut < total:
        raise ValueError(
            f"cut must satisfy 1 <= cut < {total} for ResNet-{depth} ({total} residual blocks), "
            f"got {cut}"
        )


def cut_shape(depth: int, cut: int) -> tuple[int, int, int]:
    """(C, H, W) of the activations after block ``cut`` for a 32x32 input."""
    check_cut(depth, cut)
    stage = (cut - 1) // blocks_per_stage(depth)
    return STAGE_CHANNELS[stage], 32 >> stage, 32 >> stage


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        n = blocks_per_stage(depth)
        self.depth = depth
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        blocks, in_planes = [], 16
        for stage, planes in enumerate(STAGE_CHANNELS):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_planes, num_classes)
        )
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def split(self, cut: int) -> tuple[nn.Sequential, nn.Sequential]:
        """Client segment (stem + blocks[:cut]) and server segment, sharing this model's modules."""
        check_cut(self.depth, cut)
        client = nn.Sequential(self.stem, *self.blocks[:cut])
        server = nn.Sequential(*self.blocks[cut:], self.head)
        return client, server


def resnet(depth: int, num_classes: int = 10, seed: int | None = None) -> CifarResNet:
    """Build a ResNet; a seed makes the initial weights identical on every party."""
    if seed is None:
        return CifarResNet(depth, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CifarResNet(depth, num_classes)


def split_resnet(
    depth: int, cut: int, num_classes: int = 10, seed: int | None = None
) -> tuple[nn.Sequential, nn.Sequential]:
    return resnet(depth, num_classes, seed).split(cut)
