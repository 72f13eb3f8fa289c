"""The official formulations, re-stated once, that ddkit's exact rewrites are tested against (float64).

These are *re-statements* of the official loops (``VICO-UoE/DatasetCondensation`` ``main.py``, ``main_DM.py``,
``utils.py``), written to compute the same numbers, for parity tests only.  Speed ratios never come from them: the
benchmarks time the official code itself (``../shared/refbench``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ddkit.methods.common import sample_class_params, sample_per_class
from ddkit.methods.dm import frozen_embedder


def official_distance_wb(gwr: torch.Tensor, gws: torch.Tensor) -> torch.Tensor:
    """``utils.py::distance_wb`` written out as in the official code (one class)."""
    shape = gwr.shape
    if len(shape) == 4:
        gwr = gwr.reshape(shape[0], shape[1] * shape[2] * shape[3])
        gws = gws.reshape(shape[0], shape[1] * shape[2] * shape[3])
    elif len(shape) == 3:
        gwr = gwr.reshape(shape[0], shape[1] * shape[2])
        gws = gws.reshape(shape[0], shape[1] * shape[2])
    elif len(shape) == 1:
        return torch.tensor(0, dtype=gwr.dtype)
    return torch.sum(1 - torch.sum(gwr * gws, dim=-1) / (torch.norm(gwr, dim=-1) * torch.norm(gws, dim=-1) + 0.000001))


def official_match_loss(gw_syn: list[torch.Tensor], gw_real: list[torch.Tensor], metric: str) -> torch.Tensor:
    """``utils.py::match_loss`` (one class)."""
    if metric == "ours":
        return sum(official_distance_wb(r, s) for r, s in zip(gw_real, gw_syn))
    real = torch.cat([g.reshape(-1) for g in gw_real])
    syn = torch.cat([g.reshape(-1) for g in gw_syn])
    if metric == "mse":
        return torch.sum((syn - real) ** 2)
    return 1 - torch.sum(real * syn, dim=-1) / (torch.norm(real, dim=-1) * torch.norm(syn, dim=-1) + 0.000001)


def official_class_loop(net, real: list[torch.Tensor], syn: list[torch.Tensor], metric: str) -> torch.Tensor:
    """main.py's matching loop: per class, grads of real (detached) and synthetic (with graph), summed loss."""
    params = list(net.parameters())
    loss = torch.zeros((), dtype=torch.float64)
    for c, (xr, xs) in enumerate(zip(real, syn)):
        lab_r = torch.full((xr.shape[0],), c, dtype=torch.long)
        gw_real = [g.detach().clone() for g in torch.autograd.grad(F.cross_entropy(net(xr), lab_r), params)]
        lab_s = torch.full((xs.shape[0],), c, dtype=torch.long)
        gw_syn = torch.autograd.grad(F.cross_entropy(net(xs), lab_s), params, create_graph=True)
        loss = loss + official_match_loss(list(gw_syn), gw_real, metric)
    return loss


def official_dc_matching_loss(d, net, real, syn, generator, metric: str) -> torch.Tensor:
    """``main.py``'s per-class loop (with ``DiffAugment`` per class for DSA), fed with the distiller's draws."""
    cfg = d.config
    batch = sample_per_class(real, cfg.batch_real, generator, d.device)
    params = sample_class_params(d.aug, real.num_classes, generator, d.device)
    weights = list(net.parameters())
    loss = torch.zeros((), dtype=syn.images.dtype)
    for c in range(real.num_classes):
        img_real = batch.images[batch.row_class == c].to(syn.images.dtype)
        img_syn = syn.images[syn.class_slice(c)]
        if params[c]:
            img_real = d.aug.apply(img_real, params[c])
            img_syn = d.aug.apply(img_syn, params[c])
        lab_real = torch.full((img_real.shape[0],), c, dtype=torch.long)
        gw_real = [g.detach().clone() for g in torch.autograd.grad(F.cross_entropy(net(img_real), lab_real), weights)]
        lab_syn = torch.full((img_syn.shape[0],), c, dtype=torch.long)
        gw_syn = torch.autograd.grad(F.cross_entropy(net(img_syn), lab_syn), weights, create_graph=True)
        loss = loss + official_match_loss(list(gw_syn), gw_real, metric)
    return loss


def official_dm_loss(distiller, real, syn, generator: torch.Generator) -> torch.Tensor:
    """``main_DM.py``'s ConvNet branch, class by class, fed with the same draws as the distiller."""
    cfg = distiller.config
    net = frozen_embedder(distiller, real, generator, syn.images.dtype)
    batch = sample_per_class(real, cfg.batch_real, generator, distiller.device)
    params = sample_class_params(distiller.aug, real.num_classes, generator, distiller.device)
    loss = torch.zeros((), dtype=syn.images.dtype)
    for c in range(real.num_classes):
        img_real = batch.images[batch.row_class == c].to(syn.images.dtype)
        img_syn = syn.images[syn.class_slice(c)]
        if params[c]:
            img_real = distiller.aug.apply(img_real, params[c])
            img_syn = distiller.aug.apply(img_syn, params[c])
        output_real = net.features(img_real).detach()
        output_syn = net.features(img_syn)
        loss = loss + ((output_real.mean(0) - output_syn.mean(0)) ** 2).sum()
    return loss
