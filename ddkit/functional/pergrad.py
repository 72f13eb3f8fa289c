"""Per-class gradients of the classification loss, batched over classes with ``torch.func``.

Gradient matching (DC/DSA) needs, for every class ``c``, ``g_c = d mean_i CE(f(x_i), c) / d theta`` over that
class's images only.  The official code runs one forward and one backward per class.  When the network treats
samples independently (instance/group/layer norm, no norm, or batch norm in eval mode with frozen statistics,
which is what DC does), stacking the classes as a leading axis ``[K, n, ...]`` and computing
``vmap(grad(loss))`` over it is *exactly* the per-class computation: ``vmap`` turns the K forwards into one
batched forward and each weight gradient into one grouped reduction per class.

Sample independence gives two more exact rewrites used here:

- *chunking*: the gradient of a mean over ``n`` images is the sum of the gradients of the per-chunk loss sums,
  divided by ``n``; processing a class in chunks bounds memory and, on CPU, keeps each chunk's activations in
  cache, which is where most of the time of the straightforward formulation goes;
- *padding*: classes of unequal sizes are padded to a common size with rows of weight 0, which contribute
  exactly nothing to the weighted loss ``sum_i w_i CE_i / sum_i w_i``.

Entry points, all returning a dict ``name -> [K, *param.shape]``:

- :func:`per_class_grads`: the batched formulation;
- :func:`per_class_grads_loop`: a loop over classes with ordinary autograd (chunked the same way), for
  networks whose samples interact (batch norm in train mode) and for the few layers whose second-order
  gradients ``vmap`` gets wrong (see :func:`batching_is_exact`);
- :func:`per_class_grads_forward`: the loop through a given forward function (a compiled module), first order;
- :func:`naive_per_class_grads`: the official formulation, verbatim, as the reference in tests.

Gradients are differentiable in the images (``torch.func.grad`` composes with ordinary autograd), so a loss
on the synthetic gradients backpropagates into the synthetic images; for the real images call them under
``torch.no_grad()`` and no graph is kept.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from ..accel.compiled import even_chunk

ParamDict = dict[str, Tensor]


def split_parameters(model: nn.Module, wrt: Callable[[str, Tensor], bool] | None = None) -> tuple[ParamDict, ParamDict]:
    """Detached ``(differentiated, constant)`` parameter dicts of ``model``; buffers go with the constants.

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


def samples_independent(model: nn.Module) -> bool:
    """Whether every sample's output is independent of the rest of its batch (no train-mode batch norm)."""
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())


def batching_is_exact(model: nn.Module, second_order: bool) -> bool:
    """Whether :func:`per_class_grads` computes exactly what the per-class loop computes for ``model``.

    Needs independent samples.  For second-order use (gradients that are differentiated again, the synthetic
    side of DC) it also excludes ``LayerNorm`` and ``InstanceNorm*``: under ``vmap`` their double backward gives
    wrong input gradients in PyTorch (the norm-backward batching rule, pytorch/functorch#534; reproduced on
    torch 2.13 and caught by ``tests/test_pergrad.py``).  ddkit's "instancenorm" is ``GroupNorm(C, C)``, which is
    exact.
    """
    if not samples_independent(model):
        return False
    if second_order:
        bad = (nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
        return not any(isinstance(m, bad) for m in model.modules())
    return True


def _sum_loss(model: nn.Module, const: ParamDict) -> Callable[[ParamDict, Tensor, Tensor, Tensor], Tensor]:
    """``sum_i w_i CE(f(x_i), y_i)`` with the network's parameters as an argument."""

    def loss(diff: ParamDict, x: Tensor, y: Tensor, w: Tensor) -> Tensor:
        logits = functional_call(model, {**diff, **const}, (x,))
        return (F.cross_entropy(logits, y, reduction="none") * w).sum()

    return loss


def _check(images: Tensor, labels: Tensor, weights: Tensor | None) -> Tensor:
    if images.dim() < 2 or labels.shape != images.shape[:2]:
        raise ValueError(f"images [K, n, ...] and labels [K, n] expected, got {tuple(images.shape)} and {tuple(labels.shape)}")
    if weights is None:
        return torch.ones(labels.shape, dtype=images.dtype, device=images.device)
    if weights.shape != labels.shape:
        raise ValueError(f"weights must be [K, n] like labels, got {tuple(weights.shape)}")
    return weights.to(images.dtype)


def _normalise(total: ParamDict, weights: Tensor) -> ParamDict:
    """Divide per-class gradient sums by the per-class weight sums (the mean of the official loss)."""
    denom = weights.sum(1).clamp_min(torch.finfo(weights.dtype).tiny)
    return {k: g / denom.view(-1, *([1] * (g.dim() - 1))) for k, g in total.items()}


def _accumulate(total: ParamDict | None, part: ParamDict) -> ParamDict:
    if total is None:
        return dict(part)
    return {k: total[k] + part[k] for k in total}


def per_class_grads(
    model: nn.Module,
    diff: ParamDict,
    const: ParamDict,
    images: Tensor,
    labels: Tensor,
    weights: Tensor | None = None,
    *,
    sample_chunk: int | None = None,
    class_chunk: int | None = None,
) -> ParamDict:
    """Per-class gradients of the (weighted) mean cross-entropy, batched over classes with ``vmap(grad)``.

    ``images`` is ``[K, n, C, H, W]``, ``labels`` and ``weights`` (default all 1; 0 marks padding) ``[K, n]``;
    ``diff`` are the parameters differentiated and ``const`` everything else the model reads (see
    :func:`split_parameters`).  ``sample_chunk`` processes that many images of every class per pass and
    ``class_chunk`` that many classes (``None``: all), trading speed for memory; the result does not depend on
    either beyond float rounding.
    """
    if not samples_independent(model):
        raise ValueError("batching classes needs batch-norm layers in eval mode (frozen statistics); "
                         "use per_class_grads_loop for train-mode batch norm")
    weights = _check(images, labels, weights)
    n = images.shape[1]
    step = n if not sample_chunk or sample_chunk >= n else int(sample_chunk)
    grad_fn = vmap(grad(_sum_loss(model, const)), in_dims=(None, 0, 0, 0), chunk_size=class_chunk)
    total: ParamDict | None = None
    for s in range(0, n, step):
        total = _accumulate(total, grad_fn(diff, images[:, s:s + step], labels[:, s:s + step], weights[:, s:s + step]))
    assert total is not None
    return _normalise(total, weights)


def per_class_grads_loop(
    model: nn.Module,
    diff: ParamDict,
    const: ParamDict,
    images: Tensor,
    labels: Tensor,
    weights: Tensor | None = None,
    *,
    sample_chunk: int | None = None,
    create_graph: bool = False,
) -> ParamDict:
    """The same gradients with one ordinary ``autograd.grad`` per class (and per chunk of ``sample_chunk``).

    With ``create_graph`` the gradients stay differentiable in the images (and in nothing else: the
    parameters are detached copies).  Samples may interact within a chunk (train-mode batch norm), in which
    case chunking changes the result, as it would in any implementation.
    """
    weights = _check(images, labels, weights)
    n = labels.shape[1]
    step = n if not sample_chunk or sample_chunk >= n else int(sample_chunk)
    wrt = {k: v.detach().requires_grad_(True) for k, v in diff.items()}
    names = list(wrt)
    loss_fn = _sum_loss(model, const)

    def chunk_grads(c: int, s: slice) -> tuple[Tensor, ...]:
        loss = loss_fn(wrt, images[c, s], labels[c, s], weights[c, s])
        return torch.autograd.grad(loss, [wrt[k] for k in names], create_graph=create_graph)

    return _class_loop(chunk_grads, names, weights, step)


def _class_loop(chunk_grads: Callable[[int, slice], Sequence[Tensor]], names: list[str], weights: Tensor,
                step: int) -> ParamDict:
    """Sum ``chunk_grads(class, rows)`` over each class's chunks of ``step`` rows; stack classes; normalise."""
    k_classes, n = weights.shape
    per_class: list[list[Tensor]] = []
    for c in range(k_classes):
        acc: list[Tensor] | None = None
        for start in range(0, n, step):
            with torch.enable_grad():
                part = chunk_grads(c, slice(start, start + step))
            acc = list(part) if acc is None else [a + p for a, p in zip(acc, part)]
        assert acc is not None
        per_class.append(acc)
    total = {k: torch.stack([g[i] for g in per_class]) for i, k in enumerate(names)}
    return _normalise(total, weights)


def per_class_grads_forward(
    forward: Callable[[Tensor], Tensor],
    params: dict[str, Tensor],
    images: Tensor,
    labels: Tensor,
    weights: Tensor | None = None,
    *,
    sample_chunk: int | None = None,
) -> ParamDict:
    """First-order per-class gradients through ``forward``, a function of the images alone that reads the
    module's own parameters (e.g. its compiled forward, :func:`ddkit.functional.compiled.forward_of`).

    ``params`` maps names to those parameter tensors (``requires_grad``); the result is what
    :func:`per_class_grads_loop` gives without ``create_graph``.  This is the path for a compiled network: the
    compiled graph takes the parameters as graph inputs, whereas ``functional_call`` with fresh tensors would
    not reuse it.  No graph is kept.
    """
    weights = _check(images, labels, weights)
    n = labels.shape[1]
    # equal chunks: one compiled graph shape
    step = n if not sample_chunk or sample_chunk >= n else even_chunk(n, int(sample_chunk))
    names = list(params)

    def chunk_grads(c: int, s: slice) -> tuple[Tensor, ...]:
        logits = forward(images[c, s])
        loss = (F.cross_entropy(logits, labels[c, s], reduction="none") * weights[c, s]).sum()
        return torch.autograd.grad(loss, [params[k] for k in names])

    return _class_loop(chunk_grads, names, weights, step)


def naive_per_class_grads(model: nn.Module, names: Sequence[str], images: Sequence[Tensor],
                          labels: Sequence[Tensor], create_graph: bool = False) -> ParamDict:
    """The official formulation (``main.py``): per class, ``net(x)``, mean cross-entropy, ``autograd.grad``.

    Uses the module's own parameters; ``images``/``labels`` are per-class batches of any sizes.  Kept as the
    reference that tests hold the batched formulation to.
    """
    params = dict(model.named_parameters())
    wrt = [params[k] for k in names]
    out: list[tuple[Tensor, ...]] = []
    for x, y in zip(images, labels):
        with torch.enable_grad():
            loss = F.cross_entropy(model(x), y)
            out.append(torch.autograd.grad(loss, wrt, create_graph=create_graph))
    return {k: torch.stack([g[i] for g in out]) for i, k in enumerate(names)}


def pad_classes(batches: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Stack per-class batches of possibly unequal sizes into ``[K, n_max, ...]`` plus ``[K, n_max]`` weights.

    Padding rows are zeros with weight 0, so they add exactly nothing to a weighted per-class loss.
    """
    if not batches:
        raise ValueError("no classes given")
    n_max = max(b.shape[0] for b in batches)
    first = batches[0]
    wdtype = first.dtype if first.is_floating_point() else torch.float32
    if all(b.shape[0] == n_max for b in batches):
        return torch.stack(list(batches)), torch.ones(len(batches), n_max, dtype=wdtype, device=first.device)
    out = first.new_zeros((len(batches), n_max, *first.shape[1:]))
    weights = torch.zeros(len(batches), n_max, dtype=wdtype, device=first.device)
    for c, b in enumerate(batches):
        out[c, : b.shape[0]] = b
        weights[c, : b.shape[0]] = 1
    return out, weights


def class_labels(num_classes: int, n: int, device: torch.device | str | None = None) -> Tensor:
    """``[K, n]`` labels, row ``k`` all equal to ``k``."""
    return torch.arange(num_classes, device=device).view(-1, 1).expand(num_classes, n)
