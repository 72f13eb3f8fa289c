"""LeNet-5 as used in the DC cross-architecture table.

Source: ``VICO-UoE/DatasetCondensation``, ``networks.py`` (class ``LeNet``): conv5x5(6) -> ReLU -> maxpool ->
conv5x5(16) -> ReLU -> maxpool -> Linear(400, 120) -> ReLU -> Linear(120, 84) -> ReLU -> Linear(84, K); the
first conv pads by 2 for 1-channel inputs (28x28 behaves like 32x32) and by 0 otherwise.

Adaptations, each a no-op on 1x28x28 and 3x32x32 inputs (where the last map is 5x5 as in the official net):
- a 5x5 conv on a map smaller than 5 gets just enough padding to give a 1x1 output, and a pool that would
  empty the map is skipped (so 8x8 inputs work);
- where the last map is not 5x5, an adaptive average pool brings it to 5x5 so the fully-connected part keeps
  the official 400 -> 120 -> 84 shape for any input size.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..registry import MODELS
from .base import FeatureNet, check_io
from .layers import Size, can_pool, conv_out, fit_padding, pool_out

_FLAT_SIZE = (5, 5)  # the official fc_1 input is 16 * 5 * 5


def _conv_stage(in_ch: int, out_ch: int, size: Size, padding: int) -> tuple[nn.Sequential, Size]:
    pad = fit_padding(size, 5, padding)
    size = conv_out(size, 5, 1, pad)
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, kernel_size=5, padding=pad), nn.ReLU()]
    if can_pool(size):
        layers.append(nn.MaxPool2d(2, 2))
        size = pool_out(size)
    return nn.Sequential(*layers), size


class LeNet(FeatureNet):
    """LeNet (DC): two conv5x5-ReLU-maxpool stages, then 120 and 84 hidden units; embedding is the 84-d layer."""

    def __init__(self, *, channels: int, num_classes: int, image_size: Sequence[int] | int) -> None:
        super().__init__()
        channels, num_classes, size = check_io(channels, num_classes, image_size)
        conv1, size = _conv_stage(channels, 6, size, 2 if channels == 1 else 0)
        conv2, size = _conv_stage(6, 16, size, 0)
        fit = [] if size == _FLAT_SIZE else [nn.AdaptiveAvgPool2d(_FLAT_SIZE)]
        fc1 = nn.Sequential(*fit, nn.Flatten(1), nn.Linear(16 * 5 * 5, 120), nn.ReLU())
        self.stages = nn.ModuleList([conv1, conv2, fc1])
        self.head = nn.Sequential(nn.Linear(120, 84), nn.ReLU())
        self.classifier = nn.Linear(84, num_classes)


MODELS.register("lenet", LeNet)
