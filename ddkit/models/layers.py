"""Building blocks shared by the model zoo: norm / activation / pooling factories and size arithmetic.

Why one module: the official code (``VICO-UoE/DatasetCondensation/networks.py``) repeats
``GroupNorm(c, c) if norm == 'instancenorm' else BatchNorm2d(c)`` in every class and calls ``exit()`` on a bad
name.  Here each spelling lives in one place and a bad name raises :class:`ConfigError` listing the choices.

The size helpers let every architecture compute its classifier width from the real input size instead of
hard-coding CIFAR/MNIST numbers, and let small inputs (8x8) pass through deep nets.
"""
from __future__ import annotations

import math

from torch import nn

from ..errors import ConfigError

Size = tuple[int, int]

NORMS = ("instancenorm", "batchnorm", "layernorm", "groupnorm", "none")
ACTIVATIONS = ("relu", "leakyrelu", "sigmoid", "gelu", "swish")
POOLINGS = ("avg", "max", "none")
# The official code spells pooling 'avgpooling' / 'maxpooling'; accept those too.
_POOLING_ALIASES = {"avgpooling": "avg", "maxpooling": "max"}


def make_norm(kind: str, channels: int, size: Size | None = None) -> nn.Module:
    """A 2-d feature-map normaliser named as in the DC code.

    - ``instancenorm`` is ``GroupNorm(C, C)`` (as in the official code: same statistics as InstanceNorm2d,
      affine per channel, and no running statistics, so it behaves the same in train and eval mode);
    - ``layernorm`` is the official ``LayerNorm([C, H, W])`` with an element-wise affine over (C, H, W);
      it therefore needs the feature-map ``size``;
    - ``groupnorm`` is ``GroupNorm(4, C)``; ``none`` is the identity.
    """
    if kind == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels, affine=True)
    if kind == "groupnorm":
        return nn.GroupNorm(4, channels, affine=True)
    if kind == "layernorm":
        if size is None:
            raise ConfigError("norm 'layernorm' is not supported by this architecture (it needs fixed map sizes)")
        return nn.LayerNorm([channels, size[0], size[1]], elementwise_affine=True)
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"unknown norm {kind!r}; expected one of {', '.join(NORMS)}")


def make_activation(kind: str) -> nn.Module:
    """Activation by name.  Never in-place: in-place ops break ``torch.func`` transforms such as ``vmap``."""
    if kind == "relu":
        return nn.ReLU()
    if kind == "leakyrelu":
        return nn.LeakyReLU(negative_slope=0.01)  # slope as in the official ConvNet
    if kind == "sigmoid":
        return nn.Sigmoid()
    if kind == "gelu":
        return nn.GELU()
    if kind == "swish":
        return nn.SiLU()  # the official Swish, x * sigmoid(x)
    raise ConfigError(f"unknown activation {kind!r}; expected one of {', '.join(ACTIVATIONS)}")


def check_pooling(kind: str) -> str:
    """Canonical pooling name (``avg`` | ``max`` | ``none``)."""
    kind = _POOLING_ALIASES.get(kind, kind)
    if kind not in POOLINGS:
        raise ConfigError(f"unknown pooling {kind!r}; expected one of {', '.join(POOLINGS)}")
    return kind


def make_pool(kind: str) -> nn.Module:
    """2x2, stride-2 pooling as in the official nets."""
    return nn.AvgPool2d(2, 2) if check_pooling(kind) == "avg" else nn.MaxPool2d(2, 2)


def can_pool(size: Size) -> bool:
    """Whether a 2x2/stride-2 pool still leaves at least a 1x1 map.

    Deep nets skip a pool that would empty the map, so 8x8 inputs work at any depth.  The official code has no
    such rule (it crashes instead), so for the sizes it supports nothing changes.
    """
    return min(size) >= 2


def pool_out(size: Size) -> Size:
    return (size[0] // 2, size[1] // 2)


def conv_out(size: Size, kernel: int, stride: int = 1, padding: Size = (0, 0)) -> Size:
    """Output size of a square-kernel convolution."""
    return tuple((n + 2 * p - kernel) // stride + 1 for n, p in zip(size, padding))  # type: ignore[return-value]


def fit_padding(size: Size, kernel: int, padding: int) -> Size:
    """``padding``, raised just enough per side that the convolution output is at least 1x1.

    Used only where an official net would otherwise fail on small inputs (e.g. LeNet's second 5x5 conv on an
    8x8 image); for the sizes the official code supports it returns ``(padding, padding)`` unchanged.
    """
    return tuple(max(padding, math.ceil((kernel - n) / 2)) for n in size)  # type: ignore[return-value]


def check_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value
