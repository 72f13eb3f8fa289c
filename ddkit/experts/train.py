"""Training expert trajectories: networks trained on the real training split, their parameters kept per epoch.

Defaults are those of the official MTT ``buffer.py`` (anchors.md section 2.5): SGD lr 0.01 (``--lr_teacher``),
no momentum (``--mom 0``), no weight decay (``--l2 0``), no lr decay (``--decay`` off), batch 256
(``--batch_train``), DSA on every batch (``epoch(..., aug=True)`` with ``--dsa True``), 50 epochs, and a test
pass after every epoch (recorded per epoch, as the official script prints it).  ZCA is a property of the data
(``load_dataset(..., zca=True)``, ``--set data.zca=true``); the store records which preprocessing was used.
``optimizer="gsam"`` trains FTD's flat experts (``gsam.py``).

The speed layer (``ddkit/accel``, ``speed: auto|plain``) runs the training passes as it runs evaluation's: the
network gets the device's module swaps (:meth:`SpeedLayer.prepare`: the patch-statistics first stage on CPU), and
``train_model`` calls :meth:`SpeedLayer.train_forward` (cache-sized chunks on CPU, compiled when the whole run
pushes enough pixels for the one rule :func:`~ddkit.accel.compiled.compile_pays_off`: every full-size store does).
The same SGD steps up to float rounding (``tests/test_experts.py`` compares ``plain`` and ``auto`` trajectories),
so the speed setting is not part of the store's identity; the parameter names and the per-epoch snapshots are
those of the plain model.

Every expert is trained by :func:`ddkit.evaluation.train.train_model`, one epoch per call, with the optimizer
carried across calls, from its own random stream (``make_generator(seed, "expert", index)``: initialisation,
batch order and augmentation).  An expert therefore does not depend on the others, so an interrupted run that
retrains its unfinished expert from scratch ends with exactly the store an uninterrupted run writes, and a
rerun with more experts adds experts without changing the existing ones.

How the batch reaches GSAM.  ``train_model`` draws each batch as ``images[ix]``, augments it with
``augment(batch, generator)``, and steps the optimizer without a closure.  GSAM needs a second gradient on the
same augmented batch, so the expert trainer hands ``train_model`` the *row indices* of the training set as its
"images": the hook (:class:`_BatchHook`) receives the indices of the batch, gathers the images and labels,
augments them, and registers the batch's loss closure with GSAM.  The random numbers drawn (one permutation per
epoch, then one augmentation per batch) are the same as with the images themselves.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .. import distributed
from ..accel import SpeedLayer, check_speed
from ..data.realdata import RealData
from ..engine.seeding import make_generator, seeded_global
from ..errors import ConfigError
from ..evaluation.train import accuracy, classification_loss, train_model
from ..models import create_model
from .gsam import DEFAULT_ALPHA, DEFAULT_RHO, GSAM
from .store import ExpertStore, StoreSpec, preprocess_difference

OPTIMIZERS = ("sgd", "gsam")


@dataclass
class ExpertConfig:
    """How each expert is trained; defaults are the official ``buffer.py``'s (anchors.md 2.5, 2.6)."""

    model: str = "convnet"  # --model ConvNet
    epochs: int = 50  # --train_epochs 50
    lr: float = 0.01  # --lr_teacher 0.01
    momentum: float = 0.0  # --mom 0
    weight_decay: float = 0.0  # --l2 0
    batch_size: int = 256  # --batch_train 256
    #: DSA strategy; "auto" = the dataset's (ddkit's digit datasets drop flip), "none" = no augmentation.
    #: buffer.py uses DSA ('color_crop_cutout_flip_scale_rotate') on every training batch.
    dsa_strategy: str = "auto"
    optimizer: str = "sgd"  # "gsam": FTD's buffer_FTD.py
    rho: float = DEFAULT_RHO  # GSAM only: FTD run_buffer.sh --rho_max=--rho_min=0.01
    alpha: float = DEFAULT_ALPHA  # GSAM only: FTD paper section 4.1
    adaptive: bool = True  # GSAM only: buffer_FTD.py --adaptive default True
    #: test accuracy after every epoch (the official script does this; it is part of its per-epoch time)
    test_every_epoch: bool = True
    #: how the passes run (the speed layer: "auto" levers on CPU, "plain" the official computation); the same
    #: trajectory up to float rounding, so not part of the store's identity (``--set speed=plain``)
    speed: str = "auto"

    def check(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown expert optimizer {self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
        if self.epochs < 1:
            raise ConfigError(f"expert epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1 or self.lr <= 0:
            raise ConfigError(f"expert batch_size must be >= 1 and lr > 0 (got {self.batch_size}, {self.lr})")
        check_speed(self.speed)

    def optimizer_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.optimizer, "lr": self.lr, "momentum": self.momentum,
                               "weight_decay": self.weight_decay, "batch_size": self.batch_size}
        if self.optimizer == "gsam":
            out.update(rho=self.rho, alpha=self.alpha, adaptive=self.adaptive)
        return out


def _dsa(config: ExpertConfig, dataset: str):
    from ..methods.common import resolve_dsa

    return resolve_dsa(None if config.dsa_strategy == "auto" else config.dsa_strategy, dataset)


def store_spec(real: RealData, config: ExpertConfig, seed: int, model_options: dict[str, Any] | None = None) -> StoreSpec:
    """The identity a store trained from ``real`` with ``config`` and ``seed`` has."""
    net = _new_model(real, config.model, model_options or {}, torch.Generator().manual_seed(0))
    aug = _dsa(config, real.name)
    return StoreSpec(
        dataset=real.name,
        image_shape=list(real.image_shape),
        num_classes=real.num_classes,
        num_train=int(real.train_images.shape[0]),
        model=config.model,
        model_options=dict(model_options or {}),
        preprocess=real.preprocess.to_json(),
        optimizer=config.optimizer_json(),
        augmentation="none" if aug.is_identity else aug.strategy,
        epochs=config.epochs,
        seed=int(seed),
        param_shapes={k: list(p.shape) for k, p in net.named_parameters()},
    )


def _new_model(real: RealData, name: str, options: dict[str, Any], generator: torch.Generator) -> nn.Module:
    with seeded_global(generator):
        return create_model(name, channels=real.channels, num_classes=real.num_classes,
                            image_size=real.image_size, **options)


class _BatchHook:
    """``train_model``'s augment hook: indices -> gathered, augmented images; registers GSAM's loss closure."""

    def __init__(self, images: Tensor, labels: Tensor, augment: Callable | None, forward: Callable[[Tensor], Tensor],
                 gsam: GSAM | None) -> None:
        self.images, self.labels, self.augment, self.forward, self.gsam = images, labels, augment, forward, gsam
        self.loss_fn = classification_loss(labels)

    def __call__(self, index: Tensor, generator: torch.Generator) -> Tensor:
        x = self.images[index]
        if self.augment is not None:
            x = self.augment(x, generator)
        if self.gsam is not None:
            y = self.labels[index]
            self.gsam.set_closure(lambda: self.loss_fn(self.forward(x), y))
        return x


def train_expert(real: RealData, config: ExpertConfig, index: int, seed: int, *,
                 device: str | torch.device = "cpu", model_options: dict[str, Any] | None = None,
                 on_epoch: Callable[[int, float | None], None] | None = None,
                 speed: SpeedLayer | None = None) -> tuple[list[dict[str, Tensor]], dict[str, Any]]:
    """Train expert ``index``; returns its ``epochs + 1`` parameter snapshots (CPU) and its info record.

    ``speed`` replaces the layer built from ``config.speed`` (benchmarks force or forbid the compile with it)."""
    config.check()
    device = torch.device(device)
    speed = SpeedLayer(config.speed, device) if speed is None else speed
    generator = make_generator(seed, "expert", index)
    model = speed.prepare(_new_model(real, config.model, model_options or {}, generator)).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "gsam":
        optimizer: torch.optim.Optimizer = GSAM(params, config.lr, momentum=config.momentum,
                                                weight_decay=config.weight_decay, rho=config.rho,
                                                alpha=config.alpha, adaptive=config.adaptive)
    else:
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    aug = _dsa(config, real.name)
    images = real.train_images.to(device)
    labels = real.train_labels.to(device)
    # one rule for compiling: the pixels the whole expert pushes through its training forward
    pixel_steps = config.epochs * images.shape[0] * images.shape[-1] * images.shape[-2]
    batch_shape = (min(config.batch_size, images.shape[0]), *images.shape[1:])
    forward = speed.train_forward(model, batch_shape, speed.compiles(pixel_steps, images.dtype))
    hook = _BatchHook(images, labels, None if aug.is_identity else aug, forward,
                      optimizer if isinstance(optimizer, GSAM) else None)
    rows = torch.arange(images.shape[0], device=device)
    test_x, test_y = real.test_images.to(device), real.test_labels.to(device)

    def snapshot() -> dict[str, Tensor]:
        return {k: p.detach().to("cpu", copy=True) for k, p in model.named_parameters()}

    trajectory = [snapshot()]
    accs: list[float] = []
    train_s: list[float] = []
    test_s: list[float] = []
    for epoch in range(config.epochs):
        t0 = time.perf_counter()
        train_model(model, rows, labels, epochs=1, lr=config.lr, generator=generator, momentum=config.momentum,
                    weight_decay=config.weight_decay, batch_size=config.batch_size, decay_at_half=False,
                    augment=hook, optimizer=optimizer, forward=forward)
        trajectory.append(snapshot())
        t1 = time.perf_counter()
        acc = None
        if config.test_every_epoch or epoch == config.epochs - 1:
            acc = accuracy(model, test_x, test_y)
            accs.append(acc)
        train_s.append(t1 - t0)
        test_s.append(time.perf_counter() - t1)
        if on_epoch is not None:
            on_epoch(epoch + 1, acc)
    info = {"seed": int(seed), "stream": ["expert", index], "test_accuracy": accs[-1],
            "test_accuracy_per_epoch": accs if config.test_every_epoch else None,
            "train_seconds_per_epoch": train_s, "test_seconds_per_epoch": test_s}
    return trajectory, info


def open_or_create(out: str | Path, real: RealData, config: ExpertConfig, seed: int, *, resume: bool = False,
                   model_options: dict[str, Any] | None = None) -> ExpertStore:
    """The store at ``out``: created when absent; an existing one must have been trained with the same settings."""
    config.check()
    spec = store_spec(real, config, seed, model_options)
    if not ExpertStore.exists(out):
        if resume:
            raise ConfigError(f"--resume: {out} holds no expert store yet; run without --resume to create it")
        return ExpertStore.create(out, spec, real.preprocess)
    store = ExpertStore.open(out)
    diffs = store.spec.differences(spec)
    why = preprocess_difference(store.preprocess(), real.preprocess)
    if why and not any(d.startswith("preprocess") for d in diffs):
        diffs.append(f"preprocess: {why}")
    if diffs:
        raise ConfigError(f"{out} holds an expert store trained with other settings, so these experts would not "
                          f"belong with it (store vs this command): {'; '.join(diffs)}; use another --out")
    return store


def train_experts(real: RealData, config: ExpertConfig, out: str | Path, num_experts: int, *, seed: int = 0,
                  device: str | torch.device = "cpu", resume: bool = False, model_options: dict[str, Any] | None = None,
                  log: Callable[[str], None] | None = None, speed: SpeedLayer | None = None) -> ExpertStore:
    """Make sure experts ``0..num_experts-1`` exist in the store at ``out`` (training the missing ones);
    ``speed`` as in :func:`train_expert`."""
    if num_experts < 1:
        raise ConfigError(f"--num-experts must be >= 1, got {num_experts}")
    # under torchrun (ddkit/distributed.py) rank 0 creates or checks the store, then the missing experts are dealt
    # over the ranks; each expert is seeded by its index and written as its own atomic shard, so the store is the
    # one a single process writes, and experts of a rank that crashed are simply missing for --resume
    store = distributed.run_on_main(
        lambda: open_or_create(out, real, config, seed, resume=resume, model_options=model_options))
    done = set(distributed.broadcast_object(store.experts()))
    for index in distributed.shard([i for i in range(num_experts) if i not in done]):
        start = time.perf_counter()

        def on_epoch(epoch: int, acc: float | None, index: int = index) -> None:
            if log is not None:
                shown = "" if acc is None else f", test accuracy {acc:.2f} %"
                log(f"expert {index}: epoch {epoch}/{config.epochs}{shown} ({time.perf_counter() - start:.1f} s)")

        trajectory, info = train_expert(real, config, index, seed, device=device, model_options=model_options,
                                        on_epoch=on_epoch, speed=speed)
        info["config"] = asdict(config)
        store.write_expert(index, trajectory, info)
    distributed.barrier()  # every rank's shards are on disk before anyone reads the store
    return store
