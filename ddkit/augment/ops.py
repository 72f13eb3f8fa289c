"""Differentiable image ops behind DSA, one function per op, all batched.

Every op is a pure function of an image batch ``x`` of shape ``[N, C, H, W]`` and explicit parameters; nothing
here draws random numbers (sampling lives in :mod:`ddkit.augment.dsa`).  Parameters have a leading dimension of
either ``N`` (one value per image) or ``1`` (one value shared by the whole batch: the siamese case, where a real and
a synthetic batch of different sizes must receive the same transformation).  Every op is differentiable in ``x``;
the integer-valued ops (translate, cutout, flip) are piecewise linear in ``x`` for fixed parameters.

The formulas follow the official ``DiffAugment`` of VICO-UoE/DatasetCondensation (see anchors §2.14).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "brightness",
    "saturation",
    "contrast",
    "translate",
    "cutout",
    "flip",
    "affine",
    "scale",
    "rotate",
]


def _per_image(value: Tensor, x: Tensor) -> Tensor:
    """View a ``[N]`` or ``[1]`` parameter as ``[N|1, 1, 1, 1]`` in ``x``'s dtype/device, so it broadcasts."""
    return value.to(device=x.device, dtype=x.dtype).reshape(-1, 1, 1, 1)


def brightness(x: Tensor, offset: Tensor) -> Tensor:
    """Add a per-image constant: ``x + offset`` (official: ``offset = (U(0,1) - 0.5) * brightness``)."""
    return x + _per_image(offset, x)


def saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Scale each pixel's deviation from its channel mean: ``(x - mean_c) * factor + mean_c``.

    The mean is over channels per pixel, as in the official code; on single-channel images it is the pixel
    itself, so the op is the identity there (also as in the official code).
    """
    if x.shape[1] == 1:  # (x - x) * f + x == x exactly for finite f, gradient included: skip the work
        return x
    return _blend_with_mean(x, x.mean(dim=1, keepdim=True), _per_image(factor, x))


def contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Scale each image's deviation from its own mean over (C, H, W): ``(x - mean) * factor + mean``."""
    return _blend_with_mean(x, x.mean(dim=(1, 2, 3), keepdim=True), _per_image(factor, x))


def _blend_with_mean(x: Tensor, mean: Tensor, factor: Tensor) -> Tensor:
    """``(x - mean) * factor + mean`` rewritten as ``x * factor + mean * (1 - factor)``: one full-size pass
    instead of three (equal up to float rounding)."""
    return torch.addcmul(mean * (1 - factor), x, factor)


def translate(x: Tensor, shift: Tensor) -> Tensor:
    """Shift by whole pixels with zero fill: ``out[..., h, w] = x[..., h + dy, w + dx]`` (0 outside the image).

    ``shift`` is an integer tensor ``[N|1, 2]`` holding ``(dy, dx)``.  This is the official pad-and-gather crop:
    padding by one zero pixel and clamping the source index into the padded frame sends every out-of-range
    read to a zero.  One flat ``gather`` over the padded images is exact by construction and measured ~2-4x
    faster on CPU than the official 3-D advanced indexing over a ``meshgrid``.
    """
    n, c, h, w = x.shape
    shift = shift.to(device=x.device, dtype=torch.long)
    rows = torch.arange(h, device=x.device).view(1, h, 1) + shift[:, 0].view(-1, 1, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w) + shift[:, 1].view(-1, 1, 1)
    rows = (rows + 1).clamp_(0, h + 1)
    cols = (cols + 1).clamp_(0, w + 1)
    index = (rows * (w + 2) + cols).view(-1, 1, h * w).expand(n, c, h * w)
    padded = F.pad(x, (1, 1, 1, 1)).flatten(2)
    return padded.gather(2, index).view(n, c, h, w)


def cutout(x: Tensor, centre: Tensor, size: tuple[int, int]) -> Tensor:
    """Zero a ``size = (sh, sw)`` rectangle per image, clipped to the image.

    ``centre`` is an integer tensor ``[N|1, 2]`` of ``(cy, cx)``; the rectangle covers rows
    ``cy - sh // 2 .. cy - sh // 2 + sh - 1`` (and likewise columns), the official convention.  The official
    code clamps each covered index into the image, which covers exactly the clamped interval computed here;
    building the mask from two 1-D interval tests avoids materialising ``N * sh * sw`` indices.
    """
    _, _, h, w = x.shape
    sh, sw = size
    centre = centre.to(device=x.device, dtype=torch.long)
    mask = torch.ones((), dtype=x.dtype, device=x.device)
    if sh > 0 and sw > 0:
        in_rows = _interval_mask(centre[:, 0], sh, h)  # [N|1, H]
        in_cols = _interval_mask(centre[:, 1], sw, w)  # [N|1, W]
        inside = in_rows.unsqueeze(2) & in_cols.unsqueeze(1)
        mask = (~inside).to(x.dtype).unsqueeze(1)
    return x * mask


def _interval_mask(centre: Tensor, length: int, extent: int) -> Tensor:
    """``[N, extent]`` boolean: which of ``0..extent-1`` fall in the clamped ``[c - length//2, +length)``."""
    start = centre - length // 2
    lo = start.clamp(0, extent - 1).view(-1, 1)
    hi = (start + length - 1).clamp(0, extent - 1).view(-1, 1)
    pos = torch.arange(extent, device=centre.device).view(1, -1)
    return (pos >= lo) & (pos <= hi)


def flip(x: Tensor, mask: Tensor) -> Tensor:
    """Mirror left-right the images where ``mask`` (bool ``[N|1]``) is true."""
    mask = mask.to(device=x.device, dtype=torch.bool).view(-1, 1, 1, 1)
    return torch.where(mask, x.flip(3), x)


def affine(x: Tensor, theta: Tensor) -> Tensor:
    """Resample ``x`` through ``[N|1, 2, 3]`` affine matrices (bilinear, zero padding, ``align_corners=False``).

    These are the defaults the official ``F.affine_grid``/``F.grid_sample`` calls get.  A shared matrix builds
    one grid and expands it over the batch instead of building ``N`` identical grids.
    """
    n, _, h, w = x.shape
    grid = _affine_grid(theta.to(device=x.device, dtype=x.dtype), h, w)
    if grid.shape[0] != n:
        grid = grid.expand(n, -1, -1, -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _affine_grid(theta: Tensor, h: int, w: int) -> Tensor:
    """``F.affine_grid(theta, [N, C, h, w], align_corners=False)`` as one broadcast add.

    The grid point of pixel ``(i, j)`` is ``theta[:, :, 0] * u_j + theta[:, :, 1] * v_i + theta[:, :, 2]`` with
    pixel-centre coordinates ``u_j = (2j + 1) / w - 1``.  Splitting it into a ``[N, 1, w, 2]`` column term plus a
    ``[N, h, 1, 2]`` row term writes the grid once, where ``F.affine_grid``'s ``[N, h*w, 3] x [N, 3, 2]`` bmm is
    about 3x slower than the ``grid_sample`` that follows on CPU (46 ms vs 15 ms for 2,560 28x28 grids).
    """
    u = (torch.arange(w, device=theta.device, dtype=theta.dtype) * 2 + 1) / w - 1
    v = (torch.arange(h, device=theta.device, dtype=theta.dtype) * 2 + 1) / h - 1
    columns = theta[:, None, None, :, 0] * u.view(1, 1, w, 1)  # [N, 1, w, 2]
    rows = theta[:, None, None, :, 1] * v.view(1, h, 1, 1) + theta[:, None, None, :, 2]  # [N, h, 1, 2]
    return columns + rows


def scale(x: Tensor, factors: Tensor) -> Tensor:
    """Scale the sampling grid per axis; ``factors`` is ``[N|1, 2]`` of ``(sx, sy)``.

    A factor above 1 samples a wider area, so the content shrinks; 1 is the identity.
    """
    factors = factors.to(device=x.device, dtype=x.dtype)
    theta = torch.zeros(factors.shape[0], 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = factors[:, 0]
    theta[:, 1, 1] = factors[:, 1]
    return affine(x, theta)


def rotate(x: Tensor, angle: Tensor) -> Tensor:
    """Rotate the sampling grid by ``angle`` radians (``[N|1]``), official matrix ``[[cos, -sin], [sin, cos]]``."""
    angle = angle.to(device=x.device, dtype=x.dtype).reshape(-1)
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(angle)
    theta = torch.stack(
        [torch.stack([cos, -sin, zero], dim=1), torch.stack([sin, cos, zero], dim=1)], dim=1
    )
    return affine(x, theta)
