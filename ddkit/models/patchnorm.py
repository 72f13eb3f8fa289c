"""An exact shortcut for ``conv -> instance norm`` when the convolution has few input values per output.

Why: on CPU, the first stage of ConvNet-3 (a 3x3 convolution of a 1- or 3-channel image into 128 maps, then
``GroupNorm(128, 128)``, ReLU and 2x2 pooling) costs far more than its arithmetic.  The convolution reads one
input channel (oneDNN runs it at a few GFLOPS) and writes 128 full-resolution maps, which the norm then reads
twice (statistics, then normalisation) and the backward pass reads again several times.  In a compiled 100-image
training step of ConvNet-3 on Fashion-MNIST, this stage took about a third of the time while doing under 3 % of
the arithmetic.

Instance normalisation of a convolution needs no pass over its output.  With ``P_n`` the ``D x L`` patch matrix
of image ``n`` (``D = C_in * kh * kw`` values per output pixel, ``L`` pixels) and ``w_k`` filter ``k``:

- the per-image mean of output map ``k`` is ``w_k . mu_n + b_k``, with ``mu_n`` the mean patch;
- its (biased) variance is ``w_k^T S_n w_k``, with ``S_n`` the ``D x D`` covariance of the patches;

so ``gamma_k (w_k . p + b_k - mean) / sqrt(var + eps) + beta_k`` is one affine map of the patch ``p`` per image and
channel, and the whole stage before the activation is a single batched product ``P_n^T A_n + c_n``, written
straight into a channels-last map.  The statistics cost ``O(L D^2)`` per image instead of ``O(L C_out)`` passes
over memory; this pays while ``D`` is small, hence :data:`MAX_PATCH_VALUES`.

Exact up to float rounding (``tests/test_patchnorm.py`` holds it to the plain modules in float64, values and
first and second derivatives); every operation is an ordinary differentiable tensor op, so autograd, double
backward (DC's synthetic side), ``torch.func`` (``vmap``, ``functional_call``) and ``torch.compile`` all see
through it, and the parameters stay those of the original ``Conv2d`` and ``GroupNorm`` modules (same names, same
state dict).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Largest ``C_in * kh * kw`` for which the shortcut is used: 1- and 3-channel images under a 3x3 kernel (9 and
#: 27).  The statistics cost ``L * D^2`` per image; at D = 27 that is still below one pass over 128 maps.
MAX_PATCH_VALUES = 32


def shortcut_applies(conv: nn.Module, norm: nn.Module) -> bool:
    """Whether ``norm(conv(x))`` can go through :func:`conv_instance_norm` (same result up to rounding)."""
    if type(conv) is not nn.Conv2d or type(norm) is not nn.GroupNorm:
        return False
    kh, kw = conv.kernel_size
    return (
        norm.num_groups == norm.num_channels == conv.out_channels
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and conv.in_channels * kh * kw <= MAX_PATCH_VALUES
    )


def conv_instance_norm(x: Tensor, conv: nn.Conv2d, norm: nn.GroupNorm) -> Tensor:
    """``norm(conv(x))`` for instance norm, from per-image patch statistics; returns a channels-last map.

    The conv bias is kept in the arithmetic (it is added to the mean and subtracted again, as the plain modules
    do), so it receives its exactly-zero gradient instead of none.
    """
    n, _, height, width = x.shape
    kh, kw = conv.kernel_size
    ph, pw = conv.padding
    out_h, out_w = height + 2 * ph - kh + 1, width + 2 * pw - kw + 1
    patches = F.unfold(x, (kh, kw), padding=(ph, pw))                     # n, D, L
    mean_patch = patches.mean(2, keepdim=True)                            # n, D, 1
    centred = patches - mean_patch
    covariance = centred @ centred.transpose(1, 2) / patches.shape[2]     # n, D, D
    filters = conv.weight.reshape(conv.out_channels, -1).t()              # D, K
    variance = ((covariance @ filters) * filters).sum(1)                  # n, K  (w_k^T S_n w_k)
    inv_std = torch.rsqrt(variance.clamp_min(0) + norm.eps)               # n, K
    scale = inv_std if norm.weight is None else inv_std * norm.weight
    bias = conv.bias if conv.bias is not None else torch.zeros_like(filters[0])
    map_mean = (mean_patch.transpose(1, 2) @ filters).squeeze(1) + bias   # n, K
    shift = scale * (bias - map_mean)
    if norm.bias is not None:
        shift = shift + norm.bias
    out = patches.transpose(1, 2) @ (filters * scale.unsqueeze(1)) + shift.unsqueeze(1)  # n, L, K
    return out.view(n, out_h, out_w, conv.out_channels).permute(0, 3, 1, 2)


class ConvNormStage(nn.Sequential):
    """``conv -> norm -> ...`` (a ``Sequential``, same children and state dict) using the shortcut when it applies.

    ``use_shortcut`` is decided from the first two layers at construction; setting it to False gives the plain
    module path (benchmarks compare the two this way).
    """

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__(*layers)
        self.use_shortcut = self.shortcut_possible()

    def shortcut_possible(self) -> bool:
        return len(self) >= 2 and shortcut_applies(self[0], self[1])

    def forward(self, x: Tensor) -> Tensor:
        return self.run(x)

    def run(self, x: Tensor, stop: int | None = None) -> Tensor:
        """The layers up to (not including) index ``stop`` (all by default; negative counts from the end), so that
        callers that need an inner activation (CAFE's pre-pooling taps) still get the shortcut."""
        layers = list(self)[:stop]
        if self.use_shortcut and len(layers) >= 2:
            x = conv_instance_norm(x, layers[0], layers[1])
            layers = layers[2:]
        for layer in layers:
            x = layer(x)
        return x


def use_patch_shortcut(net: nn.Module, enabled: bool) -> nn.Module:
    """Switch the shortcut on or off in every :class:`ConvNormStage` of ``net`` (where it applies); returns ``net``.

    Off gives the plain ``Conv2d`` / ``GroupNorm`` modules' computation, which is what the official code runs:
    the benchmarks' re-statements of the official formulations use it, so that ddkit's gain is measured against
    the computation the official code does.
    """
    for module in net.modules():
        if isinstance(module, ConvNormStage):
            module.use_shortcut = enabled and module.shortcut_possible()
    return net
