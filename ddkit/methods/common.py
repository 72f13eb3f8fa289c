"""Pieces every method shares: per-class real batches, siamese augmentation per class, class means, label blocks.

They live here, not in one method's file, so that a method file reads as its paper's algorithm and methods do
not import each other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..augment import DEFAULT_STRATEGY, DSA
from ..data.realdata import RealData
from ..functional.pergrad import pad_classes

Params = dict[str, Tensor]


@dataclass
class ClassBatch:
    """Real images drawn per class, class-major: ``labels`` on the images' device, ``row_class`` on CPU."""

    images: Tensor
    labels: Tensor
    row_class: Tensor
    counts: Tensor  # [K] images per class (CPU)


def class_rows(labels: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(labels on device, class of each row on CPU)`` for hard (or soft, by argmax) labels: the device copy
    indexes features, the CPU copy groups rows without synchronising with an accelerator."""
    hard = (labels.argmax(1) if labels.is_floating_point() and labels.dim() == 2 else labels).long()
    return hard.to(device), hard.cpu()


def sample_per_class(real: RealData, n: int, generator: torch.Generator, device: torch.device) -> ClassBatch:
    """``n`` random training images of every class (all of them when a class is smaller), in one gather.

    Draws the same random numbers as ``RealData.sample_class`` called class by class, but copies the pixels
    once instead of ten times.
    """
    picks = []
    for ix in real.class_indices():
        perm = torch.randperm(ix.numel(), generator=generator)
        picks.append(ix[perm[:n]] if n < ix.numel() else ix[perm])
    counts = torch.tensor([p.numel() for p in picks])
    index = torch.cat(picks)
    images = real.train_images[index.to(real.train_images.device)].to(device, non_blocking=True)
    row_class = torch.repeat_interleave(torch.arange(len(picks)), counts)
    return ClassBatch(images, row_class.to(device), row_class, counts)


def dataset_dsa_strategy(name: str) -> str:
    """The dataset spec's DSA strategy; the official default for datasets without a spec (e.g. a renamed set)."""
    from ..data import get_dataset_spec

    try:
        return get_dataset_spec(name).dsa_strategy
    except Exception:  # unknown dataset name: an image folder or tensors built in code
        return DEFAULT_STRATEGY


def resolve_dsa(strategy: str | None, dataset: str) -> DSA:
    """``None`` means the dataset's strategy; ``"none"``/``""`` the identity."""
    return DSA.from_strategy(dataset_dsa_strategy(dataset) if strategy is None else strategy)


def sample_class_params(aug: DSA, num_classes: int, generator: torch.Generator,
                        device: torch.device) -> list[Params]:
    """One siamese DSA parameter set per class (leading dim 1), drawn in class order from ``generator``."""
    if aug.is_identity:
        return [{} for _ in range(num_classes)]
    return [aug.sample(1, generator, device=device) for _ in range(num_classes)]


def augment_by_class(aug: DSA, x: Tensor, row_class: Tensor, class_params: list[Params]) -> Tensor:
    """Augment row ``i`` of ``x`` with ``class_params[row_class[i]]``, one ``apply`` per op family present.

    DSA mode 'S' picks one op family per parameter set, so classes differ in which op runs; rows of classes
    that share a family are augmented together with per-row values, which equals applying each class's
    shared parameters to its own block (DSA ops are per-image given per-image parameters).
    ``row_class`` is a CPU tensor so grouping never synchronises with an accelerator.
    """
    if aug.is_identity or x.shape[0] == 0:
        return x
    groups: dict[int, list[int]] = {}
    for c in row_class.unique().tolist():
        family = class_params[c].get("family")
        groups.setdefault(-1 if family is None else int(family), []).append(c)
    pieces, orders = [], []
    for classes in groups.values():
        if len(groups) == 1:
            rows = None  # every row is in this group: no gather, no scatter
            local = row_class
        else:
            rows = torch.nonzero(torch.isin(row_class, torch.tensor(classes))).flatten()
            local = row_class[rows]
        pieces.append(aug.apply(x if rows is None else x[rows.to(x.device)], _stack_rows(class_params, classes, local)))
        orders.append(rows)
    if len(pieces) == 1:
        return pieces[0]
    order = torch.cat(orders)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return torch.cat(pieces)[inverse.to(x.device)]


def _stack_rows(class_params: list[Params], classes: list[int], local_class: Tensor) -> Params:
    """Per-row parameters for rows whose classes (``local_class``, CPU) all drew the same op family."""
    first = class_params[classes[0]]
    if len(classes) == 1:
        return first  # leading dim 1 broadcasts over the rows
    slot = torch.full((max(classes) + 1,), -1, dtype=torch.long)
    slot[torch.tensor(classes)] = torch.arange(len(classes))
    pick = slot[local_class]
    out: Params = {}
    for key, value in first.items():
        if key == "family":
            out[key] = value
        else:
            stacked = torch.cat([class_params[c][key] for c in classes])
            out[key] = stacked[pick.to(stacked.device)]
    return out


def class_means(feats: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Mean feature of each class (``[K, ...]``); differentiable, classes without rows give zeros."""
    sums = feats.new_zeros((num_classes, *feats.shape[1:])).index_add(0, labels, feats)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).to(feats.dtype)
    return sums / counts.view(-1, *([1] * (feats.dim() - 1)))


def blocks(images: Tensor, row_class: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Class-major rows ``[N, ...]`` with class ids ``row_class`` (CPU) as ``[K, n, ...]`` blocks and weights.

    A plain ``view`` when the rows are sorted by class in equal counts (the usual case); otherwise a gather
    and zero padding with weight 0.  Differentiable in ``images`` either way.
    """
    counts = torch.bincount(row_class, minlength=num_classes)
    n = int(counts[0])
    sorted_equal = bool((counts == n).all()) and bool((row_class[1:] >= row_class[:-1]).all())
    if sorted_equal and n > 0:
        w = torch.ones(num_classes, n, dtype=images.dtype, device=images.device)
        return images.view(num_classes, n, *images.shape[1:]), w
    pieces = [images[torch.nonzero(row_class == c).flatten().to(images.device)] for c in range(num_classes)]
    return pad_classes(pieces)


@torch.no_grad()
def class_mean_accuracy(forward: Callable[[Tensor], Tensor], batch: ClassBatch, num_classes: int, chunk: int,
                        dtype: torch.dtype) -> float:
    """Mean over classes of the accuracy of ``forward`` (logits) on ``batch``, in chunks of ``chunk`` rows."""
    correct = torch.zeros(num_classes, device=batch.labels.device)
    for start in range(0, batch.images.shape[0], chunk):
        labels = batch.labels[start:start + chunk]
        pred = forward(batch.images[start:start + chunk].to(dtype)).argmax(1)
        correct.index_add_(0, labels, (pred == labels).to(correct.dtype))
    counts = batch.counts.clamp_min(1).to(correct.device, correct.dtype)
    return float((correct / counts).mean())
