"""The shape every zoo model shares: ``stages -> head -> classifier``.

Distillation methods need more than logits: DM/FRePo match the pre-logit embedding (``features``), CAFE aligns
every intermediate map (``feature_maps``), and FRePo/KRR-style methods replace the last layer
(``classifier``).  The official repositories add ad-hoc ``embed`` methods per class; here one base class
defines all three views from the same modules, so ``forward(x) == classifier(features(x))`` holds by
construction and parameters are visited in the official order (stages, then the classifier).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .layers import Size, check_positive

_POOLS = (nn.AvgPool2d, nn.MaxPool2d)


class FeatureNet(nn.Module):
    """Base class: subclasses fill ``stages`` (a ``ModuleList``), ``head`` and ``classifier`` (an ``nn.Linear``).

    ``head`` maps the last stage's output to the ``[N, D]`` embedding (a flatten, a global pool, or the
    hidden fully-connected layers of LeNet/MLP).
    """

    stages: nn.ModuleList
    head: nn.Module
    classifier: nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, num_classes]``."""
        return self.classifier(self.features(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-logit embedding ``[N, D]`` (the official ``embed``)."""
        for stage in self.stages:
            x = stage(x)
        return self.head(x)

    def feature_maps(self, x: torch.Tensor, *, before_pooling: bool = False) -> list[torch.Tensor]:
        """Output of every stage, then the embedding as the last element (``== features(x)``).

        ``before_pooling``: the maps layer-wise feature alignment matches (CAFE's official ConvNet taps): a stage
        that ends in a pooling layer contributes its activation *before* pooling, and a pooled last stage also its
        pooled output.  A stage is an ``nn.Sequential`` (possibly swapped for an equivalent by the speed layer);
        its ``[:-1]`` slice keeps that class, so the swap's computation serves the taps too.
        """
        maps = []
        pooled = False
        for stage in self.stages:
            if before_pooling and isinstance(stage, nn.Sequential) and len(stage) > 1 and isinstance(stage[-1], _POOLS):
                x = stage[:-1](x)
                maps.append(x)
                x = stage[-1](x)
                pooled = True
            else:
                x = stage(x)
                maps.append(x)
                pooled = False
        if before_pooling and pooled:
            maps.append(x)
        maps.append(self.head(x))
        return maps

    @property
    def feature_dim(self) -> int:
        """D, the width of ``features(x)``."""
        return self.classifier.in_features

    @property
    def uses_batchnorm(self) -> bool:
        """True if any layer keeps batch statistics.

        Methods need this: with BatchNorm the output of one image depends on the rest of the batch, so DM/DC
        forward classes jointly (official ``main_DM.py`` BN branch) and freeze running statistics.
        Computed from the modules, so it stays right after e.g. ``SyncBatchNorm.convert_sync_batchnorm``.
        """
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.modules())


def check_io(channels: int, num_classes: int, image_size: Sequence[int] | int) -> tuple[int, int, Size]:
    """Validate the three arguments every model takes; ``image_size`` may be ``(H, W)`` or one int."""
    check_positive("channels", channels)
    check_positive("num_classes", num_classes)
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    try:
        h, w = image_size  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ConfigError(f"image_size must be (height, width), got {image_size!r}") from None
    check_positive("image height", h)
    check_positive("image width", w)
    return channels, num_classes, (h, w)
