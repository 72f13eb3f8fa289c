"""The MLP of the DC cross-architecture table.

Source: ``VICO-UoE/DatasetCondensation``, ``networks.py`` (class ``MLP``): Linear(in, 128) -> ReLU ->
Linear(128, 128) -> ReLU -> Linear(128, K).

Adaptation: the input width is ``channels * H * W`` from the arguments; the official code hard-codes
28*28*1 for 1-channel data and 32*32*3 otherwise.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..registry import MODELS
from .base import FeatureNet, check_io
from .layers import check_positive


class MLP(FeatureNet):
    """MLP (DC): two hidden ReLU layers of width 128 on the flattened image, then a linear classifier.

    ``feature_maps`` gives the two hidden activations; the second is the embedding.
    """

    def __init__(
        self,
        *,
        channels: int,
        num_classes: int,
        image_size: Sequence[int] | int,
        width: int = 128,
    ) -> None:
        super().__init__()
        channels, num_classes, (h, w) = check_io(channels, num_classes, image_size)
        check_positive("width", width)
        self.stages = nn.ModuleList([nn.Sequential(nn.Flatten(1), nn.Linear(channels * h * w, width), nn.ReLU())])
        self.head = nn.Sequential(nn.Linear(width, width), nn.ReLU())
        self.classifier = nn.Linear(width, num_classes)


MODELS.register("mlp", MLP)
