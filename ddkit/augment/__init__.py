"""Differentiable siamese augmentation (DSA).

``DSA`` samples parameters from an explicit ``torch.Generator`` and applies them differentiably; applying the
same params to a real and a synthetic batch gives both the same transformation.  ``ops`` holds the pure ops.
"""
from __future__ import annotations

from . import ops
from .dsa import DEFAULT_STRATEGY, DSA, FAMILY_NAMES, DSAParams, parse_strategy

__all__ = ["DSA", "DSAParams", "DEFAULT_STRATEGY", "FAMILY_NAMES", "parse_strategy", "ops"]
