"""FRePo: dataset distillation with neural feature regression (Zhou, Nezhadarya & Ba, NeurIPS 2022).

A pool of networks is trained online on the synthetic set.  Each iteration takes one of them, treats its
penultimate features as a kernel (``K = F F^T``), fits kernel ridge regression from the synthetic images and
their (learnable) labels to a real batch, and moves images and labels to lower the regression loss; then that
network takes one training step on the synthetic set, or is re-initialised once it has had
``max_online_updates`` of them.  Sources: ``yongchao97/FRePo``, ``lib/datadistillation/frepo.py``
(``proto_train_and_evaluate``, ``proto_train_step``, ``nfr``, ``lb_margin_th``, ``init_proto``) and
``script/distill.py``; every default below cites its line of origin (anchors.md section 2.10).

One iteration, as the official loop (``proto_train_and_evaluate``):

1. a real batch of ``batch_real`` (1024) images with centred one-hot targets (``1 - 1/C`` / ``-1/C``);
2. ``F_t``, ``F_s`` = penultimate features (``model.features``) of the current pool network in inference mode
   (``nn_feat_fn`` calls ``apply_fn(..., train=False)``: batch norm uses running statistics);
3. ``pred = K_ts (K_ss + lambda I)^-1 Y_s`` with ``lambda = 1e-6 * trace(K_ss) / n`` (``nfr``), solved once in
   :func:`ddkit.functional.krr.krr_predict` (float64 Cholesky; a singular system raises instead of NaN images);
4. loss = ``0.5 * sum_k (pred - Y_t)^2`` averaged over the batch (``mean_squared_loss``) plus the label-margin
   term ``-min(top1 - top2, 1/C)`` averaged over the synthetic labels (``lb_margin_th``);
5. one optimiser step on the images and labels;
6. the pool network: re-initialised if it has had more than ``max_online_updates`` updates, else one Adam step
   (lr 3e-4) on up to ``online_batch`` (1000) synthetic images (the just-updated ones) with the same MSE loss
   on the synthetic labels, in training mode; then the next pool network is drawn uniformly at random.

What differs from the official code, and why:

- **Optimiser of images and labels.** The official code uses optax's LAMB (lr 3e-4, cosine decay to 0.1x over
  the run).  torch has no LAMB, so :class:`Lamb` here implements optax's ``lamb`` exactly (Adam moments with
  bias correction, eps 1e-6, no weight decay, then the trust ratio ``||p|| / ||u||`` per tensor, 1 when either
  norm is 0); ``tests/test_frepo.py`` checks it against the formula step by step.  The trust ratio matters:
  it scales each tensor's step to ``lr * ||tensor||``, which plain Adam does not (``optimizer="adam"`` is
  offered, as the official ``create_proto_state`` offers it).
- **Architecture.** The official pool networks are FRePo's own ``Conv`` (``--arch=conv --normalization=batch``
  in the README: widths 128/256/512, batch norm before the 2nd and 3rd convolutions).  ddkit's zoo has the
  field's ConvNet-3 (constant width 128, norm after each convolution); the default pool network is its
  batch-norm variant ``convnet_bn`` (batch norm as the README's commands), with the running-statistics update
  of flax's ``BatchNorm(momentum=0.1)``, i.e. torch momentum 0.9 (``bn_momentum``).  Any zoo model with
  ``features`` can be used (``method.model=...``).
- **Randomness.** The official code picks the next pool network with the unseeded global ``np.random``; here
  every draw (network initialisations, real batches, the network order) comes from the run's generator, so a
  resumed run equals an uninterrupted one.  The real batch is a uniform draw without replacement per iteration
  (the official loader shuffles with a 16-batch buffer).
- **Preprocessing.** The official code whitens every dataset except MNIST and Fashion-MNIST with ZCA
  (``zca_reg=0.1``); in ddkit that is a data setting (``--set data.zca=true``), warned about for colour data.
- **Pool state.** The pool's parameters, batch-norm statistics, Adam states and update counters, the index of
  the current network and the LAMB state are all in :meth:`FRePoDistiller.state_dict`.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import torch
from torch import Tensor, nn

from ..data.realdata import RealData
from ..errors import ArtifactError, ConfigError
from ..functional.krr import krr_predict
from ..registry import METHODS
from ..synthetic import SyntheticSet
from .base import DistillConfig, Distiller
from .common import dataset_dsa_strategy

#: ``label_kind`` metadata of a synthetic set whose labels are regression targets (centred one-hot vectors,
#: possibly learned), not class probabilities; ``--protocol frepo`` regresses on them with a squared-error loss,
#: the field's protocol trains on each image's argmax class with cross-entropy.
REGRESSION_LABELS = "regression"


# ------------------------------------------------------------------------------------------------------ LAMB
class Lamb(torch.optim.Optimizer):
    """optax's ``lamb`` (You et al., 2020) as a torch optimiser, without weight decay by default.

    For each tensor ``p`` with gradient ``g`` at step ``t``::

        m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
        u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + weight_decay * p
        p = p - lr * r * u,      r = ||p|| / ||u||   (r = 1 if either norm is 0)

    Defaults are optax's (``b1=0.9, b2=0.999, eps=1e-6, weight_decay=0``).  The trust ratio is per tensor (optax
    applies it per leaf of the parameter tree; FRePo's tree has two leaves, the images and the labels).
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0) -> None:
        if not lr >= 0.0 or not eps >= 0.0 or not weight_decay >= 0.0:
            raise ConfigError(f"Lamb: lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ConfigError(f"Lamb: betas must lie in [0, 1), got {betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(g, alpha=1.0 - b1)
                v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
                update = (m / (1.0 - b1 ** t)) / ((v / (1.0 - b2 ** t)).sqrt() + group["eps"])
                if group["weight_decay"] != 0.0:
                    update = update + group["weight_decay"] * p
                p_norm = torch.linalg.vector_norm(p)
                u_norm = torch.linalg.vector_norm(update)
                ratio = torch.where((p_norm == 0) | (u_norm == 0), torch.ones_like(p_norm), p_norm / u_norm)
                p.sub_(update * (group["lr"] * ratio))
        return loss


def cosine_decay(step: int, total: int, base: float, final_ratio: float) -> float:
    """optax ``cosine_decay_schedule(base, decay_steps=total, alpha=final_ratio)`` at update ``step`` (0-based)."""
    t = min(max(step, 0), max(total, 1))
    return base * ((1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * t / max(total, 1))) + final_ratio)


# ---------------------------------------------------------------------------------------------------- config
@dataclass
class FRePoConfig(DistillConfig):
    """FRePo options; defaults from ``script/distill.py`` (``get_config``, ``main``) and ``frepo.py``."""

    #: pool network; README: ``--arch=conv --width=128 --depth=3 --normalization=batch`` (see module docstring)
    model: str = "convnet_bn"
    init: str = "real"  # init_proto: random real images of each class
    iterations: int = 500_000  # README: --num_train_steps=500000
    #: LAMB learning rate of images and labels (config.kernel.learning_rate = 0.0003)
    lr_img: float = 3e-4
    #: cosine decay of that rate to this fraction at the end of the run (cosine_decay_schedule(..., alpha=0.1))
    lr_final_ratio: float = 0.1
    #: iterations the cosine decay spans; 0 = ``iterations`` (see FRePoDistiller.decay_length)
    decay_iterations: int = 0
    #: "lamb" (config.kernel.optimizer) or "adam" (create_proto_state's other choice)
    optimizer: str = "lamb"
    soft_labels: bool = True  # labels are [N, C] vectors (init_proto: centred one-hot, scaled by sqrt(C/10))
    learn_labels: bool = True  # --learn_label=True
    #: real images per iteration (config.kernel.batch_size = 1024); the contract tests use fewer on 2 cores
    batch_real: int = 1024
    reg: float = 1e-6  # nfr(..., reg=1e-6): ridge = reg * trace(K) / n
    num_models: int = 10  # --num_nn_state=10
    max_online_updates: int = 100  # --max_online_updates=100
    lr_online: float = 3e-4  # config.online: Adam, learning_rate 0.0003
    #: synthetic images per online update (get_sample_proto(bs=config.kernel.eval_batch_size = 1000))
    online_batch: int = 1000
    #: the label-margin term lb_margin_th in the loss (proto_train_step: loss = kernel_loss + lb_loss)
    label_margin: bool = True
    #: append horizontally flipped copies of the images to the support set (use_flip; see default_config)
    flip: bool = False
    #: batch-norm running-statistics momentum in torch's convention (flax BatchNorm momentum=0.1 keeps 0.1 of
    #: the old value, i.e. torch momentum 0.9); None keeps the model's own
    bn_momentum: float | None = 0.9
    #: real images per no-grad feature pass: bounds memory only (features are per image in inference mode)
    real_chunk: int = 256


def official_flip(dataset: str, ipc: int) -> bool:
    """``use_flip`` of ``script/distill.py``: off for MNIST and Fashion-MNIST, on for colour data, except CIFAR-100 at
    IPC 10 and 50 and Tiny-ImageNet at IPC 10.  ddkit also leaves it off for datasets whose augmentation has no
    flip (digits, SVHN: flipped digits are other glyphs)."""
    name = dataset.lower().replace("-", "").replace("_", "")
    if name in ("mnist", "fashionmnist") or "flip" not in dataset_dsa_strategy(dataset).split("_"):
        return False
    if name == "cifar100" and ipc in (10, 50):
        return False
    if name in ("tinyimagenet", "tiny") and ipc == 10:
        return False
    return True


def label_scale(num_classes: int) -> float:
    """init_proto(scale_y=True): the centred one-hot labels are divided by sqrt(C / 10)."""
    return math.sqrt(num_classes / 10.0)


def centred_targets(labels: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """The official ``y_transform``: one-hot with ``1 - 1/C`` on the class and ``-1/C`` elsewhere."""
    return torch.nn.functional.one_hot(labels.long(), num_classes).to(dtype) - 1.0 / num_classes


def label_margin_loss(y: Tensor) -> Tensor:
    """``lb_margin_th``: ``-min(top1 - top2, 1/C)`` per label vector, averaged."""
    top = y.topk(2, dim=1).values
    return -(top[:, 0] - top[:, 1]).clamp_max(1.0 / y.shape[1]).mean()


def half_sse(pred: Tensor, target: Tensor) -> Tensor:
    """``mean_squared_loss(...).mean()``: half the squared error summed over classes, averaged over rows."""
    return 0.5 * (pred - target).pow(2).sum(1).mean()


# ------------------------------------------------------------------------------------------------------ pool
@dataclass
class PoolMember:
    """One online network, its Adam state and how many updates it has had (staggered at the start)."""

    net: nn.Module
    optimizer: torch.optim.Adam
    updates: int


class _Frozen:
    """Context: the network's parameters do not require grad (the kernel must not train the pool network)."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net
        self.flags: list[bool] = []

    def __enter__(self) -> nn.Module:
        self.flags = [p.requires_grad for p in self.net.parameters()]
        self.net.requires_grad_(False)
        return self.net

    def __exit__(self, *exc: object) -> None:
        for p, flag in zip(self.net.parameters(), self.flags):
            p.requires_grad_(flag)


# ---------------------------------------------------------------------------------------------------- method
class FRePoDistiller(Distiller):
    """Neural feature regression with a pool of online networks (``ddkit distill --method frepo``)."""

    name: ClassVar[str] = "frepo"
    Config: ClassVar[type[DistillConfig]] = FRePoConfig

    def __init__(self, config: FRePoConfig | None = None, *, device: str | torch.device = "cpu") -> None:
        super().__init__(config, device=device)
        self.pool: list[PoolMember] = []
        self.current = 0
        self._dtype = torch.float32

    @classmethod
    def default_config(cls, dataset: str, ipc: int) -> FRePoConfig:
        """``script/distill.py`` defaults; ``flip`` per dataset and IPC as its ``use_flip``."""
        return FRePoConfig(flip=official_flip(dataset, ipc))

    # ------------------------------------------------------------------ lifecycle
    def setup(self, real: RealData, syn: SyntheticSet, generator: torch.Generator) -> None:
        cfg: FRePoConfig = self.config  # type: ignore[assignment]
        self._check(cfg, syn)
        if real.channels == 3 and not real.preprocess.uses_zca:
            warnings.warn("frepo: the official code whitens colour datasets with ZCA (zca_reg 0.1); "
                          "this run uses none (pass --set data.zca=true)", stacklevel=2)
        self._dtype = syn.images.dtype
        self._init_labels(syn, real.num_classes)
        groups = self.learnable_groups(syn)
        if cfg.optimizer == "lamb":
            self.optimizer = Lamb(groups, lr=cfg.lr_img)
        else:
            self.optimizer = torch.optim.Adam(groups, lr=cfg.lr_img)
        # the pool: staggered update counters (init_step = (max_online_updates // num_nn_state) * i)
        self.pool = [self._new_member(real, generator, (cfg.max_online_updates // cfg.num_models) * i)
                     for i in range(cfg.num_models)]
        self.current = int(torch.randint(cfg.num_models, (1,), generator=generator))

    def _check(self, cfg: FRePoConfig, syn: SyntheticSet) -> None:
        positive = {"batch_real": cfg.batch_real, "num_models": cfg.num_models, "online_batch": cfg.online_batch,
                    "max_online_updates": cfg.max_online_updates, "real_chunk": cfg.real_chunk}
        for key, value in positive.items():
            if int(value) < 1:
                raise ConfigError(f"frepo: method.{key} must be >= 1, got {value}")
        if cfg.optimizer not in ("lamb", "adam"):
            raise ConfigError(f"frepo: method.optimizer must be 'lamb' or 'adam', got {cfg.optimizer!r}")
        if not cfg.reg >= 0.0:
            raise ConfigError(f"frepo: method.reg must be >= 0, got {cfg.reg}")
        if not 0.0 <= cfg.lr_final_ratio <= 1.0:
            raise ConfigError(f"frepo: method.lr_final_ratio must lie in [0, 1], got {cfg.lr_final_ratio}")
        if syn.labels.dim() != 2 and syn.labels.is_floating_point():
            raise ConfigError("frepo: learned labels must be label vectors; set method.soft_labels=true "
                              "together with method.learn_labels=true")

    def _init_labels(self, syn: SyntheticSet, num_classes: int) -> None:
        """init_proto: one-hot labels become centred one-hot vectors divided by sqrt(C/10), once per set."""
        if syn.labels.dim() == 2 and syn.meta.get("label_kind") != REGRESSION_LABELS:
            with torch.no_grad():
                centred = syn.labels - 1.0 / num_classes
                syn.labels.copy_(centred / label_scale(num_classes))
            syn.meta["label_kind"] = REGRESSION_LABELS

    def _new_member(self, real: RealData, generator: torch.Generator, updates: int = 0) -> PoolMember:
        cfg: FRePoConfig = self.config  # type: ignore[assignment]
        net = self.new_network(real, generator).to(dtype=self._dtype)
        if cfg.bn_momentum is not None:
            for m in net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.momentum = cfg.bn_momentum
        return PoolMember(net, torch.optim.Adam(net.parameters(), lr=cfg.lr_online), updates)

    # ------------------------------------------------------------------ the objective
    def support(self, syn: SyntheticSet, num_classes: int) -> tuple[Tensor, Tensor]:
        """Images and label vectors of the support set (with graph), flipped copies appended if ``flip``."""
        cfg: FRePoConfig = self.config  # type: ignore[assignment]
        x = syn.images
        y = syn.labels if syn.labels.dim() == 2 else \
            centred_targets(syn.labels, num_classes, x.dtype) / label_scale(num_classes)
        if cfg.flip:
            x = torch.cat([x, x.flip(-1)])
            y = torch.cat([y, y])
        return x, y

    def real_batch_features(self, net: nn.Module, real: RealData, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Features (no graph) and centred targets of ``batch_real`` real images drawn without replacement."""
        cfg: FRePoConfig = self.config  # type: ignore[assignment]
        n = real.train_images.shape[0]
        index = torch.randperm(n, generator=generator)[: min(cfg.batch_real, n)]
        labels = real.train_labels[index.to(real.train_labels.device)].to(self.device)
        with torch.no_grad():
            feats = torch.cat([net.features(chunk.to(self.device, self._dtype))
                               for chunk in _chunks(real.train_images, index, cfg.real_chunk)])
        return feats, centred_targets(labels, real.num_classes, feats.dtype)

    def loss(self, it: int, real: RealData, syn: SyntheticSet, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """KRR loss of the current pool network's features, plus the label margin; draws the real batch."""
        cfg: FRePoConfig = self.config  # type: ignore[assignment]
        net = self.pool[self.current].net.eval()  # nn_feat_fn: apply_fn(..., train=False)
        with _Frozen(net), _explain_out_of_memory(cfg, len(syn)):
            f_t, y_t = self.real_batch_features(net, real, generator)
            x_s, y_s = self.support(syn, real.num_classes)
            f_s = net.features(x_s)
        pred = krr_predict(f_t @ f_s.T, f_s @ f_s.T, y_s, cfg.reg)
        kernel_loss = half_sse(pred, y_t)
        label_loss = label_margin_loss(y_s)
        loss = kernel_loss + label_loss if cfg.label_margin else kernel_loss
        accuracy = float((pred.detach().argmax(1) == y_t.argmax(1)).float().mean()) * 100.0
        return loss, {"kernel_loss": float(kernel_loss.detach()), "label_loss": float(label_loss.detach()),
                      "krr_acc": accuracy}

    def step(self, it: int, real: RealData, syn: SyntheticSet, generator: torch.Generator) -> dict[str, float]:
        cfg: FRePoConfig = self.config  # type: ignore[assignment]
        assert self.optimizer is not None and self.pool, "setup() must run before step()"
        lr = cosine_decay(it - 1, self.decay_length(), cfg.lr_img, cfg.lr_final_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss, metrics = self.loss(it, real, syn, generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        online_loss = self.update_pool(real, syn, generator)
        if online_loss is not None:
            metrics["online_loss"] = online_loss
        return {"loss": float(loss.detach()), **metrics, "pool_reset": float(online_loss is None), "lr": lr}

    def decay_length(self) -> int:
        """Iterations the cosine decay spans (official: ``decay_steps=num_train_steps``, the whole run):
        ``decay_iterations`` if set, else the config's ``iterations`` (500,000 by default).  It never depends on
        how many iterations one invocation runs, so a run resumed or extended with more iterations follows the
        same schedule as an uninterrupted one; a shorter run sees the schedule's beginning."""
        cfg: FRePoConfig = self.config  # type: ignore[assignment]
        return cfg.decay_iterations if cfg.decay_iterations > 0 else cfg.iterations

    def update_pool(self, real: RealData, syn: SyntheticSet, generator: torch.Generator) -> float | None:
        """Train the current pool network one step on the (updated) synthetic set, or re-initialise it after
        ``max_online_updates`` updates; then draw the next one.  Returns the online loss (None after a reset)."""
        cfg: FRePoConfig = self.config  # type: ignore[assignment]
        member = self.pool[self.current]
        online_loss: float | None = None
        if member.updates > cfg.max_online_updates:  # official: `if nn_step > max_online_updates`
            self.pool[self.current] = self._new_member(real, generator)
        else:
            x, y = syn.images.detach(), syn.labels.detach()
            if y.dim() == 1:
                y = centred_targets(y, real.num_classes, x.dtype) / label_scale(real.num_classes)
            if x.shape[0] >= cfg.online_batch:  # get_sample_proto: a random subset when there are enough
                pick = torch.randperm(x.shape[0], generator=generator)[: cfg.online_batch].to(x.device)
                x, y = x[pick], y[pick]
            net = member.net.train()
            loss = half_sse(net(x), y)  # train_step(loss_type=mean_squared_loss), train=True
            member.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            member.optimizer.step()
            member.updates += 1
            online_loss = float(loss.detach())
        self.current = int(torch.randint(cfg.num_models, (1,), generator=generator))
        return online_loss

    # ------------------------------------------------------------------ exact resume
    def state_dict(self) -> dict[str, Any]:
        """Image/label optimiser, and for every pool network its parameters and buffers, Adam state and update
        count, plus which network is next: everything an exact resume needs."""
        return {
            "optimizer": _clone(self.optimizer.state_dict()) if self.optimizer is not None else None,
            "pool": [{"model": _clone(m.net.state_dict()), "optimizer": _clone(m.optimizer.state_dict()),
                      "updates": m.updates} for m in self.pool],
            "current": self.current,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        pool = state.get("pool")
        if pool is None or len(pool) != len(self.pool):
            raise ArtifactError(f"frepo checkpoint holds {0 if pool is None else len(pool)} pool networks, the run "
                                f"has {len(self.pool)} (method.num_models must match the checkpoint)")
        for member, saved in zip(self.pool, pool):
            member.net.load_state_dict(saved["model"])
            member.optimizer.load_state_dict(saved["optimizer"])
            member.updates = int(saved["updates"])
        self.current = int(state["current"])


@contextlib.contextmanager
def _explain_out_of_memory(cfg: FRePoConfig, num_syn: int) -> Iterator[None]:
    """An allocation failure in the feature passes becomes a one-line error naming the settings that bound them."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if "memory" not in str(exc).lower():
            raise
        raise ConfigError(
            f"frepo: out of memory computing features (real batch {cfg.batch_real} in chunks of {cfg.real_chunk}, "
            f"{num_syn} synthetic images with graph{', doubled by flip' if cfg.flip else ''}); lower "
            f"method.real_chunk or method.batch_real, or use a smaller method.model") from None


def _chunks(images: Tensor, index: Tensor, size: int) -> Iterator[Tensor]:
    for start in range(0, index.numel(), size):
        yield images[index[start:start + size].to(images.device)]


def _clone(obj: Any) -> Any:
    """A deep copy of a state tree's tensors (state dicts hold live references)."""
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_clone(v) for v in obj)
    return obj


METHODS.register("frepo", obj=FRePoDistiller)
