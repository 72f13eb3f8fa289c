"""ConvNet-D, the field's standard distillation backbone (DC, DSA, DM, CAFE, MTT, FTD, DATM, ...).

Source: ``VICO-UoE/DatasetCondensation``, ``networks.py`` (class ``ConvNet``) and ``utils.py``
(``get_default_convnet_setting`` = width 128, depth 3, relu, instancenorm, avgpooling; ``get_network`` for the
ConvNetD*/W*/BN/LN/GN/NN/MP/NP variants registered below).

Differences from the official class (none changes the default nets on 28x28 / 32x32 inputs):
- the classifier width is computed from the real map size; the official code instead assumes that a
  1-channel input is 28x28 (it rewrites ``im_size`` 28 -> 32) and fails for other 1-channel sizes;
- a 2x2 pool that would shrink the map below 1x1 is skipped, so 8x8 inputs work at depth 3 and more;
- activations are not in-place (``torch.func`` transforms need that); ``gelu`` is added;
- ``first_padding`` can override the official first-layer padding rule.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from torch import nn

from ..registry import MODELS
from .base import FeatureNet, check_io
from .layers import (
    can_pool,
    check_pooling,
    check_positive,
    conv_out,
    fit_padding,
    make_activation,
    make_norm,
    make_pool,
    pool_out,
)


class ConvNet(FeatureNet):
    """ConvNet-D (DC/DM/MTT benchmark net): depth x [conv3x3 -> norm -> act -> 2x2 pool], then one linear layer.

    Defaults are the official ConvNet-3: width 128, depth 3, ReLU, instance norm (``GroupNorm(C, C)``), average
    pooling.  On 1x28x28 inputs the first conv pads by 3 so maps are 32 -> 16 -> 8 -> 4 and the embedding is
    128*4*4 = 2048, as in the official code.
    """

    def __init__(
        self,
        *,
        channels: int,
        num_classes: int,
        image_size: Sequence[int] | int,
        width: int = 128,
        depth: int = 3,
        norm: str = "instancenorm",
        activation: str = "relu",
        pooling: str = "avg",
        first_padding: int | None = None,
    ) -> None:
        super().__init__()
        channels, num_classes, size = check_io(channels, num_classes, image_size)
        check_positive("width", width)
        check_positive("depth", depth)
        pooling = check_pooling(pooling)
        make_activation(activation)  # validate the name before building anything
        if first_padding is None:
            # Official rule (networks.py, _make_layers): padding 3 on the first conv for 1-channel inputs
            # (28x28 MNIST-style images become 32x32 maps), padding 1 everywhere else.
            first_padding = 3 if channels == 1 else 1

        stages = []
        in_ch = channels
        for d in range(depth):
            padding = fit_padding(size, 3, first_padding if d == 0 else 1)
            size = conv_out(size, 3, 1, padding)
            layers: list[nn.Module] = [nn.Conv2d(in_ch, width, kernel_size=3, padding=padding)]
            if norm != "none":
                layers.append(make_norm(norm, width, size))
            layers.append(make_activation(activation))
            if pooling != "none" and can_pool(size):
                layers.append(make_pool(pooling))
                size = pool_out(size)
            stages.append(nn.Sequential(*layers))
            in_ch = width

        self.stages = nn.ModuleList(stages)
        self.head = nn.Flatten(1)
        self.classifier = nn.Linear(width * size[0] * size[1], num_classes)


MODELS.register("convnet", ConvNet)
# Variants as in the official utils.get_network (ConvNetD1/D2/D4, W32/W64/W256, BN/LN/GN/NN, MP/NP).
# convnet_d5 is MTT's backbone for 128x128 ImageNet subsets.
_VARIANTS: dict[str, dict[str, object]] = {
    "convnet_d1": {"depth": 1},
    "convnet_d2": {"depth": 2},
    "convnet_d4": {"depth": 4},
    "convnet_d5": {"depth": 5},
    "convnet_w32": {"width": 32},
    "convnet_w64": {"width": 64},
    "convnet_w256": {"width": 256},
    "convnet_bn": {"norm": "batchnorm"},
    "convnet_ln": {"norm": "layernorm"},
    "convnet_gn": {"norm": "groupnorm"},
    "convnet_nn": {"norm": "none"},
    "convnet_maxpool": {"pooling": "max"},
    "convnet_nopool": {"pooling": "none"},
}
for _name, _kwargs in _VARIANTS.items():
    MODELS.register(_name, partial(ConvNet, **_kwargs))
del _name, _kwargs
