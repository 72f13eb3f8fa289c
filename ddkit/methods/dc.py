"""DC and DSA: dataset condensation by per-class gradient matching.

- ``dc``: Zhao, Mopuri & Bilen, "Dataset Condensation with Gradient Matching", ICLR 2021.
- ``dsa``: Zhao & Bilen, "Dataset Condensation with Differentiable Siamese Augmentation", ICML 2021: DC with
  the same augmentation applied to the real and the synthetic images of a class, also while the network trains.

One engine iteration is one official *outer iteration* (``main.py``, ``for it in range(Iteration)``): a freshly
initialised network, then ``outer_loop`` times: match the per-class gradients of the real and the synthetic
images (one SGD step on the images), and, except after the last of them, train the network for
``inner_loop`` epochs on the (detached) synthetic set.  Sources and every default: anchors.md §2.1/§2.2, and
``VICO-UoE/DatasetCondensation`` ``main.py``/``utils.py`` (``match_loss``, ``distance_wb``, ``get_loops``,
``epoch``).

What differs from the official code, and why the result is the same:

- The official code runs one forward and backward per class for the real images and another, with a graph,
  for the synthetic ones.  Here samples are independent (instance/group/layer/no norm; batch norm is in eval
  mode with frozen statistics while matching, as in the paper), which allows two exact rewrites
  (:mod:`ddkit.functional.pergrad`): the per-class gradients of all classes from one ``vmap(grad(...))`` over a
  class axis, and each class's gradient accumulated over small chunks of its batch.  Which one runs, and the
  chunk sizes, are the speed layer's choice (``SpeedLayer.grad_modes``/``grad_chunk``: on CPU the real side per
  class in cache-sized chunks, the synthetic side batched for small classes; ``speed=plain`` the official
  per-class loop).  The inner network epochs run through the speed layer's ``train_forward`` (the same SGD
  step).  ``tests/test_pergrad.py`` and
  ``tests/test_dc.py`` check gradients, loss and the image gradient against the official per-class
  formulation in float64.  Layers whose double backward ``vmap`` gets wrong (LayerNorm, InstanceNorm modules)
  use the per-class loop on the synthetic side.
- Gradients of 1-D parameters are not computed for the ``ours`` distance, which gives them weight 0.
- ``get_loops`` exits for an IPC outside {1, 10, 20, 30, 40, 50}; :func:`dc_loops` extends the table with a
  documented rule instead.
- All randomness (network initialisation, real batches, augmentation) comes from the run's generator; the
  official DSA reseeds the global RNG from the wall clock.
- Under torchrun (:mod:`ddkit.distributed`) every rank draws the same network, real batch and siamese parameters
  (so the generator stays in step), matches only its own classes (``class % world == rank``: the loss is a sum of
  independent per-class terms) and the image gradients are summed over ranks before the step; the inner network
  epochs run on every rank and rank 0's network is broadcast after them, so all ranks match against the same one.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from .. import distributed
from ..augment import DSA
from ..data.realdata import RealData
from ..errors import ConfigError
from ..evaluation.train import train_model
from ..accel.compiled import has_batchnorm
from ..functional.distances import check_distance, contributes, match_distance
from ..functional.pergrad import (
    ParamDict,
    batching_is_exact,
    class_labels,
    pad_classes,
    per_class_grads,
    per_class_grads_forward,
    per_class_grads_loop,
    split_parameters,
)
from ..registry import METHODS
from ..synthetic import SyntheticSet
from .base import DistillConfig, Distiller
from .common import augment_by_class, blocks, class_rows, resolve_dsa, sample_class_params, sample_per_class

#: ``get_loops`` (utils.py): IPC -> (outer_loop, inner_loop), "empirically good" values of the authors.
OFFICIAL_LOOPS: dict[int, tuple[int, int]] = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15),
                                              50: (50, 10)}


def dc_loops(ipc: int) -> tuple[int, int]:
    """``(outer_loop, inner_loop)`` for any IPC: the official table where it has the IPC, else a rule.

    The table has ``outer_loop = ipc`` throughout and ``outer_loop * inner_loop`` close to 500 network epochs
    per outer iteration (500, 500, 600, 600, 500).  The rule keeps ``outer_loop = ipc`` and
    - 1 < IPC < 10: ``inner_loop = 50``, the value at IPC 10 (IPC 1's inner loop never runs, because the last
      outer step skips the network update, so there is nothing to interpolate from below);
    - 10 < IPC < 50: linear interpolation between the neighbouring table entries, rounded half up;
    - IPC > 50: ``500 / ipc`` rounded half up, at least 1 (the table's budget of about 500 epochs; 10 at IPC 50).
    """
    if isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1:
        raise ConfigError(f"ipc must be a positive integer, got {ipc!r}")
    if ipc in OFFICIAL_LOOPS:
        return OFFICIAL_LOOPS[ipc]
    if ipc < 10:
        return ipc, OFFICIAL_LOOPS[10][1]
    if ipc < 50:
        lo = max(k for k in OFFICIAL_LOOPS if k < ipc)
        hi = min(k for k in OFFICIAL_LOOPS if k > ipc)
        a, b = OFFICIAL_LOOPS[lo][1], OFFICIAL_LOOPS[hi][1]
        return ipc, math.floor(a + (b - a) * (ipc - lo) / (hi - lo) + 0.5)
    return ipc, max(1, math.floor(500 / ipc + 0.5))


# ---------------------------------------------------------------------------------------------------------- config
@dataclass
class DCConfig(DistillConfig):
    """DC options; defaults are ``main.py``'s argparse defaults (``--method DC``) unless stated."""

    model: str = "convnet"  # --model ConvNet
    init: str = "noise"  # --init noise
    iterations: int = 1000  # --Iteration 1000
    lr_img: float = 0.1  # --lr_img 0.1 (README: use 0.01 for MLP: --set method.lr_img=0.01)
    momentum_img: float = 0.5  # optimizer_img = SGD([image_syn], lr_img, momentum=0.5)
    lr_net: float = 0.01  # --lr_net 0.01; optimizer_net = SGD(net.parameters(), lr_net), no momentum
    batch_real: int = 256  # --batch_real 256 real images per class per matching step
    batch_train: int = 256  # --batch_train 256 for the inner network epochs
    outer_loop: int = 0  # 0: from the IPC (dc_loops)
    inner_loop: int = 0  # 0: from the IPC (dc_loops)
    distance: str = "ours"  # --dis_metric ours | mse | cos
    #: DSA strategy: "none" for DC; None = the dataset's (DSA README: no flip for MNIST/SVHN)
    dsa_strategy: str | None = "none"
    bn_images_per_class: int = 16  # BNSizePC: real images per class that set frozen batch-norm statistics


@dataclass
class DSAConfig(DCConfig):
    """DSA options: DC's plus siamese augmentation (``--method DSA --init real --dsa_strategy ...``)."""

    init: str = "real"  # the DSA commands in the README use --init real
    dsa_strategy: str | None = None  # the dataset's strategy (README: color_crop_cutout_flip_scale_rotate,
    #                                   no flip for MNIST/SVHN)


# ------------------------------------------------------------------------------------------------- the objective
def class_grads(net: nn.Module, diff: ParamDict, const: ParamDict, images: Tensor, weights: Tensor, *,
                mode: str, second_order: bool, chunk: int | None, classes: Tensor | None = None) -> ParamDict:
    """Per-class gradients ``[K, ...]`` of the mean cross-entropy of ``images[k]`` (``[K, n, ...]``) for label k
    (label ``classes[k]`` when given: a rank's share of the classes).

    ``mode`` is "batched" (``vmap`` over classes) or "loop" (per class), both exact; "batched" falls back to
    the loop where :func:`batching_is_exact` says it would not be.  ``chunk`` is the number of images per
    forward/backward pass (loop: within a class; batched: over all classes), ``None`` for one pass.
    """
    k, n = images.shape[:2]
    labels = class_labels(k, n, images.device) if classes is None else classes.to(images.device).view(-1, 1).repeat(1, n)
    if mode == "loop" or not batching_is_exact(net, second_order):
        return per_class_grads_loop(net, diff, const, images, labels, weights, sample_chunk=chunk,
                                    create_graph=second_order)
    per_class = None if chunk is None else max(1, chunk // k)
    return per_class_grads(net, diff, const, images, labels, weights, sample_chunk=per_class)


def gradient_match_loss(net: nn.Module, real_images: Tensor, real_weights: Tensor, syn_images: Tensor,
                        syn_weights: Tensor, *, distance: str = "ours", real_mode: str = "batched",
                        syn_mode: str = "batched", real_chunk: int | None = None,
                        real_forward: Callable[[Tensor], Tensor] | None = None,
                        classes: Tensor | None = None) -> Tensor:
    """``sum_c D(grad L(real_c), grad L(syn_c))``, differentiable in ``syn_images``.

    Images are ``[K, n, ...]`` class blocks (already augmented), weights ``[K, n]`` (0 = padding).  The real
    gradients are constants (official: ``gw_real = [g.detach().clone() ...]``) and are computed without a graph,
    per class and chunk through ``real_forward`` (``net``'s compiled forward) when one is given.  ``classes``: the
    labels of the blocks (default ``0..K-1``).
    """
    diff, const = split_parameters(net, lambda name, p: contributes(tuple(p.shape), distance))
    if real_forward is not None:
        own = dict(net.named_parameters())
        k, n = real_images.shape[:2]
        labels = class_labels(k, n, real_images.device) if classes is None else \
            classes.to(real_images.device).view(-1, 1).repeat(1, n)
        g_real = per_class_grads_forward(real_forward, {k: own[k] for k in diff}, real_images, labels, real_weights,
                                         sample_chunk=real_chunk)
    else:
        with torch.no_grad():
            g_real = class_grads(net, diff, const, real_images, real_weights, mode=real_mode, second_order=False,
                                 chunk=real_chunk, classes=classes)
    g_syn = class_grads(net, diff, const, syn_images, syn_weights, mode=syn_mode, second_order=True, chunk=None,
                        classes=classes)
    return match_distance(g_real, g_syn, distance)


def freeze_batchnorm(net: nn.Module, real: RealData, per_class: int, generator: torch.Generator,
                     device: torch.device) -> None:
    """Official BN handling: one train-mode forward of ``per_class`` real images per class updates the running
    statistics, then every batch-norm layer goes to eval mode (so matching sees frozen statistics)."""
    batch = sample_per_class(real, per_class, generator, device)
    net.train()
    with torch.no_grad():
        net(batch.images.to(next(net.parameters()).dtype))
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def select_classes(images: Tensor, row_class: Tensor, classes: list[int]) -> tuple[Tensor, Tensor]:
    """The rows of ``classes`` (ascending class ids) and each row's position in ``classes``: a rank's share."""
    wanted = torch.tensor(classes, dtype=row_class.dtype)
    rows = torch.nonzero(torch.isin(row_class, wanted)).flatten()
    return images[rows.to(images.device)], torch.searchsorted(wanted, row_class[rows])


# ------------------------------------------------------------------------------------------------------- method
class DCDistiller(Distiller):
    """Gradient matching with per-class gradients (``ddkit distill --method dc``)."""

    name: ClassVar[str] = "dc"
    Config: ClassVar[type[DistillConfig]] = DCConfig

    def __init__(self, config: DCConfig | None = None, **kwargs) -> None:
        super().__init__(config, **kwargs)
        self.aug: DSA = DSA.from_strategy(None)
        self.loops: tuple[int, int] = (1, 1)
        self._syn_row_class: Tensor | None = None

    @classmethod
    def default_config(cls, dataset: str, ipc: int) -> DCConfig:
        """``main.py`` defaults; the loops follow the IPC at setup (``dc_loops``)."""
        return cls.Config()  # type: ignore[return-value]

    # ------------------------------------------------------------------ lifecycle
    def setup(self, real: RealData, syn: SyntheticSet, generator: torch.Generator) -> None:
        cfg: DCConfig = self.config  # type: ignore[assignment]
        self._validate(cfg, syn)
        super().setup(real, syn, generator)
        self.aug = resolve_dsa(cfg.dsa_strategy, real.name)
        outer, inner = dc_loops(syn.ipc)
        self.loops = (cfg.outer_loop or outer, cfg.inner_loop or inner)
        _, self._syn_row_class = class_rows(syn.hard_labels(), self.device)

    @staticmethod
    def _validate(cfg: DCConfig, syn: SyntheticSet) -> None:
        check_distance(cfg.distance)
        if cfg.soft_labels or cfg.learn_labels or syn.is_soft:
            raise ConfigError("dc/dsa match gradients of hard-label classes; soft or learned labels are not supported")
        for field in ("batch_real", "batch_train", "bn_images_per_class"):
            if getattr(cfg, field) < 1:
                raise ConfigError(f"{field} must be >= 1, got {getattr(cfg, field)}")
        for field in ("outer_loop", "inner_loop"):
            if getattr(cfg, field) < 0:
                raise ConfigError(f"{field} must be >= 0 (0 = automatic), got {getattr(cfg, field)}")

    # ------------------------------------------------------------------ one outer iteration
    def step(self, it: int, real: RealData, syn: SyntheticSet, generator: torch.Generator) -> dict[str, float]:
        assert self.optimizer is not None, "setup() must run before step()"
        cfg: DCConfig = self.config  # type: ignore[assignment]
        outer, inner = self.loops
        net = self.new_network(real, generator).to(dtype=syn.images.dtype).train()
        compiled = self.compiled(real, syn)
        # the real side's first-order passes (per-class loop) share the compiled graph with the inner updates
        real_forward = self.speed.compiled_forward(net, compiled)
        total, t_match, t_net = 0.0, 0.0, 0.0
        for ol in range(outer):
            t0 = time.perf_counter()
            if has_batchnorm(net):
                freeze_batchnorm(net, real, cfg.bn_images_per_class, generator, self.device)
            loss = self.matching_loss(net, real, syn, generator, real_forward=real_forward)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            total += distributed.sum_gradients_([syn.images], float(loss.detach()))  # torchrun: all ranks' classes
            self.optimizer.step()
            t1 = time.perf_counter()
            t_match += t1 - t0
            if ol == outer - 1:  # official: the last outer step skips the network update
                break
            self.train_network(net, syn, inner, generator, compiled)
            distributed.broadcast_([*net.parameters(), *net.buffers()])  # the ranks match against one network
            t_net += time.perf_counter() - t1
        # official log: loss_avg /= (num_classes * outer_loop)
        return {"loss": total / (real.num_classes * outer), "seconds_match": t_match, "seconds_inner": t_net}

    def compiled(self, real: RealData, syn: SyntheticSet) -> bool:
        """Whether this run compiles its first-order network passes (the speed layer's rule, from the real images
        an iteration pushes through the network: ``outer_loop x batch_real x classes``).  The synthetic side
        (double backward) always runs eagerly."""
        cfg: DCConfig = self.config  # type: ignore[assignment]
        pixels = self.loops[0] * cfg.batch_real * real.num_classes * real.image_size[0] * real.image_size[1]
        return self.speed.compiles_run(pixels, syn.images.dtype, cfg.iterations)

    def matching_loss(self, net: nn.Module, real: RealData, syn: SyntheticSet, generator: torch.Generator, *,
                      real_forward: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """Draw the real batch and the siamese parameters of every class; return the summed matching loss.

        ``real_forward``: ``net``'s compiled forward for the real side's per-class passes (None: functional)."""
        cfg: DCConfig = self.config  # type: ignore[assignment]
        assert self._syn_row_class is not None, "setup() must run first"
        k = real.num_classes
        dtype = syn.images.dtype
        batch = sample_per_class(real, cfg.batch_real, generator, self.device)
        params = sample_class_params(self.aug, k, generator, self.device)
        real_images, real_class, syn_images, syn_class = batch.images, batch.row_class, syn.images, self._syn_row_class
        classes = distributed.class_shard(k)
        if classes is not None:  # torchrun: every rank drew all of the above (generators in step), matches its own
            if not classes:
                return syn.images.sum() * 0.0  # more ranks than classes: a zero gradient
            params = [params[c] for c in classes]
            real_images, real_class = select_classes(real_images, real_class, classes)
            syn_images, syn_class = select_classes(syn_images, syn_class, classes)
        with torch.no_grad():
            real_x = augment_by_class(self.aug, real_images.to(dtype), real_class, params)
        syn_x = augment_by_class(self.aug, syn_images, syn_class, params)
        real_b, real_w = blocks(real_x, real_class, len(params))
        syn_b, syn_w = blocks(syn_x, syn_class, len(params))
        real_mode, syn_mode = self.speed.grad_modes(syn_b.shape[1])
        loop_forward = real_forward if real_mode == "loop" else None
        return gradient_match_loss(net, real_b, real_w, syn_b, syn_w, distance=cfg.distance, real_mode=real_mode,
                                   syn_mode=syn_mode,
                                   real_chunk=self.speed.grad_chunk(real.image_shape, loop_forward is not None),
                                   real_forward=loop_forward,
                                   classes=None if classes is None else torch.tensor(classes))

    def train_network(self, net: nn.Module, syn: SyntheticSet, epochs: int, generator: torch.Generator,
                      compiled: bool = False) -> None:
        """Official ``epoch('train', ...)`` x ``inner_loop``: SGD lr_net without momentum or weight decay on the
        detached synthetic set, batch ``batch_train``, DSA per-sample augmentation for DSA."""
        cfg: DCConfig = self.config  # type: ignore[assignment]
        train_model(
            net,
            syn.images.detach(),
            syn.hard_labels(),
            epochs=epochs,
            lr=cfg.lr_net,
            generator=generator,
            momentum=0.0,
            weight_decay=0.0,
            batch_size=cfg.batch_train,
            decay_at_half=False,
            augment=None if self.aug.is_identity else self.aug,
            forward=self.speed.train_forward(net, tuple(syn.images.shape), compiled),
        )


class DSADistiller(DCDistiller):
    """DC with differentiable siamese augmentation (``ddkit distill --method dsa``)."""

    name: ClassVar[str] = "dsa"
    Config: ClassVar[type[DistillConfig]] = DSAConfig


METHODS.register("dc", obj=DCDistiller)
METHODS.register("dsa", obj=DSADistiller)
