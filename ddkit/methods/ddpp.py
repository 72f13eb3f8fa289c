"""DDPP: dataset distillation using parameter pruning (Li, Togo, Ogawa, Haseyama; arXiv 2209.14609, IEICE Trans.
Fundamentals E107-A(6):936-940, 2024).

What is sourced, and from where:

- the method is MTT in which "difficult-to-match parameters" are pruned during distillation (the abstract of
  both versions; IEICE: "improve distillation performance by pruning difficult-to-match parameters during the
  distillation process"; arXiv v1: "a few parameters in the distillation process are difficult to match, which
  harms the distillation performance");
- difficulty is judged by comparing the teacher's and the student's parameters, and parameters below a
  threshold are dropped from the matching distance (the rule as issue 15 states it);
- no code is public: the repository Awesome-Dataset-Distillation links (``Guang000/mtt-distillation``) is a plain
  MTT fork without pruning (anchors.md sections 0 and 2.7), and the paper's method section could not be read from
  here (its text is not in the corpora this project can search).  The published numbers (CIFAR-10 46.4 / 65.5 /
  71.9, CIFAR-100 24.6 / 43.1 / 48.4) are quoted from FTD's Table 1.

What is implemented, and which choices are ours (not verified against the paper's equations):

- **Which parameters**: every scalar parameter of the network, compared element-wise between the student's
  endpoint ``theta_hat`` and the expert's target ``theta*_{t+M}``, each iteration afresh;
- **the comparison** (ours): the similarity ``s = 1 - |theta_hat - theta*| / (|theta_hat| + |theta*|)``, in
  [0, 1]: 1 for equal values, 0 for opposite signs; it is scale-free, so one threshold serves every layer;
- **the rule**: a parameter with ``s < beta`` is pruned, i.e. left out of both sums of the normalised distance
  (the student's error and the expert's own movement), so the loss stays a ratio of like terms.  The mask is a
  constant of the iteration (no gradient flows through the comparison);
- **the threshold** (ours): ``beta = 0.1``, which prunes the parameters whose student and teacher values
  disagree in sign or differ by about 20x: "a few" parameters (the fraction pruned is logged as ``pruned``).
  ``beta = 0`` prunes nothing and is exactly MTT (``tests/test_mtt.py`` checks this).

Per-setting defaults: DDPP reports the MTT settings (its Table of hyper-parameters is not available here), so
the official MTT table is used.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..errors import ConfigError
from ..registry import METHODS
from .base import DistillConfig
from .mtt import MTTConfig, TrajectoryMatching

Params = dict[str, Tensor]


@dataclass
class DDPPConfig(MTTConfig):
    """DDPP options: MTT's plus the pruning threshold."""

    #: similarity threshold below which a parameter is pruned from the distance (ours; see the docstring)
    beta: float = 0.1


def match_mask(final: Tensor, target: Tensor, beta: float) -> Tensor:
    """True where the student's and the teacher's value are similar enough to be matched (``s >= beta``)."""
    scale = final.abs() + target.abs()
    sim = 1.0 - (final - target).abs() / scale.clamp_min(torch.finfo(scale.dtype).tiny)
    return (sim >= beta) | (scale == 0)


@METHODS.register("ddpp")
class DDPP(TrajectoryMatching):
    """DDPP (Li et al.): MTT with the difficult-to-match parameters pruned from the trajectory distance."""

    name: ClassVar[str] = "ddpp"
    Config: ClassVar[type[DistillConfig]] = DDPPConfig

    def _check_config(self) -> None:
        super()._check_config()
        if not 0.0 <= self.config.beta <= 1.0:
            raise ConfigError(f"method.beta must be in [0, 1] (a similarity threshold), got {self.config.beta}")

    def distance(self, final: Params, start: Params, target: Params) -> tuple[Tensor, Tensor, dict[str, float]]:
        num = den = 0.0
        kept = total = 0
        for k in target:
            with torch.no_grad():
                keep = match_mask(final[k].detach(), target[k], self.config.beta).to(target[k].dtype)
            num = num + (keep * (final[k] - target[k]) ** 2).sum()
            den = den + (keep * (start[k] - target[k]) ** 2).sum()
            kept += int(keep.sum())
            total += keep.numel()
        return num, den, {"pruned": 1.0 - kept / max(total, 1)}
