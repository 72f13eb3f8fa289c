"""DD: Dataset Distillation (Wang, Zhu, Torralba & Efros, arXiv 1811.10959, 2018).

Bi-level meta-learning.  The synthetic images and one learning rate per inner step are optimised so that a network
trained on them by a few steps of gradient descent, from a random initialisation, does well on real data:

    theta_0 ~ init (fresh every iteration, or one fixed draw with ``train_nets="known_init"``)
    theta_{t+1} = theta_t - lr_t * grad CE(f(x_{s(t)}; theta_t), y_{s(t)}),   t = 0 .. T-1
    outer loss  = CE(f(x_real; theta_T), y_real)       over a batch of ``batch_real`` (1024) real images

and the outer loss is back-propagated through the whole unroll to the images and the step sizes (second order),
with :func:`ddkit.functional.unroll.unroll_sgd`.  Source: ``SsnL/dataset-distillation``
(``train_distilled_image.py``: ``init_data_optim``, ``get_steps``, ``forward``, ``backward``; ``base_options.py``
for the defaults; anchors.md section 2.12).

How images map to steps (``init_data_optim``/``get_steps``).  The official code holds ``distill_steps`` groups of
``num_classes * distilled_images_per_class_per_step`` images; inner step ``t`` trains on group ``t mod
distill_steps``, and the groups are cycled ``distill_epochs`` times, so ``T = distill_steps * distill_epochs``
steps, each with its own learned lr (``raw_distill_lrs`` has ``T`` entries).  Every class appears in every group.
In ddkit the IPC is the user's setting, so ``ipc = distill_steps * images_per_class_per_step``: data step ``s``
uses images ``s*k .. (s+1)*k - 1`` of every class (``k = ipc / distill_steps``).  With the official defaults
(10 steps, 1 image per class per step) that is IPC 10; :meth:`DDDistiller.default_config` picks
``distill_steps`` = the largest divisor of the IPC up to 10 (IPC 1: 1 step x 3 epochs, as the README's
known-init MNIST command ``--distill_steps 1``; IPC 50: 10 steps of 5 images per class).

Step sizes: ``lr_t = softplus(raw_t)``, ``raw`` initialised to ``softplus^-1(distill_lr)`` (0.02; the README
uses 0.001 for CIFAR-10).  They are learnable extras of the synthetic set (``syn.extras["step_lr_raw"]``, saved
with it) and their values are recorded in ``syn.meta["dd"]["step_lrs"]`` with the schedule that uses them.

Evaluation.  A DD set is two things: images, and the training recipe they were optimised for (this init
distribution, these ``T`` plain GD steps with these step sizes).  ``ddkit evaluate`` runs the field's protocol
(ConvNet, SGD momentum 0.9, lr 0.01 for 1000 epochs with DSA): it does NOT use the DD step sizes, since they
belong to a different recipe (``learned_lr`` stays empty; the step sizes are under another key).  DD's own
recipe is :func:`evaluate_dd_recipe` (fresh networks from DD's initialisation trained by the learned schedule,
as the official ``evaluate_steps``), available from Python and used by ``benchmarks/bench_dd.py``.

What differs from the official code, and why:

- **Unroll.** The official ``forward``/``backward`` keep every step's gradient graph (``create_graph=True``), so
  memory grows with classes x images x steps (SsnL/dataset-distillation#23, #28, #53).  Here ``unroll`` is
  ``"checkpoint"`` by default: the same exact gradient with activation memory of one step
  (:mod:`ddkit.functional.unroll`); ``"graph"`` is the plain unroll.
- **Real batches.** The official loader walks shuffled epochs of the training set; here each iteration draws
  ``batch_real`` images uniformly without replacement from the run's generator (exact resume).  The StepLR
  schedule (x0.5 every 40 epochs) is counted in iterations of ``ceil(n_train / batch_real)`` per epoch; 400
  epochs of MNIST at batch 1024 are the default 23,600 iterations.
- **Architectures.** The official nets are LeNet (MNIST; ddkit's ``lenet`` is the same network) and
  AlexCifarNet (CIFAR, with local response norm), which ddkit's zoo does not have: colour data defaults to the
  zoo's ``alexnet`` (DC's CIFAR AlexNet).  Any zoo model works (``method.model=convnet``).
- **Initialisation.** ``--init xavier`` (``networks/utils.py``: ``xavier_normal_`` gain 1 on conv/linear
  weights, zero biases, norm weights 1) is ``weight_init="xavier"``, drawn from the run's generator;
  ``"default"`` keeps PyTorch's initialisation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..data.realdata import RealData
from ..errors import ConfigError
from ..evaluation.report import Report, Row
from ..evaluation.train import accuracy, classification_loss
from ..functional.unroll import Params, unroll_sgd
from ..registry import METHODS
from ..synthetic import SyntheticSet
from .base import DistillConfig, Distiller

#: key of the learnable raw (pre-softplus) step sizes in ``SyntheticSet.extras``
LR_KEY = "step_lr_raw"
#: key of DD's schedule and step sizes in ``SyntheticSet.meta``
META_KEY = "dd"


@dataclass
class DDConfig(DistillConfig):
    """DD options; defaults from ``SsnL/dataset-distillation/base_options.py`` unless noted."""

    model: str = "lenet"  # --arch LeNet (MNIST); colour data: see default_config
    init: str = "noise"  # init_data_optim: torch.randn images
    #: --epochs 400 over MNIST's 60,000 images at --batch_size 1024: 400 * ceil(60000 / 1024)
    iterations: int = 23_600
    lr_img: float = 0.01  # --lr 0.01 (Adam on images and step sizes)
    beta1: float = 0.5  # optim.Adam(self.params, lr=state.lr, betas=(0.5, 0.999))
    beta2: float = 0.999
    decay_epochs: float = 40.0  # --decay_epochs 40 (StepLR step_size, in epochs of the real training set)
    decay_factor: float = 0.5  # --decay_factor 0.5
    batch_real: int = 1024  # --batch_size 1024
    #: --distill_steps 10; None: the largest divisor of the IPC up to 10 (see the module docstring)
    distill_steps: int | None = None
    distill_epochs: int = 3  # --distill_epochs 3
    distill_lr: float = 0.02  # --distill_lr 0.02 (initial step size; README: 0.001 for CIFAR-10)
    train_nets: str = "unknown_init"  # --train_nets_type unknown_init | known_init
    n_nets: int = 1  # --n_nets 1: networks per iteration (their outer losses are averaged)
    weight_init: str = "xavier"  # --init xavier, --init_param 1.0
    #: "checkpoint" (exact gradient, activation memory of one inner step) or "graph" (the plain unroll)
    unroll: str = "checkpoint"


def inverse_softplus(y: float) -> float:
    """``raw`` with ``softplus(raw) == y`` (the official ``expm1_().log_()``)."""
    return math.log(math.expm1(y))


def default_distill_steps(ipc: int) -> int:
    """The largest divisor of ``ipc`` that is at most the official 10 steps."""
    return max(d for d in range(1, min(ipc, 10) + 1) if ipc % d == 0)


def xavier_init_(net: nn.Module, generator: torch.Generator, gain: float = 1.0) -> nn.Module:
    """The official ``init_weights(net, state)`` with ``init='xavier'``: N(0, gain^2 * 2 / (fan_in + fan_out))
    conv/linear weights, zero biases, norm weights 1.  Draws from ``generator``.

    Done by parameter shape, not module type, so that it also holds for modules the speed layer swapped in (same
    parameter names): a weight of two or more dimensions is a conv/linear kernel, a 1-D weight a norm scale.
    """
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() >= 2:
                receptive = p[0][0].numel()
                fan_in, fan_out = p.shape[1] * receptive, p.shape[0] * receptive
                std = gain * math.sqrt(2.0 / float(fan_in + fan_out))
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) * std)
            elif name.endswith("bias"):
                p.zero_()
            elif name.endswith("weight"):
                p.fill_(1.0)
    return net


def step_groups(syn_ipc: int, num_classes: int, distill_steps: int) -> list[Tensor]:
    """Indices (into the class-major synthetic set) of the images of each data step."""
    k = syn_ipc // distill_steps
    base = torch.arange(num_classes) * syn_ipc
    return [(base[:, None] + torch.arange(s * k, (s + 1) * k)[None, :]).reshape(-1) for s in range(distill_steps)]


class DDDistiller(Distiller):
    """Dataset Distillation: images and per-step learning rates through an unrolled inner training."""

    name: ClassVar[str] = "dd"
    Config: ClassVar[type[DistillConfig]] = DDConfig

    @classmethod
    def default_config(cls, dataset: str, ipc: int) -> DDConfig:
        """MNIST-style data: LeNet, distill_lr 0.02, 400 epochs of 60,000 images.  Colour data (the README's CIFAR-10
        command ``--arch AlexCifarNet --distill_lr 0.001``): ``alexnet`` (module docstring), 400 epochs of
        50,000 images = 400 * ceil(50000 / 1024) = 19,600 iterations."""
        config = DDConfig(distill_steps=default_distill_steps(max(int(ipc), 1)))
        name = dataset.lower().replace("-", "").replace("_", "")
        if name in ("cifar10", "cifar100", "svhn"):
            config.model = "alexnet"
            config.distill_lr = 0.001
            if name != "svhn":
                config.iterations = 400 * math.ceil(50_000 / 1024)
        return config

    # ------------------------------------------------------------------ set-up
    def _check(self, syn: SyntheticSet) -> int:
        cfg: DDConfig = self.config  # type: ignore[assignment]
        steps = cfg.distill_steps if cfg.distill_steps is not None else default_distill_steps(syn.ipc)
        checks = [
            (isinstance(steps, int) and steps >= 1 and syn.ipc % steps == 0,
             f"distill_steps must be a positive divisor of the IPC ({syn.ipc}), got {steps!r}"),
            (cfg.distill_epochs >= 1, f"distill_epochs must be >= 1, got {cfg.distill_epochs}"),
            (cfg.distill_lr > 0, f"distill_lr must be > 0 (it is the softplus of a raw value), got {cfg.distill_lr}"),
            (cfg.train_nets in ("unknown_init", "known_init"),
             f"train_nets must be 'unknown_init' or 'known_init', got {cfg.train_nets!r}"),
            (cfg.weight_init in ("xavier", "default"),
             f"weight_init must be 'xavier' or 'default', got {cfg.weight_init!r}"),
            (cfg.unroll in ("checkpoint", "graph"), f"unroll must be 'checkpoint' or 'graph', got {cfg.unroll!r}"),
            (cfg.n_nets >= 1 and cfg.batch_real >= 1,
             f"n_nets and batch_real must be >= 1, got {cfg.n_nets}, {cfg.batch_real}"),
            (0 < cfg.decay_factor <= 1 and cfg.decay_epochs > 0,
             f"decay_factor must lie in (0, 1] and decay_epochs be > 0, got {cfg.decay_factor}, {cfg.decay_epochs}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"dd: {message} (method.<field>)")
        return steps

    def setup(self, real: RealData, syn: SyntheticSet, generator: torch.Generator) -> None:
        cfg: DDConfig = self.config  # type: ignore[assignment]
        self.distill_steps = self._check(syn)
        self.total_steps = self.distill_steps * cfg.distill_epochs
        self.groups = [g.to(self.device) for g in step_groups(syn.ipc, syn.num_classes, self.distill_steps)]
        raw = syn.extras[LR_KEY] if LR_KEY in syn.extras else None
        if raw is None or raw.shape != (self.total_steps,):
            syn.extras[LR_KEY] = nn.Parameter(torch.full((self.total_steps,), inverse_softplus(cfg.distill_lr),
                                                         device=self.device))
        self.loss_fn = classification_loss(syn.labels)
        self.shell = self.new_network(real, generator)  # the functional module; its own parameters are unused
        self.known: list[Params] | None = None
        if cfg.train_nets == "known_init":
            self.known = [self.fresh_params(real, generator) for _ in range(cfg.n_nets)]
        params = [syn.images, syn.extras[LR_KEY]]
        if isinstance(syn.labels, nn.Parameter) and syn.labels.requires_grad:
            params.append(syn.labels)
        self.optimizer = torch.optim.Adam(params, lr=cfg.lr_img, betas=(cfg.beta1, cfg.beta2))
        self.iters_per_epoch = math.ceil(real.train_images.shape[0] / cfg.batch_real)
        self._record(syn)

    def fresh_params(self, real: RealData, generator: torch.Generator) -> Params:
        """A new initialisation from DD's distribution (official ``model.reset``), detached."""
        net = self.new_network(real, generator)
        if self.config.weight_init == "xavier":  # type: ignore[attr-defined]
            xavier_init_(net, generator)
        return {k: p.detach() for k, p in net.named_parameters()}

    def _record(self, syn: SyntheticSet) -> None:
        cfg: DDConfig = self.config  # type: ignore[assignment]
        syn.meta[META_KEY] = {
            "step_lrs": F.softplus(syn.extras[LR_KEY].detach()).cpu().tolist(),
            "distill_steps": self.distill_steps,
            "distill_epochs": cfg.distill_epochs,
            "images_per_class_per_step": syn.ipc // self.distill_steps,
            "model": cfg.model,
            "weight_init": cfg.weight_init,
            "train_nets": cfg.train_nets,
            "order": "inner step t uses data step t mod distill_steps with lr step_lrs[t]",
        }

    # ------------------------------------------------------------------ one outer iteration
    def image_lr(self, it: int) -> float:
        """StepLR(step_size=decay_epochs epochs, gamma=decay_factor) at 1-based iteration ``it``."""
        cfg: DDConfig = self.config  # type: ignore[assignment]
        period = max(1, round(cfg.decay_epochs * self.iters_per_epoch))
        return cfg.lr_img * cfg.decay_factor ** ((it - 1) // period)

    def inner_batch(self, i: int, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Inner step ``i`` trains on data step ``i mod distill_steps`` (deterministic: checkpoint recomputes it)."""
        ix = self.groups[i % self.distill_steps]
        return images[ix], labels[ix]

    def train_unrolled(self, params: Params, syn: SyntheticSet, mode: str | None = None) -> Params:
        """``T`` differentiable GD steps on the synthetic set from ``params`` (train mode)."""
        self.shell.train()
        lrs = F.softplus(syn.extras[LR_KEY])
        return unroll_sgd(self.shell, params, self.inner_batch, (syn.images, syn.labels), lrs, self.total_steps,
                          loss_fn=self.loss_fn, mode=mode or self.config.unroll)  # type: ignore[attr-defined]

    def outer_loss(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        """CE of the trained network on real data, in eval mode (official ``forward``: ``model.eval()``)."""
        self.shell.eval()
        return F.cross_entropy(functional_call(self.shell, params, (x,)), y)

    def step(self, it: int, real: RealData, syn: SyntheticSet, generator: torch.Generator) -> dict[str, float]:
        cfg: DDConfig = self.config  # type: ignore[assignment]
        assert self.optimizer is not None, "setup() must run before step()"
        for group in self.optimizer.param_groups:
            group["lr"] = self.image_lr(it)
        n_train = real.train_images.shape[0]
        ix = torch.randperm(n_train, generator=generator)[: min(cfg.batch_real, n_train)]
        xr = real.train_images[ix.to(real.train_images.device)].to(self.device)
        yr = real.train_labels[ix.to(real.train_labels.device)].to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for n in range(cfg.n_nets):
            params = self.known[n] if self.known is not None else self.fresh_params(real, generator)
            loss = self.outer_loss(self.train_unrolled(params, syn), xr, yr) / cfg.n_nets
            loss.backward()
            total += float(loss.detach())
        self.optimizer.step()
        self._record(syn)
        lrs = syn.meta[META_KEY]["step_lrs"]
        return {"loss": total, "step_lr_mean": sum(lrs) / len(lrs), "step_lr_min": min(lrs)}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["known_init"] = [dict(p) for p in self.known] if self.known is not None else []
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Copies: torch's Optimizer.load_state_dict keeps the given moment tensors, so loading a live distiller's
        # state would make both distillers advance the same Adam moments.
        state = _cloned(state)
        super().load_state_dict(state)
        if self.known is not None and state.get("known_init"):
            self.known = [{k: v.to(self.device) for k, v in p.items()} for p in state["known_init"]]


def _cloned(value: Any) -> Any:
    """``value`` with every tensor in its nested dicts/lists cloned."""
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _cloned(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cloned(v) for v in value)
    return value


METHODS.register("dd", obj=DDDistiller)


# ---------------------------------------------------------------------------------------------- DD's own recipe
def train_dd_recipe(syn: SyntheticSet, net: nn.Module) -> nn.Module:
    """Train ``net`` in place by DD's learned schedule (official ``train_steps_inplace``): plain GD, inner step
    ``t`` on data step ``t mod distill_steps`` with lr ``softplus(step_lr_raw[t])``."""
    info = syn.meta.get(META_KEY)
    if info is None or LR_KEY not in syn.extras:
        from ..errors import ArtifactError

        raise ArtifactError(f"this synthetic set ({syn.meta.get('method', '?')}) has no DD schedule "
                            f"(meta['{META_KEY}'] and extras['{LR_KEY}']); DD's recipe applies to DD sets only")
    steps = int(info["distill_steps"])
    groups = step_groups(syn.ipc, syn.num_classes, steps)
    lrs = F.softplus(syn.extras[LR_KEY].detach())
    device = next(net.parameters()).device
    images, labels = syn.images.detach().to(device), syn.labels.detach().to(device)
    groups = [g.to(device) for g in groups]
    net.train()
    final = unroll_sgd(net, {k: p.detach() for k, p in net.named_parameters()},
                       lambda i, x, y: (x[groups[i % steps]], y[groups[i % steps]]), (images, labels),
                       lrs.to(device), lrs.numel(), loss_fn=classification_loss(labels), mode="no_grad")
    with torch.no_grad():
        for k, p in net.named_parameters():
            p.copy_(final[k])
    return net


def evaluate_dd_recipe(syn: SyntheticSet, real: RealData, *, runs: int = 5, seed: int = 0,
                       model: str | None = None, device: str | torch.device = "cpu") -> Report:
    """Accuracy of ``runs`` fresh networks (DD's initialisation) trained by DD's learned schedule (the official
    ``evaluate_steps`` with ``test_nets_type=unknown_init``).  For a ``known_init`` set this measures how the
    images transfer to unseen initialisations, not the fixed-init number."""
    import time

    from ..engine.seeding import make_generator
    from ..evaluation.protocol import peak_rss_mib

    info = syn.meta.get(META_KEY) or {}
    name = model or str(info.get("model", "lenet"))
    distiller = DDDistiller(DDConfig(model=name, weight_init=str(info.get("weight_init", "xavier"))), device=device)
    report = Report(protocol={"name": "dd", "runs": runs, "model": name, "steps": len(info.get("step_lrs", []))})
    for run in range(runs):
        gen = make_generator(seed, "eval", "dd", name, run)
        start = time.perf_counter()
        net = distiller.new_network(real, gen)
        if distiller.config.weight_init == "xavier":  # type: ignore[attr-defined]
            xavier_init_(net, gen)
        train_dd_recipe(syn, net)
        acc = accuracy(net, real.test_images.to(device), real.test_labels.to(device))
        report.add(Row("dd", real.name, syn.ipc, name, run, seed, acc, time.perf_counter() - start, peak_rss_mib()))
    return report
