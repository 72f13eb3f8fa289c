"""DM: dataset condensation with distribution matching (Zhao & Bilen, WACV 2023).

Every iteration draws a freshly initialised, untrained embedding network, augments the real and the synthetic
images of each class with the *same* DSA parameters, and moves the synthetic images so that the class means of
their embeddings (``features(x)``, the official ``net.embed``) match those of a real batch:

    loss = sum_c || mean_i f(A_c(real_c,i)) - mean_j f(A_c(syn_c,j)) ||^2

Source: ``VICO-UoE/DatasetCondensation/main_DM.py`` (anchors.md section 2.3).  What differs from that script,
and why it is the same objective:

- The official code runs one forward per class (ConvNet branch).  With per-sample normalisation (instance,
  group, layer or none) each image's embedding does not depend on the rest of its batch, so forwarding all
  classes together gives the same numbers; here the real images go through the network under
  ``torch.no_grad`` (in chunks sized by the speed layer) and only their per-class sums are kept, and all
  synthetic images go through one forward.  ``tests/test_dm.py`` checks loss and gradient against the per-class loop in float64.
- With batch-norm embedders the real images of all classes form one batch and the synthetic images another,
  which is exactly the official BN branch (``'BN' in args.model``).
- Siamese augmentation draws one parameter set per class from the run's generator (the official code reseeds
  the global RNG from the wall clock); classes that drew the same op family are augmented in one call.
- Embedding-network parameters never require gradients (official: ``param.requires_grad = False``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import Tensor, nn

from .. import distributed
from ..accel.compiled import has_batchnorm
from ..augment import DSA
from ..data.realdata import RealData
from ..registry import METHODS
from ..synthetic import SyntheticSet
from .base import DistillConfig, Distiller
from .common import (
    ClassBatch,
    class_rows,
    Params,
    augment_by_class,
    class_means,
    resolve_dsa,
    sample_class_params,
    sample_per_class,
)

#: DM README: "for CIFAR10 dataset we set --lr_img 1 for --ipc = 1/10/50, --lr_img 10 for
#: --ipc = 100/200/500/1000/1250.  For CIFAR100 dataset, we set --lr_img 1 for --ipc = 1/10/50/100/125."
LARGE_IPC = 100
LARGE_IPC_LR_IMG = 10.0


# ---------------------------------------------------------------------------------------------------------- config
@dataclass
class DMConfig(DistillConfig):
    """DM options; defaults are ``main_DM.py``'s argparse defaults unless stated."""

    iterations: int = 20000  # --Iteration 20000
    lr_img: float = 1.0  # --lr_img 1.0 (README: 10 for CIFAR-10 at IPC >= 100; see default_config)
    momentum_img: float = 0.5  # optimizer_img = SGD(..., momentum=0.5)
    init: str = "real"  # --init real
    batch_real: int = 256  # --batch_real 256 real images per class per iteration
    #: DSA strategy; None = the dataset's (README: no flip for MNIST/SVHN), "none" disables augmentation
    dsa_strategy: str | None = None
    #: README's out-of-memory workaround (TinyImageNet): forward and backward one class at a time.  The image
    #: update is the same sum of per-class gradients, so only peak memory changes (BN nets then see per-class
    #: synthetic batches).
    per_class_step: bool = False


def frozen_embedder(distiller: Distiller, real: RealData, generator: torch.Generator, dtype: torch.dtype) -> nn.Module:
    """A fresh network (initialised from ``generator``) with frozen parameters, in train mode as officially."""
    net = distiller.new_network(real, generator)
    net.requires_grad_(False)
    net.to(dtype=dtype)
    return net.train()


# ------------------------------------------------------------------------------------------------------- method
@dataclass
class _Draw:
    """Everything one DM iteration samples: the embedder, the real class means, the siamese parameters."""

    net: nn.Module
    real_means: Tensor  # [K, D], no graph
    params: list[Params]
    #: ``net.features``, or the speed layer's compiled forward bound to ``net``'s parameters (both branches use it)
    features: Callable[[Tensor], Tensor]
    #: the classes this process matches under torchrun (``real_means`` holds only theirs); None: all of them
    classes: list[int] | None = None


class DMDistiller(Distiller):
    """Distribution matching with fresh random embedders (``ddkit distill --method dm``)."""

    name: ClassVar[str] = "dm"
    Config: ClassVar[type[DistillConfig]] = DMConfig

    def __init__(self, config: DMConfig | None = None, **kwargs) -> None:
        super().__init__(config, **kwargs)
        self.aug: DSA = DSA.from_strategy(None)
        self.encoder = self.speed.embedder(False)
        self.compiled = False
        self._syn_labels: Tensor | None = None
        self._syn_row_class: Tensor | None = None

    @classmethod
    def default_config(cls, dataset: str, ipc: int) -> DMConfig:
        """``main_DM.py`` defaults; lr_img 10 for CIFAR-10 at IPC >= 100 (DM README: "--lr_img 10 for
        --ipc = 100/200/500/1000/1250"; CIFAR-100 keeps 1 at every IPC)."""
        config = DMConfig()
        if dataset.lower().replace("-", "") == "cifar10" and ipc >= LARGE_IPC:
            config.lr_img = LARGE_IPC_LR_IMG
        return config

    # ------------------------------------------------------------------ lifecycle
    def setup(self, real: RealData, syn: SyntheticSet, generator: torch.Generator) -> None:
        cfg: DMConfig = self.config  # type: ignore[assignment]
        super().setup(real, syn, generator)
        self.aug = resolve_dsa(cfg.dsa_strategy, real.name)
        pixels = real.image_size[0] * real.image_size[1]
        per_iteration = (cfg.batch_real * real.num_classes + syn.images.shape[0]) * pixels
        self.compiled = self.speed.compiles_run(per_iteration, syn.images.dtype, cfg.iterations)
        self.encoder = self.speed.embedder(self.compiled)
        self._syn_labels, self._syn_row_class = class_rows(syn.hard_labels(), self.device)

    # ------------------------------------------------------------------ the objective
    def draw(self, real: RealData, syn: SyntheticSet, generator: torch.Generator) -> _Draw:
        """Sample the embedder, the real batch and the siamese parameters; reduce the real batch to class means.

        The order of draws from ``generator`` (network, real indices, augmentation) is fixed, so a resumed run
        repeats exactly.
        """
        cfg: DMConfig = self.config  # type: ignore[assignment]
        net = frozen_embedder(self, real, generator, syn.images.dtype)
        batch = sample_per_class(real, cfg.batch_real, generator, self.device)
        params = sample_class_params(self.aug, real.num_classes, generator, self.device)
        features = self.encoder.bind(net)
        classes = classes_here(net, real.num_classes)
        if classes is not None:  # every rank drew the same numbers above; it embeds only its own classes
            batch = class_subset(batch, classes)
        real_means = (self.real_feature_means(features, net, batch, params, real.num_classes, syn.images.dtype)
                      if batch.images.shape[0] else None)
        return _Draw(net, real_means, params, features, classes)

    @torch.no_grad()
    def real_feature_means(self, features: Callable[[Tensor], Tensor], net: nn.Module, batch: ClassBatch,
                           params: list[Params], num_classes: int, dtype: torch.dtype) -> Tensor:
        """Per-class mean embedding of the augmented real batch, without a graph.

        Real images are constants of the objective, so only their per-class sums are kept; the speed layer
        chooses the chunks (everything at once for batch-norm embedders, whose statistics need the whole batch).
        """
        chunk = self.speed.no_grad_chunk(tuple(batch.images.shape), net, self.compiled)
        sums: Tensor | None = None
        augment = lambda x, rows: augment_by_class(self.aug, x, rows, params)  # noqa: E731
        for labels, x in self.speed.augmented_chunks(augment, batch.images, batch.row_class, batch.labels, chunk,
                                                     dtype):
            feats = features(x)
            if sums is None:
                sums = feats.new_zeros((num_classes, feats.shape[1]))
            sums.index_add_(0, labels, feats)
        assert sums is not None, "empty real batch"
        counts = batch.counts.clamp_min(1).to(device=sums.device, dtype=sums.dtype)
        return sums / counts.view(-1, 1)

    def syn_means(self, draw: _Draw, images: Tensor, labels: Tensor, row_class: Tensor, num_classes: int) -> Tensor:
        """Class means of the augmented synthetic embeddings (with graph)."""
        x = augment_by_class(self.aug, images, row_class, draw.params)
        features = self.speed.graph_forward(draw.features, draw.net, tuple(x.shape), self.compiled)
        return class_means(features(x), labels, num_classes)

    def loss(self, it: int, real: RealData, syn: SyntheticSet, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        draw = self.draw(real, syn, generator)
        assert self._syn_labels is not None and self._syn_row_class is not None, "setup() must run first"
        images, labels, row_class = syn.images, self._syn_labels, self._syn_row_class
        if draw.classes is not None:  # torchrun: this rank's classes only (their terms are independent)
            rows = torch.nonzero(torch.isin(row_class, torch.tensor(draw.classes, dtype=row_class.dtype))).flatten()
            if draw.real_means is None or rows.numel() == 0:
                return images.sum() * 0.0, {}  # no class here (more ranks than classes): a zero gradient
            images, labels, row_class = images[rows.to(self.device)], labels[rows.to(labels.device)], row_class[rows]
        assert draw.real_means is not None
        means = self.syn_means(draw, images, labels, row_class, real.num_classes)
        loss = ((draw.real_means - means) ** 2).sum()
        # the official log prints the loss divided by the number of classes
        return loss, {"loss_per_class": float(loss.detach()) / real.num_classes}

    def step(self, it: int, real: RealData, syn: SyntheticSet, generator: torch.Generator) -> dict[str, float]:
        cfg: DMConfig = self.config  # type: ignore[assignment]
        if not cfg.per_class_step and not distributed.active():
            return super().step(it, real, syn, generator)  # the single-process path
        assert self.optimizer is not None and self._syn_row_class is not None, "setup() must run first"
        if not cfg.per_class_step:
            self.optimizer.zero_grad(set_to_none=True)
            loss, _ = self.loss(it, real, syn, generator)
            loss.backward()
            total = self.reduce_classes(syn, float(loss.detach()), sharded=True)
            self.optimizer.step()
            return {"loss": total, "loss_per_class": total / real.num_classes}
        draw = self.draw(real, syn, generator)
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for c in (range(real.num_classes) if draw.classes is None else draw.classes):
            rows = torch.nonzero(self._syn_row_class == c).flatten()
            if rows.numel() == 0:
                continue
            images = syn.images[rows.to(self.device)]
            local = torch.zeros(rows.numel(), dtype=torch.long)
            mean = draw.features(augment_by_class(self.aug, images, local, [draw.params[c]])).mean(0)
            loss_c = ((draw.real_means[c] - mean) ** 2).sum()
            loss_c.backward()  # frees this class's graph before the next class is built
            total += float(loss_c.detach())
        total = self.reduce_classes(syn, total, sharded=draw.classes is not None)
        self.optimizer.step()
        return {"loss": total, "loss_per_class": total / real.num_classes}

    @staticmethod
    def reduce_classes(syn: SyntheticSet, loss: float, *, sharded: bool) -> float:
        """Under torchrun: sum the ranks' image gradients and losses (each rank matched its own classes), so every
        rank takes the single-process step; the loss is a sum over classes, so this is the same sum in another
        order.  A rank whose images got no gradient contributes zeros."""
        if not sharded or not distributed.active():
            return loss
        if syn.images.grad is None:
            syn.images.grad = torch.zeros_like(syn.images)
        distributed.all_reduce_sum_([syn.images.grad])
        return distributed.all_reduce_sum(loss)


def classes_here(net: nn.Module, num_classes: int) -> list[int] | None:
    """The classes this process matches under torchrun (``class % world == rank``), or None for all of them: in a
    single process, and with batch-norm embedders, whose batch statistics tie the classes together (every rank
    then computes the whole, identical step)."""
    if not distributed.active() or has_batchnorm(net):
        return None
    return [c for c in range(num_classes) if distributed.owned(c)]


def class_subset(batch: ClassBatch, classes: list[int]) -> ClassBatch:
    """The rows of ``batch`` that belong to ``classes`` (``counts`` stays per class, zero for the others)."""
    keep = torch.isin(batch.row_class, torch.tensor(classes, dtype=batch.row_class.dtype))
    rows = torch.nonzero(keep).flatten()
    counts = batch.counts.clone()
    counts[[c for c in range(counts.numel()) if c not in set(classes)]] = 0
    return ClassBatch(batch.images[rows.to(batch.images.device)], batch.labels[rows.to(batch.labels.device)],
                      batch.row_class[rows], counts)


METHODS.register("dm", obj=DMDistiller)
