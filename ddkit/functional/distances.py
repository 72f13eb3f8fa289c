"""Gradient-matching distances of DC/DSA (Zhao et al., ICLR 2021; Zhao & Bilen, ICML 2021).

Semantics follow ``match_loss``/``distance_wb`` of ``VICO-UoE/DatasetCondensation/utils.py`` (anchors §2.1):

- ``ours`` (the paper's layer-wise distance): every parameter gradient with two or more dimensions is viewed as
  ``[out, rest]`` (conv ``[out, in*h*w]``, layer-norm ``[C, h*w]``, linear as is) and contributes
  ``sum over rows of (1 - cos(g_real_row, g_syn_row))``, the cosine with ``1e-6`` added to the product of norms;
  1-D gradients (biases, norm scales/shifts) contribute 0.
- ``mse``: squared Euclidean distance between the concatenated gradients (all parameters).
- ``cos``: ``1 - cos`` between the concatenated gradients (all parameters, same ``1e-6``).

Every function here takes gradients with a leading *class* axis ``[K, ...]`` (``K`` per-class gradients at once,
as :mod:`ddkit.functional.pergrad` returns them) and returns the sum over classes, which is what the official
code accumulates (``loss += match_loss(...)`` per class).  One class is simply ``K = 1``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError

DISTANCES = ("ours", "mse", "cos")
EPS = 1e-6  # official: ``+ 0.000001`` on the product of norms


def check_distance(name: str) -> str:
    """Validate a distance name (raises :class:`ConfigError` listing the choices)."""
    if name not in DISTANCES:
        raise ConfigError(f"unknown gradient distance {name!r}; expected one of {', '.join(DISTANCES)}")
    return name


def contributes(shape: Sequence[int], metric: str) -> bool:
    """Whether a parameter of this (per-class) ``shape`` enters ``metric`` at all.

    ``ours`` ignores 1-D parameters, so their gradients need not be computed (nor kept in a graph).
    """
    return metric != "ours" or len(shape) >= 2


def layer_distance(g_real: Tensor, g_syn: Tensor) -> Tensor:
    """``ours`` for one parameter, summed over classes: ``g_*`` are ``[K, out, ...]``.

    The rows are the output units: everything after the first parameter dimension is flattened (official
    ``distance_wb``: conv ``(out, in*h*w)``, 3-D ``(out, h*w)``, 2-D as is).
    """
    if g_real.dim() <= 2:  # [K, n]: a 1-D parameter -> 0, as in the official code
        return g_syn.new_zeros(())
    k, out = g_real.shape[:2]
    gr = g_real.reshape(k, out, -1)
    gs = g_syn.reshape(k, out, -1)
    cos = (gr * gs).sum(-1) / (gr.norm(dim=-1) * gs.norm(dim=-1) + EPS)
    return (1.0 - cos).sum()


def _flat(grads: Sequence[Tensor]) -> Tensor:
    """Concatenate per-class gradients ``[K, ...]`` into ``[K, P]``."""
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1)


def match_distance(g_real: Mapping[str, Tensor] | Sequence[Tensor], g_syn: Mapping[str, Tensor] | Sequence[Tensor],
                   metric: str = "ours") -> Tensor:
    """Distance between real and synthetic per-class gradients, summed over the class axis.

    ``g_real``/``g_syn`` are parallel dicts (same keys) or sequences of ``[K, ...]`` tensors.  Real gradients are
    constants (they are detached in the official code); gradients flow into ``g_syn``.
    """
    check_distance(metric)
    if isinstance(g_real, Mapping):
        keys = list(g_real.keys())
        if not isinstance(g_syn, Mapping) or set(keys) != set(g_syn.keys()):
            raise ValueError("real and synthetic gradients must have the same parameter names")
        real_list = [g_real[k] for k in keys]
        syn_list = [g_syn[k] for k in keys]  # type: ignore[index]
    else:
        real_list, syn_list = list(g_real), list(g_syn)
        if len(real_list) != len(syn_list):
            raise ValueError(f"{len(real_list)} real vs {len(syn_list)} synthetic gradients")
    if not real_list:
        raise ValueError("no gradients to match")
    for gr, gs in zip(real_list, syn_list):
        if gr.shape != gs.shape:
            raise ValueError(f"gradient shapes differ: real {tuple(gr.shape)} vs synthetic {tuple(gs.shape)}")
    if metric == "ours":
        total = syn_list[0].new_zeros(())
        for gr, gs in zip(real_list, syn_list):
            total = total + layer_distance(gr, gs)
        return total
    real_vec, syn_vec = _flat(real_list), _flat(syn_list)
    if metric == "mse":
        return ((syn_vec - real_vec) ** 2).sum()
    cos = (real_vec * syn_vec).sum(-1) / (real_vec.norm(dim=-1) * syn_vec.norm(dim=-1) + EPS)
    return (1.0 - cos).sum()
