"""ResNet-18, CIFAR-style, with instance norm (DC's default ResNet18) or batch norm (ResNet18BN).

Source: ``VICO-UoE/DatasetCondensation``, ``networks.py`` (classes ``BasicBlock`` and ``ResNet``,
``ResNet18`` / ``ResNet18BN``; itself after ``kuangliu/pytorch-cifar``): a 3x3 stride-1 stem with 64 channels
(no max pool), four stages of two basic blocks (64, 128, 256, 512; stride 2 from the second stage, 1x1-conv
shortcuts where the shape changes), norm ``GroupNorm(C, C)`` ("instancenorm") or BatchNorm2d, then a 4x4
average pool and Linear(512, K).

Adaptations:
- the official ``F.avg_pool2d(out, 4)`` assumes a 4x4 last map (true for 28x28 and 32x32 inputs); it is a
  global average pool here, which gives the same result there and works for 8x8 or 64x64 inputs;
- the residual sum is not in-place and the ReLUs are not in-place (for ``torch.func`` transforms).
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from ..registry import MODELS
from .base import FeatureNet, check_io
from .layers import make_norm


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection; the first conv carries the stage's stride."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = make_norm(norm, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = make_norm(norm, out_ch)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False), make_norm(norm, out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(FeatureNet):
    """ResNet-18 (DC, CIFAR-style): 3x3 stem, 4 stages of 2 basic blocks (64-128-256-512), global avg pool."""

    def __init__(
        self,
        *,
        channels: int,
        num_classes: int,
        image_size: Sequence[int] | int,
        norm: str = "instancenorm",
    ) -> None:
        super().__init__()
        channels, num_classes, _ = check_io(channels, num_classes, image_size)
        stem = nn.Sequential(
            nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False), make_norm(norm, 64), nn.ReLU()
        )
        stages: list[nn.Module] = [stem]
        in_ch = 64
        for out_ch, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(BasicBlock(in_ch, out_ch, stride, norm), BasicBlock(out_ch, out_ch, 1, norm)))
            in_ch = out_ch
        self.stages = nn.ModuleList(stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.classifier = nn.Linear(512, num_classes)


MODELS.register("resnet18", ResNet18)
MODELS.register("resnet18_bn", partial(ResNet18, norm="batchnorm"))
