"""CAFE: aligning features for dataset condensation (Wang et al., CVPR 2022).

One outer iteration draws a fresh network and alternates two phases until the network's real accuracy settles:

1. *Image update.*  Real and synthetic images of each class (siamese DSA when ``dsa=True``) go through the
   network; the loss is
   - layer-wise feature alignment: ``sum_l w_l sum_c ||mean_c real_l - mean_c syn_l||^2`` on the last four
     feature maps (official ``criterion_middle``: MSE with reduction 'sum' between class-mean maps),
   - the same on the embedding (official ``criterion_middle(last_syn_feature, last_real_feature)``),
   - discrimination: ``inner_weight * sum_i CE(real_emb_i @ centres^T, y_i)``, each real embedding classified
     by its dot products with the synthetic class centres (official ``torch.mm(real_features[0],
     last_syn_feature.t())`` with ``CrossEntropyLoss(reduction='sum')``),
   - the real cross-entropy ``CE(net(real), y)`` (official ``loss_real``).  It does not depend on the images,
     and the official code discards the network gradients it produces (``epoch`` zeroes them before its own
     backward), so it changes nothing; it is computed without a graph and only reported.
2. *Network update.*  The network trains on the synthetic set (SGD lr_net, no momentum; DSA when ``dsa``) epoch
   by epoch.

Stopping rules (official ``distill.py``): after each image update the network's accuracy on 128 fresh real
images per class is recorded; once ``watch_window`` (10) readings exist, the outer iteration ends when their
max - min is below ``lambda_1`` (0.04), else the oldest is dropped.  After each training epoch the same reading
is taken; the inner loop ends once the max - min of the last 10 readings *exceeds* ``lambda_2`` (0.03).

Source: ``kaiwang960112/CAFE`` ``distill.py``, ``networks.py``, ``utils.py`` (anchors.md section 2.4).
Deliberate differences, each noted where it is implemented:

- shapes come from the data (the official code hard-codes ``reshape(batch_real * 10, 3, 32, 32)``);
- feature maps come from the model's stages (:func:`feature_taps`), so every zoo model works;
- a reading is the mean of the per-class accuracies; the official accumulator is not reset between readings
  (``acc_test += ...; acc_test /= num_classes``), which adds 1/K of the previous reading to each new one;
- the official loops have no upper bound; ``max_updates`` and ``max_inner_epochs`` cap them (reported in the
  metrics as ``capped_outer`` / ``capped_inner``);
- one ``step`` is one official outer iteration ``it`` (fresh network, both loops), so the resume state at a
  step boundary is the image optimizer alone: the network and the stopping-rule windows are rebuilt every
  iteration exactly as in the official loop.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..accel import SpeedLayer
from ..augment import DSA
from ..data.realdata import RealData
from ..errors import ConfigError
from ..evaluation.train import classification_loss, train_model
from ..registry import METHODS
from ..synthetic import SyntheticSet
from .base import DistillConfig, Distiller
from .common import (ClassBatch, Params, augment_by_class, class_mean_accuracy, class_means, class_rows, resolve_dsa, sample_class_params,
                     sample_per_class)

# ---------------------------------------------------------------------------------------------------------- config
@dataclass
class CAFEConfig(DistillConfig):
    """CAFE options; defaults are ``distill.py``'s argparse defaults unless stated."""

    iterations: int = 2000  # --Iteration 2000
    lr_img: float = 0.1  # --lr_img 0.1
    momentum_img: float = 0.5  # optimizer_img = SGD(..., momentum=0.5)
    init: str = "noise"  # --init noise
    lr_net: float = 0.01  # --lr_net 0.01, optimizer_net = SGD(net.parameters(), lr=lr_net)
    batch_real: int = 256  # --batch_real 256 per class
    batch_train: int = 256  # --batch_train 256 (network training on the synthetic set)
    # Layer weights, named as in distill.py: first_weight multiplies the deepest aligned map
    # (official real_features[-4]: the last stage after pooling), fourth_weight the fourth deepest.
    first_weight: float = 1.0  # --first_weight 1.0
    second_weight: float = 1.0  # --second_weight 1.0
    third_weight: float = 0.1  # --third_weight 0.1
    fourth_weight: float = 0.1  # --fourth_weight 0.1
    inner_weight: float = 0.01  # --inner_weight 0.01 (discrimination loss)
    lambda_1: float = 0.04  # --lambda_1 0.04: outer loop ends when the readings' range falls below it
    lambda_2: float = 0.03  # --lambda_2 0.03: inner loop ends when the readings' range exceeds it
    watch_window: int = 10  # distill.py: len(acc_watcher) == 10
    watch_per_class: int = 128  # distill.py: get_images(c, 128) for every reading
    #: image lr x lr_decay at these fractions of ``iterations`` (distill.py adjust_learning_rate: x0.5 at
    #: iterations 1200, 1600, 1800 of 2000); "" disables
    lr_decay_at: str = "0.6,0.8,0.9"
    lr_decay: float = 0.5
    dsa: bool = False  # CAFE+DSA: --method DSA with a DSA strategy
    dsa_strategy: str | None = None  # None = the dataset's strategy (used only when dsa is on)
    max_updates: int = 100  # ours: cap on image updates per outer iteration (the official loop is unbounded)
    max_inner_epochs: int = 100  # ours: cap on training epochs per inner loop (unbounded officially)

    def layer_weights(self) -> list[float]:
        """Weights deepest first."""
        return [self.first_weight, self.second_weight, self.third_weight, self.fourth_weight]

    def decay_milestones(self) -> list[int]:
        """Iteration numbers (0-based, as the official ``it``) at which the image lr is multiplied by lr_decay."""
        text = self.lr_decay_at.strip()
        if not text:
            return []
        try:
            fractions = [float(v) for v in text.split(",")]
        except ValueError:
            raise ConfigError(f"lr_decay_at must be comma-separated fractions, got {self.lr_decay_at!r}") from None
        return [int(round(f * self.iterations)) for f in fractions]


# ------------------------------------------------------------------------------------------------ feature maps
def feature_taps(net: nn.Module, x: Tensor) -> tuple[list[Tensor], Tensor]:
    """The maps CAFE aligns (in forward order) and the embedding.

    The official ConvNet returns, for depth 3, the activations *before* each block's pooling plus the last
    block's pooled output (``networks.py``: ``features[:-9]``, ``[-9:-5]``, ``[-5:-1]``, ``[-1:]``): the model's
    ``feature_maps(x, before_pooling=True)`` applies that rule to any zoo model.
    """
    maps = net.feature_maps(x, before_pooling=True)
    return maps[:-1], maps[-1]


def weighted_taps(taps: list[Tensor], weights: list[float]) -> list[tuple[int, float]]:
    """``(tap index, weight)`` for the deepest ``len(weights)`` taps with a non-zero weight."""
    out = []
    for depth, w in enumerate(weights):
        index = len(taps) - 1 - depth
        if index >= 0 and w != 0.0:
            out.append((index, w))
    return out


# ---------------------------------------------------------------------------------------------------- helpers
@dataclass
class _RealStats:
    """What the image update needs from the real batch (all without graph)."""

    tap_means: dict[int, Tensor]
    emb: Tensor  # [M, D]
    emb_means: Tensor  # [K, D]
    loss_real: float


@torch.no_grad()
def real_statistics(net: nn.Module, batch: ClassBatch, aug: DSA, params: list[Params], num_classes: int,
                    weights: list[float], chunk: int, dtype: torch.dtype, speed: SpeedLayer) -> _RealStats:
    """Class means of the aligned maps and the embedding, per-sample embeddings, and the real CE, in chunks of
    ``chunk`` rows (augmented in blocks chosen by ``speed``)."""
    sums: dict[int, Tensor] = {}
    embs: list[Tensor] = []
    ce = 0.0
    total = batch.images.shape[0]
    augment = lambda x, rows: augment_by_class(aug, x, rows, params)  # noqa: E731
    for labels, x in speed.augmented_chunks(augment, batch.images, batch.row_class, batch.labels, chunk, dtype):
        taps, emb = feature_taps(net, x)
        for index, _ in weighted_taps(taps, weights):
            if index not in sums:
                sums[index] = taps[index].new_zeros((num_classes, *taps[index].shape[1:]))
            sums[index].index_add_(0, labels, taps[index])
        embs.append(emb)
        ce += float(F.cross_entropy(net.classifier(emb), labels, reduction="sum"))
    emb_all = torch.cat(embs)
    counts = batch.counts.clamp_min(1).to(device=emb_all.device, dtype=emb_all.dtype)
    tap_means = {i: s / counts.view(-1, *([1] * (s.dim() - 1))) for i, s in sums.items()}
    emb_means = emb_all.new_zeros((num_classes, emb_all.shape[1])).index_add_(0, batch.labels, emb_all)
    return _RealStats(tap_means, emb_all, emb_means / counts.view(-1, 1), ce / max(total, 1))


# ------------------------------------------------------------------------------------------------------- method
class CAFEDistiller(Distiller):
    """CAFE / CAFE+DSA (``ddkit distill --method cafe [--set method.dsa=true]``)."""

    name: ClassVar[str] = "cafe"
    Config: ClassVar[type[DistillConfig]] = CAFEConfig

    def __init__(self, config: CAFEConfig | None = None, **kwargs) -> None:
        super().__init__(config, **kwargs)
        self.aug: DSA = DSA.from_strategy(None)
        #: the stopping-rule readings' forward (eval mode), the part of an outer iteration that runs most often;
        #: compiled (by the speed layer's rule) its logits differ from eager ones by float rounding only
        self.reader = self.speed.embedder(False, entry="forward")
        self._syn_labels: Tensor | None = None
        self._syn_row_class: Tensor | None = None

    @classmethod
    def default_config(cls, dataset: str, ipc: int) -> CAFEConfig:
        """``distill.py`` defaults (the official script uses the same values for every dataset and IPC)."""
        return CAFEConfig()

    def setup(self, real: RealData, syn: SyntheticSet, generator: torch.Generator) -> None:
        cfg: CAFEConfig = self.config  # type: ignore[assignment]
        if cfg.watch_window < 1:
            raise ConfigError(f"watch_window must be >= 1, got {cfg.watch_window}")
        cfg.decay_milestones()  # validate early
        super().setup(real, syn, generator)
        self.aug = resolve_dsa(cfg.dsa_strategy, real.name) if cfg.dsa else DSA.from_strategy(None)
        # the work of a run: at least one real batch forward per outer iteration
        pixels = cfg.batch_real * real.num_classes * real.image_size[0] * real.image_size[1]
        self.reader = self.speed.embedder(self.speed.compiles_run(pixels, syn.images.dtype, cfg.iterations),
                                          entry="forward")
        self._syn_labels, self._syn_row_class = class_rows(syn.hard_labels(), self.device)

    # ------------------------------------------------------------------ one outer iteration
    def step(self, it: int, real: RealData, syn: SyntheticSet, generator: torch.Generator) -> dict[str, float]:
        """One official outer iteration: fresh network, image updates alternating with network training."""
        cfg: CAFEConfig = self.config  # type: ignore[assignment]
        assert self.optimizer is not None, "setup() must run before step()"
        self._set_image_lr(it)
        net = self.new_network(real, generator).to(dtype=syn.images.dtype).train()
        net_opt = torch.optim.SGD(net.parameters(), lr=cfg.lr_net)  # distill.py: no momentum, no decay
        outer: list[float] = []
        totals = {"loss": 0.0, "loss_middle": 0.0, "loss_mean": 0.0, "loss_disc": 0.0, "loss_real": 0.0}
        updates = inner_epochs = capped_inner = 0
        capped_outer = 1
        reading = 0.0
        seconds = {"reading": 0.0, "update": 0.0, "train": 0.0}  # where the outer iteration's time goes

        def read() -> float:
            t0 = time.perf_counter()
            value = self.real_accuracy(net, real, generator)
            seconds["reading"] += time.perf_counter() - t0
            return value

        while updates < cfg.max_updates:
            t0 = time.perf_counter()
            for key, value in self._image_update(net, real, syn, generator).items():
                totals[key] += value
            updates += 1
            seconds["update"] += time.perf_counter() - t0
            reading = read()
            if _window_done(outer, reading, cfg.watch_window, lambda r: r < cfg.lambda_1):
                capped_outer = 0
                break
            t0, read_before = time.perf_counter(), seconds["reading"]
            epochs = self._train_network(net, net_opt, syn, generator, read)
            seconds["train"] += time.perf_counter() - t0 - (seconds["reading"] - read_before)
            inner_epochs += epochs
            capped_inner += int(epochs >= cfg.max_inner_epochs)
        metrics = {key: value / max(updates, 1) for key, value in totals.items()}
        metrics.update(updates=float(updates), inner_epochs=float(inner_epochs), real_acc=reading,
                       capped_outer=float(capped_outer), capped_inner=float(capped_inner),
                       lr_img=float(self.optimizer.param_groups[0]["lr"]),
                       # where the time goes: the stopping-rule readings (all), image updates, network epochs
                       seconds_reading=seconds["reading"], seconds_update=seconds["update"],
                       seconds_train=seconds["train"])
        return metrics

    def _set_image_lr(self, it: int) -> None:
        """distill.py ``adjust_learning_rate(optimizer_img, it, lr_img)`` with its 0-based ``it``."""
        cfg: CAFEConfig = self.config  # type: ignore[assignment]
        passed = sum(1 for m in cfg.decay_milestones() if it - 1 >= m)
        for group in self.optimizer.param_groups:  # type: ignore[union-attr]
            group["lr"] = cfg.lr_img * cfg.lr_decay ** passed

    def _train_network(self, net: nn.Module, net_opt: torch.optim.Optimizer, syn: SyntheticSet,
                       generator: torch.Generator, read: Callable[[], float]) -> int:
        """Train on the synthetic set until the last ``watch_window`` readings (``read()``: the network's real
        accuracy) span more than lambda_2."""
        cfg: CAFEConfig = self.config  # type: ignore[assignment]
        net.requires_grad_(True)
        images, labels = syn.images.detach(), syn.labels.detach()
        augment = None if self.aug.is_identity else self.aug  # distill.py: epoch(..., aug=args.dsa)
        # the readings' compile decision serves the training passes too (in cache-sized chunks where exact):
        # CAFE IPC 10 spent 194 s of a 910 s outer iteration in eager epochs
        compiled = self.reader.enabled
        forward = self.speed.train_forward(net, tuple(images.shape), compiled)
        window: list[float] = []
        epochs = 0
        while epochs < cfg.max_inner_epochs:
            train_model(net, images, labels, epochs=1, lr=cfg.lr_net, generator=generator, momentum=0.0,
                        weight_decay=0.0, batch_size=cfg.batch_train, decay_at_half=False, augment=augment,
                        optimizer=net_opt, forward=forward)
            epochs += 1
            if _window_done(window, read(), cfg.watch_window,
                            lambda r: r > cfg.lambda_2):
                break
        return epochs

    # ------------------------------------------------------------------ the image objective
    def matching_loss(self, net: nn.Module, real: RealData, syn: SyntheticSet,
                      generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """CAFE's image loss on one real batch (the network's parameters are treated as constants)."""
        cfg: CAFEConfig = self.config  # type: ignore[assignment]
        assert self._syn_labels is not None and self._syn_row_class is not None, "setup() must run first"
        k = real.num_classes
        weights = cfg.layer_weights()
        dtype = syn.images.dtype
        batch = sample_per_class(real, cfg.batch_real, generator, self.device)
        params = sample_class_params(self.aug, k, generator, self.device)
        chunk = self.speed.no_grad_chunk(tuple(batch.images.shape), net, compiled=False)
        stats = real_statistics(net, batch, self.aug, params, k, weights, chunk, dtype, self.speed)
        x = augment_by_class(self.aug, syn.images, self._syn_row_class, params)
        taps, emb = feature_taps(net, x)
        middle = sum(w * ((stats.tap_means[i] - class_means(taps[i], self._syn_labels, k)) ** 2).sum()
                     for i, w in weighted_taps(taps, weights))
        centres = class_means(emb, self._syn_labels, k)
        mean_term = ((stats.emb_means - centres) ** 2).sum()
        disc = cfg.inner_weight * F.cross_entropy(stats.emb @ centres.t(), batch.labels, reduction="sum")
        loss = middle + mean_term + disc + stats.loss_real
        return loss, {"loss_middle": _item(middle), "loss_mean": _item(mean_term), "loss_disc": _item(disc),
                      "loss_real": stats.loss_real}

    def _image_update(self, net: nn.Module, real: RealData, syn: SyntheticSet,
                      generator: torch.Generator) -> dict[str, float]:
        assert self.optimizer is not None
        net.requires_grad_(False)  # only the images need gradients
        loss, parts = self.matching_loss(net, real, syn, generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": float(loss.detach()), **parts}

    def loss(self, it: int, real: RealData, syn: SyntheticSet, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """The image objective under a fresh network (for inspection; ``step`` runs the full bi-level loop)."""
        net = self.new_network(real, generator).to(dtype=syn.images.dtype).train()
        net.requires_grad_(False)
        return self.matching_loss(net, real, syn, generator)

    # ------------------------------------------------------------------ the stopping-rule reading
    @torch.no_grad()
    def real_accuracy(self, net: nn.Module, real: RealData, generator: torch.Generator) -> float:
        """Mean over classes of the accuracy on ``watch_per_class`` fresh real images per class (eval mode).

        Eval mode makes batch-norm nets use running statistics; the official reading runs class by class in
        whatever mode the network was left (train mode at first, so BN would normalise a one-class batch).
        """
        cfg: CAFEConfig = self.config  # type: ignore[assignment]
        batch = sample_per_class(real, cfg.watch_per_class, generator, self.device)
        was_training = net.training
        net.eval()
        forward = self.reader.bind(net)  # net itself, or a compiled copy holding its current state and mode
        chunk = self.speed.no_grad_chunk(tuple(batch.images.shape), net, self.reader.enabled)
        accuracy = class_mean_accuracy(forward, batch, real.num_classes, chunk, next(net.parameters()).dtype)
        net.train(was_training)
        return accuracy


def _item(value: Tensor | float) -> float:
    return float(value.detach()) if isinstance(value, Tensor) else float(value)


def _window_done(window: list[float], reading: float, size: int, stop) -> bool:
    """The official watcher: append; once ``size`` readings exist, stop if ``stop(max - min)``, else drop the oldest."""
    window.append(reading)
    if len(window) < size:
        return False
    if stop(max(window) - min(window)):
        return True
    window.pop(0)
    return False


METHODS.register("cafe", obj=CAFEDistiller)
