"""KIP: Kernel Inducing Points (Nguyen, Chen & Lee, ICLR 2021; Nguyen et al., NeurIPS 2021).

The synthetic images are the *support* of a kernel ridge regression with an infinite-width network's kernel; a
fresh class-balanced batch of real training images is the *target*; the images (and optionally the labels) move
to make the regression predict the target's labels:

    loss = 0.5 * mean((Y_t - K_ts (K_ss + lambda I)^-1 Y_s)^2),   lambda = reg * trace(K_ss) / n_s

Source: ``google-research/kip/KIP.ipynb`` (anchors §2.11): ``loss_acc_fn`` (the loss, ``reg = 1e-6``, a
positive-definite solve with ``jax_enable_x64``), ``train`` (support initialised from a class-balanced real sample,
a new class-balanced target batch every step, one Adam on images and labels with ``LEARNING_RATE = 4e-2``,
labels frozen unless ``LEARN_LABELS``), ``one_hot(..., center=True)``.  The kernels
(``ddkit.functional.kernels``) replace ``neural_tangents``; the solve is the one ``ddkit.functional.krr`` shares
with FRePo.

Two accuracies, kept apart (they are not comparable; see mtt-distillation#10 and anchors §1b):

- *KRR accuracy*: the kernel regression from the synthetic set to the real **test** split
  (:func:`kip_krr_accuracy`); logged as ``krr_test_acc`` every ``krr_eval_every`` iterations and at iteration
  ``iterations``, the latest stored in the set's metadata under ``"krr_test_acc"`` with its iteration.  This is
  what KIP's Table 1 reports.
- *The field's protocol*: finite ConvNets trained on the images, ``ddkit evaluate RUN`` (what Table 2 "KIP to NN"
  and every other method in ddkit report).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..data.realdata import RealData
from ..errors import ConfigError
from ..functional.kernels import ARCHITECTURES, GETS, KernelSpec, kernel_matrix
from ..functional.krr import SingularKernelError, centered_one_hot, krr_mse, krr_predict
from ..registry import METHODS
from ..synthetic import SyntheticSet
from .base import DistillConfig, Distiller
from .common import sample_per_class

DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass
class KIPConfig(DistillConfig):
    """KIP options; defaults are the KIP colab's (``KIP.ipynb``, "Define Parameters" and ``train``)."""

    #: the colab: "Train for ~ 1000 or more steps for full convergence"
    iterations: int = 1000
    #: Adam on images and labels, ``LEARNING_RATE = 4e-2`` (jax ``optimizers.adam``: betas 0.9/0.999, eps 1e-8,
    #: torch's defaults)
    lr_img: float = 0.04
    #: ``class_balanced_sample(SUPPORT_SIZE, ...)`` of the training images
    init: str = "real"
    #: ``LEARN_LABELS = False``; learned labels are ``[N, C]`` regression targets (centred one-hot to start;
    #: the set is marked ``label_kind = "regression"``: ``ddkit evaluate --protocol frepo`` regresses on them,
    #: the field's protocol trains with cross-entropy on each image's argmax class)
    learn_labels: bool = False
    #: real images per step, class-balanced (colab ``TARGET_BATCH_SIZE = 5000``).  5000 is kept: with the
    #: default FC kernel a step is one 5000 x n_s kernel, 0.9 / 1.9 s on 2 busy CPU cores at Fashion-MNIST IPC 1 /
    #: 10 (benchmarks/RESULTS.md, KIP section); the conv kernel costs ``target_batch x n_s x H x W`` per layer and
    #: per step, so CPU runs of it take smaller batches (e.g. 1000)
    target_batch: int = 5000
    #: ridge ``reg * trace(K_ss) / n_s`` (colab ``loss_acc_fn(..., reg=1e-6)``)
    reg: float = 1e-6
    #: the kernel: ``arch`` fc | conv (colab ``ARCHITECTURE = 'FC'``), ``kernel`` ntk | nngp (``get='ntk'``),
    #: ``depth`` hidden layers (``DEPTH = 1``), NTK parameterisation with ``W_std = sqrt(2)``, ``b_std = 0.1``
    arch: str = "fc"
    kernel: str = "ntk"
    depth: int = 1
    w_std: float = math.sqrt(2.0)
    b_std: float = 0.1
    #: the kernels' dtype (the colab runs everything in float64: ``jax_enable_x64``); the KRR solve is float64
    #: whatever this says
    kernel_dtype: str = "float64"
    #: rows (target images) per kernel block; 0 = automatic (blocks of about 256 MiB).  Lower it when a
    #: conv kernel does not fit memory
    kernel_batch: int = 0
    #: memory a kernel block may use, in GiB; 0 = what the device has available now
    kernel_memory_gb: float = 0.0
    #: KRR accuracy on the real test split every this many iterations and at iteration ``iterations`` (0: only
    #: there); the latest is logged as ``krr_test_acc`` and kept in the set's metadata with its iteration.  On
    #: CPU with the FC kernel one evaluation (10,000 test images) costs about two iterations' kernels
    krr_eval_every: int = 50


def kernel_spec(cfg: KIPConfig) -> KernelSpec:
    """The kernel a config describes (validated: unknown architectures or kernels raise ConfigError)."""
    if cfg.arch not in ARCHITECTURES:
        raise ConfigError(f"kip: method.arch must be one of {', '.join(ARCHITECTURES)}, got {cfg.arch!r}")
    if cfg.kernel not in GETS:
        raise ConfigError(f"kip: method.kernel must be one of {', '.join(GETS)}, got {cfg.kernel!r}")
    return KernelSpec(arch=cfg.arch, depth=cfg.depth, get=cfg.kernel, w_std=cfg.w_std, b_std=cfg.b_std)


#: ``meta["label_kind"]`` of a set whose labels are regression targets (the convention FRePo's sets use too): a
#: centred-target protocol (``frepo``) regresses on them with a squared-error loss, as KIP's "KIP to NN" transfer
#: does; the field's protocol trains on each image's argmax class (``ddkit.evaluation.protocol.evaluate_tensors``)
REGRESSION_LABELS = "regression"


def support_targets(syn: SyntheticSet) -> Tensor:
    """The support's regression targets: learned targets as they are, else the centred one-hot labels."""
    if syn.meta.get("label_kind") == REGRESSION_LABELS:
        return syn.labels
    return centered_one_hot(syn.labels, syn.num_classes)


@torch.no_grad()
def kip_krr_accuracy(syn: SyntheticSet, real: RealData, kernel: KernelSpec, *, reg: float = 1e-6,
                     batch: int = 0, dtype: torch.dtype = torch.float64, memory_limit: int | None = None,
                     split: str = "test") -> float:
    """Accuracy (%) of kernel ridge regression from ``syn`` to ``real``'s ``split`` with ``kernel``.

    This is KIP's own metric (KRR with the infinite-width kernel), *not* the accuracy of a network trained on
    the images.  ``real`` must be encoded as the set's images are (``ddkit.api.load_real_for``)."""
    if split not in ("test", "train"):
        raise ConfigError(f"kip_krr_accuracy: split must be 'test' or 'train', got {split!r}")
    x_t = real.test_images if split == "test" else real.train_images
    y_t = real.test_labels if split == "test" else real.train_labels
    device = syn.images.device
    x_s = syn.images.detach().to(dtype)
    x_t = x_t.to(device=device, dtype=dtype)
    k_ss = kernel_matrix(kernel, x_s, x_s, batch=batch, memory_limit=memory_limit)
    k_ts = kernel_matrix(kernel, x_t, x_s, batch=batch, memory_limit=memory_limit)
    pred = krr_predict(k_ts, k_ss, support_targets(syn).detach().to(device=device, dtype=dtype), reg)
    return 100.0 * float((pred.argmax(1).cpu() == y_t.cpu()).double().mean())


class KIPDistiller(Distiller):
    """KIP: Adam on the support images (and labels) through a float64 kernel ridge regression."""

    name = "kip"
    Config = KIPConfig

    #: the kernel, resolved from the config by ``setup``
    spec: KernelSpec | None = None

    def setup(self, real: RealData, syn: SyntheticSet, generator: torch.Generator) -> None:
        cfg = self.config
        self.spec = kernel_spec(cfg)
        if cfg.kernel_dtype not in DTYPES:
            raise ConfigError(f"kip: method.kernel_dtype must be one of {', '.join(DTYPES)}, got "
                              f"{cfg.kernel_dtype!r}")
        if cfg.target_batch < real.num_classes:
            raise ConfigError(f"kip: method.target_batch must be at least one image per class "
                              f"({real.num_classes}), got {cfg.target_batch}")
        if not cfg.reg >= 0:
            raise ConfigError(f"kip: method.reg must be >= 0, got {cfg.reg}")
        if cfg.kernel_batch < 0 or cfg.kernel_memory_gb < 0 or cfg.krr_eval_every < 0:
            raise ConfigError("kip: method.kernel_batch, method.kernel_memory_gb and method.krr_eval_every must "
                              "be >= 0")
        if cfg.learn_labels:
            self._init_learned_labels(syn)
        # one Adam over images and labels, as the colab's optimizers.adam over params {'x', 'y'}
        self.optimizer = torch.optim.Adam(self.learnable_groups(syn), lr=cfg.lr_img)

    @staticmethod
    def _init_learned_labels(syn: SyntheticSet) -> None:
        """Learned labels are ``[N, C]`` regression targets, starting at the centred one-hot vectors (the colab
        optimises ``y_init = one_hot(..., center=True)``); done once per set, before a resume loads its labels."""
        labels = syn.labels
        if not (isinstance(labels, nn.Parameter) and labels.requires_grad):
            raise ConfigError("kip: method.learn_labels=true but the set's labels are not learnable")
        if syn.meta.get("label_kind") == REGRESSION_LABELS:
            return
        syn.labels = nn.Parameter(centered_one_hot(labels.detach() if labels.dim() == 2 else
                                                   labels.detach().long(), syn.num_classes).float(),
                                  requires_grad=True)
        syn.meta["label_kind"] = REGRESSION_LABELS

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Adam's moments are copied in: ``Optimizer.load_state_dict`` keeps the very tensors it is given, so
        a state dict loaded from a live distiller would otherwise be advanced by both."""
        super().load_state_dict(copy.deepcopy(state))

    # ------------------------------------------------------------------ the objective
    def _memory_limit(self) -> int | None:
        gb = self.config.kernel_memory_gb
        return int(gb * 1024 ** 3) if gb > 0 else None

    def loss(self, it: int, real: RealData, syn: SyntheticSet,
             generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        cfg = self.config
        assert self.spec is not None, "setup() must run before loss()"
        dtype = DTYPES[cfg.kernel_dtype]
        target = sample_per_class(real, cfg.target_batch // real.num_classes, generator, self.device)
        x_t = target.images.to(dtype)
        y_t = centered_one_hot(target.labels, real.num_classes).to(dtype)
        x_s = syn.images.to(dtype)
        y_s = support_targets(syn).to(dtype)
        limit = self._memory_limit()
        k_ss = kernel_matrix(self.spec, x_s, x_s, batch=cfg.kernel_batch, memory_limit=limit)
        k_ts = kernel_matrix(self.spec, x_t, x_s, batch=cfg.kernel_batch, memory_limit=limit)
        pred = krr_predict(k_ts, k_ss, y_s, cfg.reg)
        loss = krr_mse(pred, y_t)
        acc = float((pred.detach().argmax(1) == target.labels).double().mean())
        return loss, {"acc": 100.0 * acc}

    def step(self, it: int, real: RealData, syn: SyntheticSet, generator: torch.Generator) -> dict[str, float]:
        assert self.optimizer is not None, "setup() must run before step()"
        loss, metrics = self.loss(it, real, syn, generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                    raise SingularKernelError(
                        f"kip: the gradient became non-finite at iteration {it} (kernel regression "
                        f"ill-conditioned); the images were left unchanged - raise method.reg (now "
                        f"{self.config.reg:g}) or use method.kernel_dtype=float64")
        self.optimizer.step()
        out = {"loss": float(loss.detach()), **metrics}
        every = self.config.krr_eval_every
        if (every > 0 and it % every == 0) or it == self.config.iterations:
            acc = kip_krr_accuracy(syn, real, self.spec, reg=self.config.reg, batch=self.config.kernel_batch,
                                   dtype=DTYPES[self.config.kernel_dtype], memory_limit=self._memory_limit())
            out["krr_test_acc"] = acc
            syn.meta["krr_test_acc"] = {"accuracy": acc, "iteration": it, "split": "test",
                                        "kernel": self.spec.describe(), "reg": self.config.reg,
                                        "note": "kernel ridge regression with the kernel, not a trained network; "
                                                "`ddkit evaluate` gives the ConvNet protocol"}
        return out


METHODS.register("kip", obj=KIPDistiller)
