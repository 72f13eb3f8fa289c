"""FTD: flat trajectory distillation (Du et al., CVPR 2023, "Minimizing the Accumulated Trajectory Error to
Improve Dataset Distillation").

FTD is MTT with two changes (anchors.md section 2.6; ``AngusDujw/FTD-distillation``, read for facts):

1. the experts are trained with a sharpness-aware optimiser (GSAM, rho 0.01, alpha 1 by default), so that the
   trajectories the student matches are flat: ``ddkit experts --optimizer gsam`` (``ddkit/experts/gsam.py``).
   A store of plain SGD experts is accepted with a warning (that is MTT with an image EMA, an ablation);
2. the synthetic images are averaged over the iterations with an exponential moving average
   (``distill_FTD.py``: ``ModelEmaV2([image_syn], decay=ema_decay)``, updated after every optimiser step,
   initialised to the initial images), and the average is the distilled set that is evaluated and saved.

Here the moving average *is* ``syn.images``: what periodic evaluation, the image grids, the checkpoints and the
saved set see.  The raw images that the optimiser moves are the method's own parameter, kept in its state
dict (with the optimiser momenta), so a resumed run continues exactly.  The official code evaluates both the raw
and the averaged images; the averaged ones are FTD's result.

Per-setting defaults: FTD Table 7 (repo ``docs/parameters.png``, anchors.md 2.6); elsewhere MTT's defaults with
``distill_FTD.py``'s ``--ema_decay 0.999``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..data.realdata import RealData
from ..errors import ConfigError
from ..registry import METHODS
from ..synthetic import SyntheticSet
from .base import DistillConfig
from .mtt import MTTConfig, TrajectoryMatching, apply_setting_row


@dataclass
class FTDConfig(MTTConfig):
    """FTD options: MTT's plus the decay of the images' moving average."""

    ema_decay: float = 0.999  # distill_FTD.py --ema_decay 0.999


#: FTD Table 7: (syn_steps, expert_epochs, max_start_epoch, lr_img, lr_lr, lr_teacher, batch_syn or 0) and EMA
#: decay.  Experts: GSAM with alpha 0.3 for CIFAR-10 IPC 1/10, 1 elsewhere (the table's alpha column).
FTD_SETTINGS: dict[tuple[str, int], tuple[tuple[int, int, int, float, float, float, int], float]] = {
    ("cifar10", 1): ((50, 2, 2, 100.0, 1e-7, 0.01, 0), 0.9999),
    ("cifar10", 10): ((30, 2, 20, 100.0, 1e-5, 0.001, 0), 0.9995),
    ("cifar10", 50): ((30, 2, 40, 1000.0, 1e-5, 0.01, 0), 0.999),
    ("cifar100", 1): ((40, 3, 20, 1000.0, 1e-5, 0.01, 0), 0.9995),
    ("cifar100", 10): ((20, 2, 40, 1000.0, 1e-5, 0.01, 0), 0.9995),
    ("cifar100", 50): ((80, 2, 40, 1000.0, 1e-5, 0.01, 1000), 0.999),
}


@METHODS.register("ftd")
class FTD(TrajectoryMatching):
    """FTD (Du et al. 2023): MTT on flat (GSAM) expert trajectories with a moving average of the images."""

    name: ClassVar[str] = "ftd"
    Config: ClassVar[type[DistillConfig]] = FTDConfig

    @classmethod
    def default_config(cls, dataset: str, ipc: int) -> DistillConfig:
        cfg = FTDConfig()
        found = FTD_SETTINGS.get((dataset, ipc))
        if found is not None:
            apply_setting_row(cfg, found[0])
            cfg.ema_decay = found[1]
        return cfg

    def setup(self, real: RealData, syn: SyntheticSet, generator: torch.Generator) -> None:
        if not 0.0 <= self.config.ema_decay < 1.0:
            raise ConfigError(f"method.ema_decay must be in [0, 1), got {self.config.ema_decay}")
        # the raw images start where the average starts: at the initial synthetic images
        self.raw = nn.Parameter(syn.images.detach().clone())
        super().setup(real, syn, generator)
        if self.store.spec.optimizer.get("name") != "gsam":
            warnings.warn(f"ftd: the experts in {self.store.root} were trained with "
                          f"{self.store.spec.optimizer.get('name')!r}, not GSAM (`ddkit experts --optimizer gsam`); "
                          "FTD's flat trajectories need GSAM experts", stacklevel=2)

    def image_param(self, syn: SyntheticSet) -> Tensor:
        return self.raw

    def after_step(self, syn: SyntheticSet) -> None:
        d = self.config.ema_decay
        with torch.no_grad():
            syn.images.mul_(d).add_(self.raw.detach(), alpha=1.0 - d)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "raw_images": self.raw.detach().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            self.raw.copy_(state["raw_images"].to(self.raw.device))
