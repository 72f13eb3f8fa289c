"""Kernel ridge regression (KRR) from a support set to a target set: the one solve KIP and FRePo share.

Both methods (KIP: Nguyen et al., ICLR 2021, ``google-research/kip/KIP.ipynb``; FRePo: Zhou et al., NeurIPS 2022,
``yongchao97/FRePo/lib/datadistillation/frepo.py``; anchors §2.10-2.11) predict the target labels as

    pred = K_ts (K_ss + lambda I)^-1 Y_s,      lambda = reg * trace(K_ss) / n_s,   reg = 1e-6,

on centred one-hot labels, and the official code solves with ``sym_pos=True`` in float64 (KIP sets
``jax_enable_x64``).  Scaling the ridge by the mean diagonal makes ``reg`` independent of the kernel's scale, which
changes with depth and with the NTK/NNGP choice.

The solve here is a Cholesky factorisation in float64 whatever the kernels' dtype; the prediction is cast back.
A system that is not positive definite even after the ridge (duplicated support points with ``reg = 0``, a
degenerate or non-finite kernel) raises :class:`SingularKernelError` instead of returning NaN, so a
distillation step can never write NaN images.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError, DivergenceError

__all__ = ["SingularKernelError", "centered_one_hot", "krr_predict", "krr_loss", "krr_mse", "ridge"]


class SingularKernelError(DivergenceError):
    """The regularised support kernel ``K_ss + lambda I`` could not be factorised (not positive definite)."""


def centered_one_hot(labels: Tensor, num_classes: int) -> Tensor:
    """Regression targets centred per row: ``1 - 1/C`` for the true class and ``-1/C`` elsewhere.

    ``labels`` is either integer class indices ``[N]`` or soft labels ``[N, C]``; soft labels are centred the same
    way (each row minus its mean, which is ``1/C`` for a probability vector), so hard and soft labels live on the
    same zero-mean scale the KRR regression assumes (KIP colab and FRePo both centre the one-hot targets).
    """
    if labels.dim() == 1:
        if labels.is_floating_point():
            raise ConfigError(f"centered_one_hot: 1-D labels must be integer class indices, got {labels.dtype}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ConfigError(f"centered_one_hot: labels must lie in [0, {num_classes}), got range "
                              f"[{int(labels.min())}, {int(labels.max())}]")
        one_hot = torch.nn.functional.one_hot(labels.long(), num_classes).to(torch.get_default_dtype())
        return one_hot - 1.0 / num_classes
    if labels.dim() == 2:
        if labels.shape[1] != num_classes:
            raise ConfigError(f"centered_one_hot: soft labels must have {num_classes} columns, got "
                              f"{tuple(labels.shape)}")
        return labels - labels.mean(dim=1, keepdim=True)
    raise ConfigError(f"centered_one_hot: labels must be [N] indices or [N, C] soft labels, got "
                      f"{tuple(labels.shape)}")


def ridge(k_ss: Tensor, reg: float) -> Tensor:
    """The ridge ``lambda = reg * trace(K_ss) / n_s`` (differentiable in ``K_ss``, as in the official code)."""
    return reg * torch.diagonal(k_ss).sum() / k_ss.shape[0]


def krr_predict(k_ts: Tensor, k_ss: Tensor, y_s: Tensor, reg: float = 1e-6) -> Tensor:
    """``K_ts (K_ss + lambda I)^-1 Y_s`` with the solve in float64; the result has ``k_ts``'s dtype.

    Shapes: ``k_ts`` ``[n_t, n_s]``, ``k_ss`` ``[n_s, n_s]`` (symmetric), ``y_s`` ``[n_s, C]``.  Differentiable in
    all three (Cholesky and triangular solves have autograd rules), which KIP needs for the images and the
    optional learnable labels.  Raises :class:`SingularKernelError` when the regularised kernel is not positive
    definite, and :class:`ConfigError` for mismatched shapes or a negative ``reg``.
    """
    n_s = k_ss.shape[0] if k_ss.dim() == 2 else -1
    if k_ss.dim() != 2 or k_ss.shape[1] != n_s:
        raise ConfigError(f"krr_predict: k_ss must be square [n_s, n_s], got {tuple(k_ss.shape)}")
    if k_ts.dim() != 2 or k_ts.shape[1] != n_s:
        raise ConfigError(f"krr_predict: k_ts must be [n_t, {n_s}], got {tuple(k_ts.shape)}")
    if y_s.dim() != 2 or y_s.shape[0] != n_s:
        raise ConfigError(f"krr_predict: y_s must be [{n_s}, C], got {tuple(y_s.shape)}")
    if not reg >= 0:
        raise ConfigError(f"krr_predict: reg must be >= 0, got {reg}")
    out_dtype = k_ts.dtype
    k_ss64 = k_ss.to(torch.float64)
    k_ss64 = 0.5 * (k_ss64 + k_ss64.transpose(0, 1))  # exact symmetry; round-off in a batched kernel is not
    system = k_ss64 + ridge(k_ss64, reg) * torch.eye(n_s, dtype=torch.float64, device=k_ss.device)
    if not bool(torch.isfinite(system).all()):
        raise SingularKernelError(f"KRR solve: the support kernel K_ss ({n_s}x{n_s}) has non-finite entries; "
                                  f"the support images or the kernel diverged")
    chol, info = torch.linalg.cholesky_ex(system)
    if int(info) != 0:
        raise SingularKernelError(
            f"KRR solve: K_ss + lambda*I ({n_s}x{n_s}, reg={reg:g}) is not positive definite (Cholesky failed at "
            f"column {int(info)}); the support set has duplicated or degenerate points - raise reg")
    alpha = torch.cholesky_solve(y_s.to(torch.float64), chol)
    pred = k_ts.to(torch.float64) @ alpha
    return pred.to(out_dtype)


def krr_loss(k_ts: Tensor, k_ss: Tensor, y_s: Tensor, y_t: Tensor, reg: float = 1e-6) -> Tensor:
    """KIP's loss ``0.5 * mean((Y_t - pred)^2)`` over all target entries (KIP colab ``loss_fn``: ``0.5*MSE``).

    ``y_t`` is ``[n_t, C]`` (centred one-hot).  The mean is over ``n_t * C`` entries, which is what
    ``jnp.mean`` computes in the colab; this only rescales the gradient, which Adam ignores.
    """
    return krr_mse(krr_predict(k_ts, k_ss, y_s, reg), y_t)


def krr_mse(pred: Tensor, y_t: Tensor) -> Tensor:
    """``0.5 * mean((Y_t - pred)^2)``: :func:`krr_loss` for a caller that also needs the prediction (accuracy)."""
    if y_t.shape != pred.shape:
        raise ConfigError(f"krr_loss: y_t must be {tuple(pred.shape)}, got {tuple(y_t.shape)}")
    return 0.5 * (pred - y_t.to(pred.dtype)).pow(2).mean()
