"""VGG-11 with instance norm (DC's default VGG) and with batch norm.

Source: ``VICO-UoE/DatasetCondensation``, ``networks.py`` (class ``VGG``, ``VGG11`` / ``VGG11BN``):
config [64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M], each conv3x3 -> norm -> ReLU with
``GroupNorm(C, C)`` ("instancenorm") or BatchNorm2d, max pooling, then Linear(512, K) on the 1x1 map.  The first
conv pads by 3 for 1-channel inputs (28x28 behaves like 32x32) and by 1 otherwise.

Adaptations, each a no-op on 1x28x28 and 3x32x32 inputs (where the last map is 1x1 as in the official net):
- a pool that would empty the map is skipped (so 8x8 inputs work);
- where the last map is larger than 1x1 (e.g. 64x64 inputs), a global average pool precedes the classifier,
  instead of the official no-op ``AvgPool2d(1, 1)`` that would leave a too-wide embedding.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from torch import nn

from ..registry import MODELS
from .base import FeatureNet, check_io
from .layers import can_pool, conv_out, make_norm, pool_out

# Channels per conv; each inner tuple is one stage, ending with a 2x2 max pool.
_VGG11 = ((64,), (128,), (256, 256), (512, 512), (512, 512))


class VGG11(FeatureNet):
    """VGG-11 (DC, CIFAR-size): 8 conv3x3-norm-ReLU layers in 5 max-pooled stages, one linear layer on 512-d."""

    def __init__(
        self,
        *,
        channels: int,
        num_classes: int,
        image_size: Sequence[int] | int,
        norm: str = "instancenorm",
    ) -> None:
        super().__init__()
        channels, num_classes, size = check_io(channels, num_classes, image_size)
        stages = []
        in_ch = channels
        first = True
        for widths in _VGG11:
            layers: list[nn.Module] = []
            for out_ch in widths:
                padding = 3 if first and channels == 1 else 1
                first = False
                size = conv_out(size, 3, 1, (padding, padding))
                layers += [
                    nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=padding),
                    make_norm(norm, out_ch, size),
                    nn.ReLU(),
                ]
                in_ch = out_ch
            if can_pool(size):
                layers.append(nn.MaxPool2d(2, 2))
                size = pool_out(size)
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        fit = [] if size == (1, 1) else [nn.AdaptiveAvgPool2d(1)]
        self.head = nn.Sequential(*fit, nn.Flatten(1))
        self.classifier = nn.Linear(in_ch, num_classes)


MODELS.register("vgg11", VGG11)
MODELS.register("vgg11_bn", partial(VGG11, norm="batchnorm"))
