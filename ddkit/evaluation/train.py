"""The one supervised training loop.

Evaluation, expert training and the inner network updates of bi-level methods all train networks with
:func:`train_model`, so a fix or a speed-up here applies everywhere.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def soft_label_loss(kind: str) -> Callable[[Tensor, Tensor], Tensor]:
    """Loss for soft targets ``[N,K]``: soft cross-entropy (default), KL, MSE on the targets, or ``half_sse``: half
    the squared error summed over classes and averaged over images, for regression targets (FRePo's and KIP's
    centred one-hot labels; FRePo ``mean_squared_loss``)."""
    if kind in ("soft_ce", "sce"):
        return lambda logits, target: -(target * F.log_softmax(logits, 1)).sum(1).mean()
    if kind == "kl":
        return lambda logits, target: F.kl_div(F.log_softmax(logits, 1), target.clamp_min(1e-12), reduction="batchmean")
    if kind == "mse":
        return lambda logits, target: F.mse_loss(logits, target)
    if kind == "half_sse":
        return lambda logits, target: 0.5 * (logits - target).pow(2).sum(1).mean()
    from ..errors import ConfigError

    raise ConfigError(f"unknown soft-label loss {kind!r}; expected one of soft_ce, kl, mse, half_sse")


def classification_loss(labels: Tensor, soft_kind: str = "soft_ce") -> Callable[[Tensor, Tensor], Tensor]:
    return soft_label_loss(soft_kind) if labels.is_floating_point() else F.cross_entropy


def train_model(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    epochs: int,
    lr: float,
    generator: torch.Generator,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 256,
    decay_at_half: bool = True,
    augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
    soft_loss: str = "soft_ce",
    optimizer: torch.optim.Optimizer | None = None,
    forward: Callable[[Tensor], Tensor] | None = None,
    lr_at: Callable[[int], float] | None = None,
    max_steps: int | None = None,
) -> nn.Module:
    """Train ``model`` in place with SGD on ``(images, labels)`` for ``epochs`` epochs.

    Defaults are the field's protocol (DC/DSA/DM/MTT ``evaluate_synset``): SGD momentum 0.9, weight decay 5e-4,
    batch 256, lr x0.1 once at half of the epochs, augmentation on every batch.  ``forward`` computes the logits
    in place of ``model`` (e.g. its compiled forward, :func:`ddkit.functional.compiled.forward_of`).
    Step-based recipes (FRePo's evaluation: warm-up then cosine, a fixed number of optimiser steps) pass
    ``lr_at(step)``, the learning rate of the 0-based optimiser step (it replaces the decay at half), and
    ``max_steps``, after which training stops.
    """
    forward = model if forward is None else forward
    images = images.detach()
    labels = labels.detach()
    loss_fn = classification_loss(labels, soft_loss)
    if optimizer is None:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    model.train()
    n = images.shape[0]
    half = epochs // 2
    step = 0
    for epoch in range(epochs):
        if lr_at is None and decay_at_half and epoch == half and epochs > 1:
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.1
        order = torch.randperm(n, generator=generator).to(images.device) if n > batch_size else None
        for start in range(0, n, batch_size):
            if max_steps is not None and step >= max_steps:
                return model
            if lr_at is not None:
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step)
            step += 1
            if order is None:
                xb, yb = images, labels
            else:
                ix = order[start : start + batch_size]
                xb, yb = images[ix], labels[ix]
            if augment is not None:
                xb = augment(xb, generator)
            loss = loss_fn(forward(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent, in eval mode.  Batches of 256 keep peak memory low: one ConvNet-3 activation
    of 2048 28x28 images is already 1 GiB."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        logits = model(images[start : start + batch_size])
        correct += int((logits.argmax(1) == labels[start : start + batch_size]).sum())
    model.train(was_training)
    return 100.0 * correct / max(1, images.shape[0])
