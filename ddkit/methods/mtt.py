"""MTT: dataset distillation by matching training trajectories (Cazenavette et al., CVPR 2022).

Every iteration takes a random expert of the store and a random start epoch ``t < max_start_epoch``, trains a
student from the expert's parameters ``theta*_t`` for ``syn_steps`` SGD steps on synthetic mini-batches with the
learnable step size, and moves the images and the step size to minimise

    || theta_hat_{t+N} - theta*_{t+M} ||^2  /  || theta*_t - theta*_{t+M} ||^2        (M = expert_epochs)

Source: ``GeorgeCazenavette/mtt-distillation``, ``distill.py`` (anchors.md section 2.5, read for facts).  What is
the same: the student's steps (SGD without momentum, ``lr * grad``, cross-entropy, DSA per sample on every
synthetic batch, mini-batches of ``batch_syn`` drawn by splitting a fresh permutation and taking the chunks from
the end), the loss (the official code divides both terms by the number of parameters, which cancels), the
optimisers (images: SGD ``lr_img``, momentum 0.5; step size: SGD ``lr_lr``, momentum 0.5; one optimiser with
two parameter groups is the same update) and the per-setting defaults (:func:`default_config`).
What differs, and why:

- **The gradient, with memory that does not grow with syn_steps.**  The official code keeps every student in
  the autograd graph (``create_graph=True`` at each step): 4.8 / 8.1 / 15.1 GiB at syn_steps 10 / 20 / 40 on
  Fashion-MNIST IPC 10 (anchors.md section R).  Here the student is unrolled by
  :func:`ddkit.functional.unroll.unroll_sgd`; its default ``grad_mode="checkpoint"`` keeps only each step's
  parameters and walks back one recomputed step at a time (Hessian-vector products), which is the *exact*
  gradient, cross-step terms included (unlike TESLA's published code), with the activation memory of one step.
  ``grad_mode="graph"`` is the official all-in-one graph, kept for checking; ``tests/test_mtt.py`` checks in
  float64 that both give the same image and step-size gradients.
- **The learned step size stays positive.**  The official code applies plain SGD to ``syn_lr``, which can go
  negative (mtt-distillation#16; a negative step makes the student ascend and the run diverge).  Here the update
  is the official one followed by a projection onto ``[min_lr, inf)`` (projected SGD).  A log-parameterisation
  was not used because it multiplies the step size's gradient by the step size itself (0.01 to 0.001), which
  would silently change what the published ``lr_lr`` values mean; the projection changes nothing as long as the
  official run would have stayed positive.  The step size lives in the synthetic set (``extras["lr"]``,
  :attr:`SyntheticSet.learned_lr`), so ``ddkit evaluate`` trains with it.
- **Non-finite values stop the run with nothing applied.**  A NaN/Inf loss or gradient is reported before the
  optimiser step (the images stay as they were), and the engine stops with a message naming the last good
  checkpoint (mtt-distillation#6, #42).
- **The expert store is checked.**  The store (``ddkit experts``) says which dataset, model and preprocessing
  its trajectories come from; a store that does not match the run, or is shorter than
  ``max_start_epoch - 1 + expert_epochs`` epochs, is refused with a message naming what differs.
- **Random streams.**  The expert, the start epoch, the mini-batch order and the DSA parameters come from the
  run's generator (the official code uses numpy's and torch's global RNGs and walks a shuffled buffer file by
  file); the expert is drawn uniformly, as the official ``--load_all`` path does.
- **Segments and torchrun.**  ``segments`` (default 1, the paper's and the official code's one expert segment per
  iteration) sets how many segments an iteration matches; the loss is their mean.  Under torchrun every rank
  draws every segment (expert, start epoch, batches: the generator stays in step), unrolls segments
  ``s % world == rank`` and the gradients are summed over ranks (:func:`ddkit.distributed.sum_gradients_`), so
  a run equals the single-process run with the same ``segments`` up to float order.  With one segment rank 0
  does all the work (same result, no speed-up): scaling out means ``segments >= world``, a larger batch of
  segments per step than the paper's.  Metrics other than the loss describe segment 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import distributed
from ..data.realdata import RealData
from ..errors import ConfigError
from ..evaluation.train import classification_loss
from ..functional.unroll import unroll_sgd
from ..registry import METHODS
from ..synthetic import SyntheticSet
from .base import DistillConfig, Distiller
from .common import resolve_dsa

Params = dict[str, Tensor]
GRAD_MODES = ("checkpoint", "graph")


# ---------------------------------------------------------------------------------------------------------- config
@dataclass
class MTTConfig(DistillConfig):
    """MTT options; defaults are ``distill.py``'s argparse defaults unless stated (per setting: default_config)."""

    #: the expert store (``ddkit experts --out DIR``; ``ddkit distill --experts DIR``)
    experts: str | None = None
    model: str = "convnet"  # --model ConvNet (must be the store's model)
    init: str = "real"  # --pix_init real
    iterations: int = 5000  # --Iteration 5000
    lr_img: float = 1000.0  # --lr_img 1000; optimizer_img = SGD([image_syn], lr_img, momentum=0.5)
    momentum_img: float = 0.5  # also the step size's momentum: optimizer_lr = SGD([syn_lr], lr_lr, momentum=0.5)
    lr_lr: float = 1e-5  # --lr_lr 1e-5
    lr_teacher: float = 0.01  # --lr_teacher 0.01: the initial learned step size
    syn_steps: int = 20  # --syn_steps 20 (N)
    expert_epochs: int = 3  # --expert_epochs 3 (M)
    max_start_epoch: int = 25  # --max_start_epoch 25 (start epoch drawn from 0..max_start_epoch-1)
    batch_syn: int = 0  # --batch_syn None: 0 = the whole synthetic set per step
    #: DSA strategy of the student's batches; "auto" = the dataset's (no flip for digit datasets), "none" = off
    dsa_strategy: str = "auto"
    #: "checkpoint" (exact gradient, memory flat in syn_steps) or "graph" (the official unrolled graph)
    grad_mode: str = "checkpoint"
    #: floor of the learned step size (projected SGD; see the module docstring)
    min_lr: float = 1e-6
    #: expert segments per iteration, loss = their mean (official: 1); split over torchrun ranks (docstring)
    segments: int = 1


#: Per-setting commands of the official README (anchors.md 2.5; DC-BENCH methods/tm/readme.md, "parameters
#: provided by the original authors"): (syn_steps, expert_epochs, max_start_epoch, lr_img, lr_lr, lr_teacher,
#: batch_syn or 0 for all).  The ZCA column is a data option: run those rows with ``--set data.zca=true`` and
#: experts trained with it (CIFAR-10 IPC 1/10, CIFAR-100 IPC 1/50).
OFFICIAL_SETTINGS: dict[tuple[str, int], tuple[int, int, int, float, float, float, int]] = {
    ("cifar10", 1): (50, 2, 2, 100.0, 1e-7, 0.01, 0),
    ("cifar10", 10): (30, 2, 20, 100.0, 1e-5, 0.001, 0),
    ("cifar10", 50): (30, 2, 40, 1000.0, 1e-5, 0.001, 0),
    ("cifar100", 1): (20, 3, 20, 1000.0, 1e-5, 0.01, 0),
    ("cifar100", 10): (20, 2, 20, 1000.0, 1e-5, 0.01, 0),
    ("cifar100", 50): (80, 2, 40, 1000.0, 1e-5, 0.01, 125),
}
#: settings whose official command uses ZCA (anchors.md 2.5)
OFFICIAL_ZCA = {("cifar10", 1), ("cifar10", 10), ("cifar100", 1), ("cifar100", 50)}


def apply_setting_row(cfg: MTTConfig, row: tuple[int, int, int, float, float, float, int]) -> MTTConfig:
    cfg.syn_steps, cfg.expert_epochs, cfg.max_start_epoch, cfg.lr_img, cfg.lr_lr, cfg.lr_teacher, cfg.batch_syn = row
    return cfg


# ---------------------------------------------------------------------------------------------------------- method
class TrajectoryMatching(Distiller):
    """The shared engine of MTT, FTD and DDPP: the student unroll and the normalised parameter distance."""

    name: ClassVar[str] = "mtt"
    Config: ClassVar[type[DistillConfig]] = MTTConfig
    settings: ClassVar[dict] = OFFICIAL_SETTINGS

    @classmethod
    def default_config(cls, dataset: str, ipc: int) -> DistillConfig:
        cfg = cls.Config()
        row = cls.settings.get((dataset, ipc))
        return apply_setting_row(cfg, row) if row is not None else cfg

    # ------------------------------------------------------------------ setup
    def _check_config(self) -> None:
        cfg = self.config
        if not cfg.experts:
            raise ConfigError(f"{self.name} needs an expert store: pass --experts DIR (made by `ddkit experts "
                              f"--dataset ... --out DIR`) or method.experts=DIR")
        if cfg.grad_mode not in GRAD_MODES:
            raise ConfigError(f"method.grad_mode={cfg.grad_mode!r}: expected one of {', '.join(GRAD_MODES)}")
        for key in ("syn_steps", "expert_epochs", "max_start_epoch", "segments"):
            if getattr(cfg, key) < 1:
                raise ConfigError(f"method.{key} must be >= 1, got {getattr(cfg, key)}")
        if cfg.batch_syn < 0 or cfg.lr_teacher <= 0 or cfg.min_lr <= 0:
            raise ConfigError("method.batch_syn must be >= 0 and method.lr_teacher, method.min_lr > 0")

    def image_param(self, syn: SyntheticSet) -> Tensor:
        """The tensor the optimiser moves (MTT: the synthetic images themselves)."""
        return syn.images

    def setup(self, real: RealData, syn: SyntheticSet, generator: torch.Generator) -> None:
        from ..experts.store import ExpertStore

        self._check_config()
        cfg = self.config
        self.net = self.new_network(real, generator)
        self.net.train()  # the official student is in train mode (matters for batch norm only)
        self.store = ExpertStore.open(cfg.experts)
        self.store.check_compatible(
            dataset=real.name, image_shape=real.image_shape, num_classes=real.num_classes,
            preprocess=real.preprocess, model=cfg.model,
            param_shapes={k: list(p.shape) for k, p in self.net.named_parameters()},
            epochs_needed=cfg.max_start_epoch - 1 + cfg.expert_epochs)
        self.expert_ids = self.store.experts()
        self.buffers = {k: b.detach() for k, b in self.net.named_buffers()} or None
        self.aug = resolve_dsa(None if cfg.dsa_strategy == "auto" else cfg.dsa_strategy, real.name)
        if "lr" not in syn.extras:
            syn.extras["lr"] = nn.Parameter(torch.tensor(float(cfg.lr_teacher), dtype=syn.images.dtype,
                                                          device=syn.images.device))
        images = self.image_param(syn)
        groups: list[dict[str, Any]] = [{"params": [images], "lr": cfg.lr_img}]
        if isinstance(syn.labels, nn.Parameter) and syn.labels.requires_grad:
            groups.append({"params": [syn.labels], "lr": cfg.lr_img})
        groups.append({"params": [syn.extras["lr"]], "lr": cfg.lr_lr})
        self.optimizer = torch.optim.SGD(groups, lr=cfg.lr_img, momentum=cfg.momentum_img)

    # ------------------------------------------------------------------ one iteration
    def draw_segment(self, generator: torch.Generator) -> tuple[int, int]:
        """A random expert and start epoch (official: ``np.random.randint(0, max_start_epoch)``)."""
        e = self.expert_ids[int(torch.randint(len(self.expert_ids), (1,), generator=generator))]
        t = int(torch.randint(self.config.max_start_epoch, (1,), generator=generator))
        return e, t

    def plan_batches(self, n: int, generator: torch.Generator, device: torch.device) -> list[tuple[Tensor, dict]]:
        """Indices and DSA parameters of every student step, drawn up front (the checkpointed backward replays
        each step, so a step's batch must not be drawn inside it)."""
        size = self.config.batch_syn or n
        plan, chunks = [], []
        for _ in range(self.config.syn_steps):
            if not chunks:  # official: indices_chunks = list(torch.split(torch.randperm(n), batch_syn)); .pop()
                chunks = list(torch.split(torch.randperm(n, generator=generator), size))
            idx = chunks.pop()
            params = {} if self.aug.is_identity else self.aug.sample(len(idx), generator, device=device)
            plan.append((idx.to(device), params))
        return plan

    def student_endpoint(self, syn: SyntheticSet, start: Params, plan: list[tuple[Tensor, dict]]) -> Params:
        """``theta_hat_{t+N}``: ``syn_steps`` SGD steps from ``start`` on the planned synthetic batches."""
        aug = self.aug
        loss_fn = classification_loss(syn.labels)

        def batch_fn(i: int, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
            idx, params = plan[i]
            x = images[idx]
            return (x if not params else aug.apply(x, params)), labels[idx]

        return unroll_sgd(self.net, start, batch_fn, (self.image_param(syn), syn.labels), syn.extras["lr"],
                          self.config.syn_steps, loss_fn=loss_fn, mode=self.config.grad_mode,
                          buffers=self.buffers)

    def distance(self, final: Params, start: Params, target: Params) -> tuple[Tensor, Tensor, dict[str, float]]:
        """Numerator and denominator of the normalised distance (and extra metrics)."""
        num = sum(((final[k] - target[k]) ** 2).sum() for k in target)
        den = sum(((start[k] - target[k]) ** 2).sum() for k in target)
        return num, den, {}

    def loss(self, it: int, real: RealData, syn: SyntheticSet, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """Mean normalised distance over ``segments`` segments (under torchrun: this rank's share of the sum)."""
        cfg = self.config
        device = syn.images.device
        dtype = syn.images.dtype
        draws = [(*self.draw_segment(generator), self.plan_batches(len(syn), generator, device))
                 for _ in range(cfg.segments)]
        total: Tensor | None = None
        metrics: dict[str, float] = {}
        for s in distributed.shard(range(cfg.segments)):
            expert, t, plan = draws[s]
            start = {k: v.to(dtype) for k, v in self.store.load(expert, t, device).items()}
            target = {k: v.to(dtype) for k, v in self.store.load(expert, t + cfg.expert_epochs, device).items()}
            final = self.student_endpoint(syn, start, plan)
            num, den, extra = self.distance(final, start, target)
            total = num / den if total is None else total + num / den
            if s == 0:
                metrics = {"start_epoch": float(t), "expert": float(expert), **extra}
        if total is None:  # more ranks than segments: nothing to unroll here, a zero gradient
            total = sum(p.sum() for group in self.optimizer.param_groups for p in group["params"]) * 0.0
        return total / cfg.segments, metrics

    def step(self, it: int, real: RealData, syn: SyntheticSet, generator: torch.Generator) -> dict[str, float]:
        assert self.optimizer is not None, "setup() must run before step()"
        loss, metrics = self.loss(it, real, syn, generator)
        value = float(loss.detach())
        self.optimizer.zero_grad(set_to_none=True)
        if distributed.active():  # every rank joins the sum, whatever its own loss; the checks below see the total
            loss.backward()
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            value = distributed.sum_gradients_(params, value)
        if not math.isfinite(value):
            self.optimizer.zero_grad(set_to_none=True)
            return {"loss": value, **metrics}  # nothing applied; the engine stops and keeps the last checkpoint
        if not distributed.active():
            loss.backward()
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            self.optimizer.zero_grad(set_to_none=True)
            return {"loss": value, "loss_gradient": float("nan"), **metrics}
        self.optimizer.step()
        lr = syn.extras["lr"]
        clamped = bool(lr.detach() < self.config.min_lr)
        with torch.no_grad():
            lr.clamp_(min=self.config.min_lr)
        self.after_step(syn)
        return {"loss": value, "lr": float(lr.detach()), "lr_clamped": float(clamped), **metrics}

    def after_step(self, syn: SyntheticSet) -> None:
        """Hook for variants (FTD's moving average)."""

    def state_dict(self) -> dict[str, Any]:
        """A snapshot: ``torch.optim``'s state dict shares the momentum buffers, which later steps update in place
        (and ``load_state_dict`` would share them with another optimiser)."""
        return _snapshot(super().state_dict())


def _snapshot(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_snapshot(v) for v in obj)
    return obj


@METHODS.register("mtt")
class MTT(TrajectoryMatching):
    """MTT (Cazenavette et al. 2022): match expert training trajectories with a learnable step size."""


__all__ = ["MTT", "MTTConfig", "TrajectoryMatching", "OFFICIAL_SETTINGS", "OFFICIAL_ZCA"]
