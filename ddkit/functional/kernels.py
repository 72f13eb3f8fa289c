"""Analytic infinite-width NNGP and NTK kernels of ReLU networks, in plain torch (the kernels KIP regresses with).

KIP (Nguyen et al., ICLR 2021; ``google-research/kip/KIP.ipynb``, anchors §2.11) takes its kernels from
``neural_tangents.stax``; that JAX library is unmaintained and would bring a second framework, so the two
architectures of the colab are written out here as the layer-by-layer recursions ``neural_tangents`` evaluates.
Both use the NTK parameterisation with the colab's ``W_std = sqrt(2)``, ``b_std = 0.1``: a layer computes
``W_std / sqrt(fan_in) * W a + b_std * b`` with ``W, b ~ N(0, 1)``.

``fc`` (colab ``FullyConnectedNetwork``): ``Flatten -> depth x [Dense(width), ReLU] -> Dense(classes)``.

``conv`` (colab ``FullyConvolutionalNetwork``): ``depth x [Conv(width, 3x3, stride 1, SAME zero padding), ReLU]
-> Flatten -> Dense(classes)``; no pooling, so every hidden layer keeps the input's ``H x W`` positions.

The recursion (``K`` NNGP, ``T`` NTK, for one pair of inputs ``x, x'``; ``pool`` is the identity for ``fc`` and
the 3x3 mean with zero padding for ``conv``; ``S0`` is ``x.x' / d`` for ``fc``, the channel mean of
``x_c(p) x'_c(p)`` at each position ``p`` for ``conv``)::

    K_1 = W^2 pool(S0) + b^2                             T_1 = K_1
    Sig_l  = E[relu(u) relu(v)]  = sqrt(K_l(x,x) K_l(x',x')) J1(c_l) / 2,   c_l = K_l(x,x') / sqrt(...)
    Sig'_l = E[relu'(u) relu'(v)] = J0(c_l) / 2          (arc-cosine kernels of degree 1 and 0, Cho & Saul)
    K_{l+1} = W^2 pool(Sig_l) + b^2                      T_{l+1} = K_{l+1} + W^2 pool(T_l * Sig'_l)
    readout:  K = W^2 mean_p Sig_L + b^2                 T = K + W^2 mean_p (T_L * Sig'_L)

with ``J1(c) = (sqrt(1 - c^2) + (pi - arccos c) c) / pi`` and ``J0(c) = (pi - arccos c) / pi``.  Because the
readout only averages same-position terms, and a position's covariance at the next layer only reads the
same-position covariances of its 3x3 neighbourhood, only the *diagonal* spatial covariances ``[H, W]`` per pair are
ever needed (not the full ``[H, W, H, W]`` ones): the cost is linear in the number of pixels per pair.

Memory: a block of ``rows x cols`` pairs holds a few ``[rows, cols, H, W]`` tensors per layer.  ``kernel_matrix``
computes the rows in blocks of ``batch`` and wraps each block in activation checkpointing when gradients flow, so
the backward pass recomputes one block at a time and memory is bounded by one block whatever the target batch.
A block that does not fit the memory there is raises a :class:`ConfigError` naming the batch option to lower.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError

__all__ = ["ARCHITECTURES", "GETS", "KernelSpec", "kernel_matrix", "block_bytes", "available_memory"]

ARCHITECTURES = ("fc", "conv")
GETS = ("ntk", "nngp")

#: live ``[rows, cols, H, W]`` tensors per hidden layer while a block's backward runs (counted from ``_pair_block``:
#: K, c, the two arc-cosine outputs, Sig, Sig', T, T*Sig', and their pooled forms), plus a few for the block's
#: input products and readout; used only to refuse blocks that cannot fit
TENSORS_PER_LAYER = 10
TENSORS_FIXED = 4


@dataclass(frozen=True)
class KernelSpec:
    """Which infinite-width kernel: architecture, depth (hidden layers), NTK or NNGP, and the colab's scales."""

    arch: str = "fc"
    depth: int = 1  # colab DEPTH = 1
    get: str = "ntk"  # colab: kernel_fn(..., get='ntk')
    w_std: float = math.sqrt(2.0)  # colab W_std = np.sqrt(2)
    b_std: float = 0.1  # colab b_std = 0.1
    filter_size: int = 3  # conv only: colab conv(width, (3, 3)), padding 'SAME'

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ConfigError(f"kernel architecture must be one of {', '.join(ARCHITECTURES)}, got {self.arch!r}")
        if self.get not in GETS:
            raise ConfigError(f"kernel must be one of {', '.join(GETS)}, got {self.get!r}")
        if self.depth < 1:
            raise ConfigError(f"kernel depth must be >= 1 hidden layer, got {self.depth}")
        if self.filter_size < 1 or self.filter_size % 2 == 0:
            raise ConfigError(f"kernel filter_size must be odd and >= 1 (SAME padding), got {self.filter_size}")

    def describe(self) -> str:
        if self.arch == "fc":
            net = f"FC-{self.depth} ReLU"
        else:
            f = self.filter_size
            net = f"Conv-{self.depth} ReLU ({f}x{f}, SAME padding, flatten readout)"
        return f"{self.get.upper()} of {net}, W_std={self.w_std:.4g}, b_std={self.b_std:.4g}"


# ------------------------------------------------------------------------------------------- arc-cosine moments
class _ArcCosReLU(torch.autograd.Function):
    """``(J1(c), J0(c))`` with exact values at ``c = +-1`` and finite gradients.

    Autograd through ``arccos`` gives ``inf * 0 = NaN`` at ``c = 1`` (every diagonal entry of ``K_ss``), although
    ``dJ1/dc = J0`` is finite everywhere; this function returns that derivative directly.  ``dJ0/dc =
    1 / (pi sqrt(1 - c^2))`` is unbounded at ``c = 1``; it is capped where ``1 - c^2`` is below ten machine
    epsilons, which only matters for pairs that are numerically the same input (where ``c`` cannot move).
    """

    @staticmethod
    def forward(ctx, c: Tensor) -> tuple[Tensor, Tensor]:
        cc = c.clamp(-1.0, 1.0)
        rest = math.pi - torch.arccos(cc)
        j0 = rest / math.pi
        j1 = (torch.sqrt((1.0 - cc * cc).clamp_min(0.0)) + rest * cc) / math.pi
        ctx.save_for_backward(cc, j0)
        return j1, j0

    @staticmethod
    def backward(ctx, g1: Tensor, g0: Tensor) -> Tensor:
        cc, j0 = ctx.saved_tensors
        grad = g1 * j0 if g1 is not None else torch.zeros_like(cc)
        if g0 is not None:
            eps = 10.0 * torch.finfo(cc.dtype).eps
            grad = grad + g0 / (math.pi * torch.sqrt((1.0 - cc * cc).clamp_min(eps)))
        return grad


def _relu_moments(k: Tensor, norm: Tensor) -> tuple[Tensor, Tensor]:
    """``E[relu(u)relu(v)]`` and ``E[relu'(u)relu'(v)]`` for a centred Gaussian pair of covariance
    ``k`` and variance product ``norm^2``."""
    j1, j0 = _ArcCosReLU.apply(k / norm)
    return 0.5 * norm * j1, 0.5 * j0


# ------------------------------------------------------------------------------------------------- the recursion
def _flat_positions(x: Tensor, spec: KernelSpec) -> Tensor:
    """Inputs as ``[n, C, P]``: ``fc`` sees one position with ``C*H*W`` features, ``conv`` ``H*W`` positions."""
    if spec.arch == "fc":
        return x.reshape(x.shape[0], -1, 1)
    return x.reshape(x.shape[0], x.shape[1], -1)


def _pool(t: Tensor, spec: KernelSpec, hw: tuple[int, int]) -> Tensor:
    """The mean over each position's filter window with zero padding (conv); the identity for fc.  ``t`` is
    ``[..., P]``."""
    if spec.arch == "fc":
        return t
    lead = t.shape[:-1]
    f = spec.filter_size
    pooled = F.avg_pool2d(t.reshape(-1, 1, *hw), f, stride=1, padding=f // 2, count_include_pad=True)
    return pooled.reshape(*lead, -1)


def _self_variances(x: Tensor, spec: KernelSpec, hw: tuple[int, int]) -> list[Tensor]:
    """``K_l(x, x)`` per image and position, ``[n, P]`` for each hidden layer ``l = 1..depth``.

    For a pair of identical inputs ``c = 1``: ``Sig = K / 2`` exactly, so the self variances need no
    arc-cosine (and their gradients are exact)."""
    w2, b2 = spec.w_std ** 2, spec.b_std ** 2
    k = w2 * _pool((x * x).mean(1), spec, hw) + b2
    out = [k]
    for _ in range(spec.depth - 1):
        k = w2 * _pool(0.5 * k, spec, hw) + b2
        out.append(k)
    return out


def _pair_block(spec: KernelSpec, hw: tuple[int, int], x1: Tensor, x2: Tensor, *diags: Tensor) -> Tensor:
    """The kernel between the rows ``x1 [b1, C, P]`` and columns ``x2 [b2, C, P]``: ``[b1, b2]``.

    ``diags`` are the self variances of ``x1`` (first ``depth`` tensors) then of ``x2``."""
    depth = spec.depth
    w2, b2 = spec.w_std ** 2, spec.b_std ** 2
    d1, d2 = diags[:depth], diags[depth:]
    s0 = torch.einsum("icp,jcp->ijp", x1, x2) / x1.shape[1]
    k = w2 * _pool(s0, spec, hw) + b2
    theta = k if spec.get == "ntk" else None
    for layer in range(depth):
        norm = torch.sqrt(d1[layer][:, None, :] * d2[layer][None, :, :])
        sig, sig_dot = _relu_moments(k, norm)
        last = layer == depth - 1
        if last:
            k = w2 * sig.mean(-1) + b2
            if theta is not None:
                theta = k + w2 * (theta * sig_dot).mean(-1)
        else:
            k = w2 * _pool(sig, spec, hw) + b2
            if theta is not None:
                theta = k + w2 * _pool(theta * sig_dot, spec, hw)
    return theta if theta is not None else k


# ------------------------------------------------------------------------------------------------- memory guard
def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` (CUDA: free memory; CPU: ``MemAvailable``), else None."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def block_bytes(spec: KernelSpec, rows: int, cols: int, positions: int, dtype: torch.dtype) -> int:
    """Peak bytes of one ``rows x cols`` block of the recursion (forward and its backward)."""
    per_pair = positions * torch.finfo(dtype).bits // 8
    return rows * cols * per_pair * (TENSORS_FIXED + TENSORS_PER_LAYER * spec.depth)


def _size(n: int) -> str:
    return f"{n / 1024 ** 3:.2f} GiB" if n >= 1024 ** 3 else f"{n / 1024 ** 2:.1f} MiB"


def _check_block(spec: KernelSpec, rows: int, cols: int, positions: int, dtype: torch.dtype, limit: int | None,
                 batch_name: str, setting: int) -> None:
    """Refuse a block of ``rows x cols`` pairs that needs more than ``limit`` bytes (``setting``: the batch the
    caller asked for, 0 = automatic)."""
    if limit is None:
        return
    need = block_bytes(spec, rows, cols, positions, dtype)
    if need > limit:
        fit = limit // max(block_bytes(spec, 1, cols, positions, dtype), 1)
        if fit < 1:
            hint = "even one row does not fit: use fewer support images, a smaller image or a shallower kernel"
        else:
            hint = f"lower {batch_name} (now {setting or 'automatic'}) to at most {fit}"
        raise ConfigError(
            f"{spec.arch} {spec.get} kernel: a block of {rows} x {cols} pairs x {positions} positions x depth "
            f"{spec.depth} needs about {_size(need)}, more than the {_size(limit)} available; {hint}")


# ------------------------------------------------------------------------------------------------ public entry
def kernel_matrix(spec: KernelSpec, x1: Tensor, x2: Tensor, *, batch: int = 0, memory_limit: int | None = None,
                  batch_name: str = "method.kernel_batch", block_memory: int = 256 * 1024 ** 2,
                  checkpoint_blocks: bool = True) -> Tensor:
    """The ``[n1, n2]`` kernel between images ``x1 [n1, C, H, W]`` and ``x2 [n2, C, H, W]`` (differentiable).

    ``batch`` rows of ``x1`` are computed per block against all of ``x2``; ``0`` picks the largest number of rows
    whose block stays under ``block_memory`` bytes.  An explicit ``batch`` whose block needs more than
    ``memory_limit`` bytes (default: what the device has available) raises :class:`ConfigError` naming
    ``batch_name``.  With ``checkpoint_blocks`` each block's intermediates are recomputed in the backward pass
    rather than kept, which bounds memory by one block.
    """
    if x1.dim() != 4 or x2.dim() != 4 or x1.shape[1:] != x2.shape[1:]:
        raise ConfigError(f"kernel_matrix: expected two image batches [n, C, H, W] of one shape, got "
                          f"{tuple(x1.shape)} and {tuple(x2.shape)}")
    if batch < 0:
        raise ConfigError(f"{batch_name} must be >= 0 (0 = automatic), got {batch}")
    hw = (int(x1.shape[2]), int(x1.shape[3])) if spec.arch == "conv" else (1, 1)
    f1, f2 = _flat_positions(x1, spec), _flat_positions(x2, spec)
    positions, n1, n2 = f1.shape[-1], f1.shape[0], f2.shape[0]
    if memory_limit is None:
        memory_limit = available_memory(x1.device)
    setting = batch
    if batch == 0:
        per_row = max(block_bytes(spec, 1, n2, positions, f1.dtype), 1)
        batch = max(1, block_memory // per_row)
        if memory_limit is not None:
            batch = max(1, min(batch, memory_limit // per_row))  # automatic blocks fit what there is
    rows = min(batch, max(n1, 1))
    _check_block(spec, rows, n2, positions, f1.dtype, memory_limit, batch_name, setting)
    d1 = _self_variances(f1, spec, hw)
    d2 = d1 if x2 is x1 else _self_variances(f2, spec, hw)
    grads = torch.is_grad_enabled() and (x1.requires_grad or x2.requires_grad)
    # with one block there is nothing to bound: its intermediates are alive at the backward pass either way
    recompute = grads and checkpoint_blocks and rows < n1
    blocks = []
    for start in range(0, n1, rows):
        stop = min(start + rows, n1)
        args = (f1[start:stop], f2, *(d[start:stop] for d in d1), *d2)
        if recompute:
            blocks.append(checkpoint(_pair_block, spec, hw, *args, use_reentrant=False))
        else:
            blocks.append(_pair_block(spec, hw, *args))
    if not blocks:
        return f1.new_zeros((0, n2))
    return torch.cat(blocks)
