"""The CIFAR-size AlexNet of the DC cross-architecture table (and its BatchNorm version from DM's pool).

Source: ``VICO-UoE/DatasetCondensation``, ``networks.py`` (classes ``AlexNet`` and ``AlexNetBN``):
conv5x5(128) -> pool -> conv5x5(192) -> pool -> conv3x3(256) -> conv3x3(192) -> conv3x3(192) -> pool ->
Linear(192*4*4, K), ReLU after every conv, max pooling; the first conv pads by 4 for 1-channel inputs (28x28
behaves like 32x32) and by 2 otherwise.  ``AlexNetBN`` adds BatchNorm2d after every conv.

Adaptations, each a no-op on 1x28x28 and 3x32x32 inputs (where the last map is 4x4 as in the official net):
- a pool that would empty the map is skipped (so 8x8 inputs work);
- where the last map is not 4x4, an adaptive average pool brings it to 4x4 so the classifier keeps the
  official 3072 inputs for any image size;
- ``norm`` chooses the normaliser after each conv (official: none, or batchnorm for AlexNetBN).
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from torch import nn

from ..registry import MODELS
from .base import FeatureNet, check_io
from .layers import can_pool, conv_out, make_norm, pool_out

_FLAT_SIZE = (4, 4)  # the official fc input is 192 * 4 * 4
# (out_channels, kernel, padding, pool after) per stage; the first padding is set per input below.
_CFG = ((128, 5, 2, True), (192, 5, 2, True), (256, 3, 1, False), (192, 3, 1, False), (192, 3, 1, True))


class AlexNet(FeatureNet):
    """AlexNet (DC, CIFAR-size): five convs (128-192-256-192-192) with three max pools, one linear layer."""

    def __init__(
        self,
        *,
        channels: int,
        num_classes: int,
        image_size: Sequence[int] | int,
        norm: str = "none",
    ) -> None:
        super().__init__()
        channels, num_classes, size = check_io(channels, num_classes, image_size)
        stages = []
        in_ch = channels
        for i, (out_ch, kernel, padding, pool) in enumerate(_CFG):
            if i == 0 and channels == 1:
                padding = 4
            size = conv_out(size, kernel, 1, (padding, padding))
            layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, kernel_size=kernel, padding=padding)]
            if norm != "none":
                layers.append(make_norm(norm, out_ch, size))
            layers.append(nn.ReLU())
            if pool and can_pool(size):
                layers.append(nn.MaxPool2d(2, 2))
                size = pool_out(size)
            stages.append(nn.Sequential(*layers))
            in_ch = out_ch
        self.stages = nn.ModuleList(stages)
        fit = [] if size == _FLAT_SIZE else [nn.AdaptiveAvgPool2d(_FLAT_SIZE)]
        self.head = nn.Sequential(*fit, nn.Flatten(1))
        self.classifier = nn.Linear(192 * 4 * 4, num_classes)


MODELS.register("alexnet", AlexNet)
MODELS.register("alexnet_bn", partial(AlexNet, norm="batchnorm"))
