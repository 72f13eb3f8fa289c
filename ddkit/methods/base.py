"""Distiller: the interface every method implements, and the shared pieces they reuse.

A method is one file: a ``Config`` dataclass with typed, cited defaults, ``default_config(dataset, ipc)`` for
per-setting paper defaults, and either ``loss(...)`` (the optimizer step is inherited) or a full ``step(...)``.
``state_dict``/``load_state_dict`` carry everything needed for an exact resume (optimizer momenta, schedules).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..accel import SpeedLayer
from ..data.realdata import RealData
from ..engine.seeding import seeded_global
from ..models import create_model
from ..synthetic import SyntheticSet


@dataclass
class DistillConfig:
    """Options shared by all methods.  Subclasses add their own fields with cited defaults."""

    model: str = "convnet"
    init: str = "real"  # 'real' | 'noise'
    iterations: int = 1000
    lr_img: float = 0.1
    momentum_img: float = 0.5
    soft_labels: bool = False
    learn_labels: bool = False


class Distiller:
    """Base class: SGD on the synthetic images driven by ``loss``; subclasses override what differs."""

    name: ClassVar[str] = "base"
    Config: ClassVar[type[DistillConfig]] = DistillConfig
    #: coreset selectors pick real images and never optimise (the engine runs zero iterations)
    selects_only: ClassVar[bool] = False

    def __init__(self, config: DistillConfig | None = None, *, device: str | torch.device = "cpu",
                 speed: str | SpeedLayer = "auto") -> None:
        self.config = config if config is not None else self.Config()
        self.device = torch.device(device)
        self.optimizer: torch.optim.Optimizer | None = None
        #: the device's speed levers (``speed: auto|plain``); methods ask it for networks and forwards
        self.speed = speed if isinstance(speed, SpeedLayer) else SpeedLayer(speed, self.device)

    # ------------------------------------------------------------------ configuration
    @classmethod
    def default_config(cls, dataset: str, ipc: int) -> DistillConfig:
        """The paper's / official code's defaults for this dataset and IPC (override per method)."""
        return cls.Config()

    @classmethod
    def config_fields(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls.Config)}

    # ------------------------------------------------------------------ lifecycle
    def setup(self, real: RealData, syn: SyntheticSet, generator: torch.Generator) -> None:
        """Create optimizers and any state; called once before the first step (and before a resume)."""
        self.optimizer = torch.optim.SGD(self.learnable_groups(syn), lr=self.config.lr_img,
                                         momentum=self.config.momentum_img)

    def learnable_groups(self, syn: SyntheticSet) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = [{"params": [syn.images]}]
        if isinstance(syn.labels, nn.Parameter) and syn.labels.requires_grad:
            groups.append({"params": [syn.labels]})
        return groups

    def loss(self, it: int, real: RealData, syn: SyntheticSet, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError(f"{type(self).__name__} must implement loss() or step()")

    def step(self, it: int, real: RealData, syn: SyntheticSet, generator: torch.Generator) -> dict[str, float]:
        """One outer iteration: loss, backward, optimizer step.  Returns scalar metrics (at least ``loss``)."""
        assert self.optimizer is not None, "setup() must run before step()"
        loss, metrics = self.loss(it, real, syn, generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": float(loss.detach()), **metrics}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict() if self.optimizer is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.optimizer is not None and state.get("optimizer") is not None:
            # a copy: torch's Optimizer.load_state_dict keeps the given tensors, so loading the state of a live
            # distiller would otherwise share (and advance twice) its momentum buffers
            self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))

    # ------------------------------------------------------------------ helpers shared by methods
    def new_network(self, real: RealData, generator: torch.Generator, model: str | None = None, **overrides: Any) -> nn.Module:
        """A freshly initialised network, its initialisation drawn from ``generator`` (global RNG untouched)."""
        with seeded_global(generator):
            net = create_model(
                model or self.config.model,
                channels=real.channels,
                num_classes=real.num_classes,
                image_size=real.image_size,
                **overrides,
            )
        return self.speed.prepare(net).to(self.device)

    def real_batch(self, real: RealData, c: int, n: int, generator: torch.Generator) -> Tensor:
        """``n`` random real images of class ``c`` on the method's device."""
        return real.sample_class(c, n, generator).to(self.device, non_blocking=True)
