"""Per-class gradients of the classification loss, batched over classes with ``torch.func``.

Gradient matching (DC/DSA) needs, for every class ``c``, ``g_c = d mean_i CE(f(x_i), c) / d theta`` over that
class's images only.  The official code runs one forward and one backward per class (per outer step 2K small
passes).  When the network treats samples independently (instance/group/layer norm, no norm, or batch norm in
eval mode with frozen statistics, which is what DC does), stacking the classes as a leading axis ``[K, n, ...]``
and computing ``vmap(grad(loss))`` over it is *exactly* the per-class computation: ``vmap`` turns the K forwards
into one batched forward and each weight gradient into one grouped reduction per class.

Two entry points with the same output (a dict ``name -> [K, *param.shape]``):

- :func:`per_class_grads`: the batched formulation (optionally over chunks of classes to bound memory);
- :func:`per_class_grads_loop`: the straightforward per-class loop, the reference the batched one is tested
  against, and a fallback for networks whose samples interact (batch norm in train mode).

Gradients are differentiable in the images (``torch.func.grad`` composes with ordinary autograd), so a loss
on the synthetic gradients backpropagates into the synthetic images; for the real images call them under
``torch.no_grad()`` and no graph is kept.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

ParamDict = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


def split_parameters(model: nn.Module, wrt: Callable[[str, Tensor], bool] | None = None) -> tuple[ParamDict, ParamDict]:
    """Detached ``(differentiated, constant)`` parameter dicts of ``model``, plus its buffers in the constants.

    ``wrt(name, param)`` selects the parameters to differentiate (default: all).  Leaving out parameters that the
    distance ignores (1-D ones for DC's ``ours``) saves their gradients and their part of the graph.
    """
    diff: ParamDict = {}
    const: ParamDict = {}
    for name, p in model.named_parameters():
        (diff if wrt is None or wrt(name, p) else const)[name] = p.detach()
    for name, b in model.named_buffers():
        const[name] = b
    return diff, const


def check_independent(model: nn.Module) -> None:
    """Raise if a sample's output depends on the rest of its batch (batch norm in train mode).

    Batching classes is exact only when samples are independent; DC freezes batch-norm statistics and puts the
    layers in eval mode before matching, which makes this hold.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ValueError(
                "per-class gradients batched over classes need batch-norm layers in eval mode (frozen statistics); "
                "use per_class_grads_loop for train-mode batch norm"
            )


def _class_loss(model: nn.Module, const: ParamDict, loss_fn: LossFn) -> Callable[[ParamDict, Tensor, Tensor], Tensor]:
    def loss(diff: ParamDict, x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(functional_call(model, {**diff, **const}, (x,)), y)

    return loss


def per_class_grads(
    model: nn.Module,
    diff: ParamDict,
    const: ParamDict,
    images: Tensor,
    labels: Tensor,
    *,
    chunk_size: int | None = None,
    loss_fn: LossFn = F.cross_entropy,
) -> ParamDict:
    """``{name: [K, *shape]}``: the gradient of ``loss_fn(model(images[k]), labels[k])`` for every class ``k``.

    ``images`` is ``[K, n, C, H, W]`` and ``labels`` ``[K, n]``; ``diff`` are the parameters differentiated,
    ``const`` everything else the model reads (from :func:`split_parameters`).  ``chunk_size`` processes that
    many classes per batched pass (``None``: all at once), trading speed for peak memory.
    """
    check_independent(model)
    if images.dim() < 2 or labels.shape[:2] != images.shape[:2]:
        raise ValueError(f"images [K, n, ...] and labels [K, n] expected, got {tuple(images.shape)} and {tuple(labels.shape)}")
    grad_fn = vmap(grad(_class_loss(model, const, loss_fn)), in_dims=(None, 0, 0), chunk_size=chunk_size)
    return grad_fn(diff, images, labels)


def per_class_grads_loop(
    model: nn.Module,
    diff: ParamDict,
    const: ParamDict,
    images: Iterable[Tensor],
    labels: Iterable[Tensor],
    *,
    create_graph: bool = False,
    loss_fn: LossFn = F.cross_entropy,
) -> ParamDict:
    """The straightforward formulation: one forward and one ``autograd.grad`` per class, stacked to ``[K, ...]``.

    ``images``/``labels`` iterate over classes (a ``[K, n, ...]`` tensor or a list of per-class batches of any
    sizes).  With ``create_graph`` the gradients stay differentiable in the images (and in nothing else).
    """
    wrt = {k: v.detach().requires_grad_(True) for k, v in diff.items()}
    names = list(wrt)
    per_class: list[tuple[Tensor, ...]] = []
    for x, y in zip(images, labels):
        with torch.enable_grad():
            loss = loss_fn(functional_call(model, {**wrt, **const}, (x,)), y)
            per_class.append(torch.autograd.grad(loss, [wrt[k] for k in names], create_graph=create_graph))
    if not per_class:
        raise ValueError("no classes given")
    return {k: torch.stack([g[i] for g in per_class]) for i, k in enumerate(names)}


def stack_classes(batches: list[Tensor]) -> Tensor:
    """Stack equally sized per-class batches ``[n, ...]`` into ``[K, n, ...]`` (raises on unequal sizes)."""
    sizes = {b.shape[0] for b in batches}
    if len(sizes) != 1:
        raise ValueError(f"per-class batches must have equal sizes to be batched, got sizes {sorted(sizes)}")
    return torch.stack(batches)


def class_labels(num_classes: int, n: int, device: torch.device | str | None = None) -> Tensor:
    """``[K, n]`` labels, row ``k`` all equal to ``k``."""
    return torch.arange(num_classes, device=device).view(-1, 1).expand(num_classes, n)
