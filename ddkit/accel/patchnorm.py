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

In compiled graphs a ``conv -> norm -> activation -> 2x2 average pool`` stage goes one step further
(:func:`conv_instance_norm_pool`): each pooled pixel is computed from its four source pixels' patches directly, so
the full-resolution map is never written at all.

Exact up to float rounding (``tests/test_patchnorm.py`` holds it to the plain modules in float64, values and
first and second derivatives); every operation is an ordinary differentiable tensor op, so autograd, double
backward (DC's synthetic side), ``torch.func`` (``vmap``, ``functional_call``) and ``torch.compile`` all see
through it, and the parameters stay those of the original ``Conv2d`` and ``GroupNorm`` modules (same names, same
state dict).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

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


def affine_coefficients(x: Tensor, conv: nn.Conv2d, norm: nn.GroupNorm) -> tuple[Tensor, Tensor, Tensor]:
    """``(patches, coef, shift)`` with ``norm(conv(x))[n, k, l] = patches[n, :, l] . coef[n, :, k] + shift[n, k]``.

    ``patches`` is ``n x D x L`` (``F.unfold``), ``coef`` ``n x D x K`` and ``shift`` ``n x K``.  The conv bias is
    kept in the arithmetic (it is added to the mean and subtracted again, as the plain modules do), so it receives
    its exactly-zero gradient instead of none.
    """
    kh, kw = conv.kernel_size
    patches = F.unfold(x, (kh, kw), padding=conv.padding)                 # n, D, L
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
    return patches, filters * scale.unsqueeze(1), shift


def conv_instance_norm(x: Tensor, conv: nn.Conv2d, norm: nn.GroupNorm) -> Tensor:
    """``norm(conv(x))`` for instance norm, from per-image patch statistics; returns a channels-last map."""
    n, _, height, width = x.shape
    kh, kw = conv.kernel_size
    ph, pw = conv.padding
    out_h, out_w = height + 2 * ph - kh + 1, width + 2 * pw - kw + 1
    patches, coef, shift = affine_coefficients(x, conv, norm)
    out = patches.transpose(1, 2) @ coef + shift.unsqueeze(1)            # n, L, K
    return out.view(n, out_h, out_w, conv.out_channels).permute(0, 3, 1, 2)


#: Largest ``C_in * kh * kw`` for the pooled stage: grayscale 3x3 (9 taps).  With RGB patches (27 taps, four
#: phases) the fused pass does more work than it saves: a compiled CIFAR-shaped step took 0.87x the plain
#: modules' time against 0.75x for the batched product (``python -m benchmarks.bench_patchnorm``).
MAX_FUSED_PATCH_VALUES = 9

#: Activations applied element by element, which :func:`conv_instance_norm_pool` may apply per pooling phase.
ELEMENTWISE_ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.SiLU, nn.Identity)


def pooled_shortcut_applies(layers: list[nn.Module]) -> bool:
    """Whether ``layers`` start with ``conv -> instance norm -> elementwise activation -> 2x2 average pool``."""
    if len(layers) < 4 or not shortcut_applies(layers[0], layers[1]):
        return False
    conv = layers[0]
    if conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] > MAX_FUSED_PATCH_VALUES:
        return False
    act, pool = layers[2], layers[3]
    return (
        _MATERIALIZE is not None
        and type(act) in ELEMENTWISE_ACTIVATIONS
        and type(pool) is nn.AvgPool2d
        and _pair(pool.kernel_size) == (2, 2)
        and _pair(pool.stride) == (2, 2)
        and _pair(pool.padding) == (0, 0)
        and not pool.ceil_mode
        and pool.divisor_override is None
    )


def _pair(value: int | tuple[int, ...]) -> tuple[int, ...]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _materialize_op() -> Callable[[Tensor], Tensor] | None:
    """A contiguous copy that torch.compile must materialise (a custom op is opaque to Inductor's fusion).

    Why: the phase sums below compile to one kernel vectorised over channels only if their coefficients arrive
    as a buffer with channels contiguous, and the padded image as plain memory.  Left to itself, Inductor fused
    the coefficient arithmetic into that kernel and re-derived it at every pixel with strided gathers and masked
    the padding at every tap, which ran 1.4-2x slower than the batched product.  A graph break would do the
    same job but makes every new network recompile (dynamo then guards on the module objects).
    ``None`` where ``torch.library.custom_op`` is missing (torch < 2.4): the batched product is used there.
    """
    custom_op = getattr(torch.library, "custom_op", None)
    if custom_op is None:
        return None
    try:
        @custom_op("ddkit::materialize", mutates_args=())
        def materialize(x: Tensor) -> Tensor:
            return x.contiguous().clone()

        @materialize.register_fake
        def _(x: Tensor) -> Tensor:
            return torch.empty_like(x, memory_format=torch.contiguous_format)

        materialize.register_autograd(lambda ctx, grad: grad)
        return materialize
    except RuntimeError:  # already registered (the module was imported twice under different names)
        return torch.ops.ddkit.materialize


#: the ``ddkit::materialize`` op, registered on first use (installing a fused stage), never on import: a custom op
#: is process-wide state, which importing a library should not create
_MATERIALIZE: Callable[[Tensor], Tensor] | None = None
_REGISTERED = False


def materialize_available() -> bool:
    """Register ``ddkit::materialize`` if it is not yet (once per process); False where torch lacks custom ops."""
    global _MATERIALIZE, _REGISTERED
    if not _REGISTERED:
        _MATERIALIZE = _materialize_op()
        _REGISTERED = True
    return _MATERIALIZE is not None


def _materialized(x: Tensor) -> Tensor:
    """``x`` as a contiguous buffer of its own; passed through the op as a 2-D ``[n, rest]`` tensor, whose stride
    order Inductor can settle even with symbolic sizes (it could not for the 4-D padded image)."""
    assert _MATERIALIZE is not None, "install() registers ddkit::materialize before a fused stage can run"
    return _MATERIALIZE(x.reshape(x.shape[0], -1)).view(x.shape)


def conv_instance_norm_pool(x: Tensor, conv: nn.Conv2d, norm: nn.GroupNorm, act: nn.Module) -> Tensor:
    """``avg_pool_2x2(act(norm(conv(x))))`` without the full-resolution map: a channels-last ``n x K x H/2 x W/2``.

    Each pooled pixel is the mean of the activation at its four source pixels (the pooling *phases*), and each
    of those is ``shift + sum_d tap_d * coef_d`` with ``D`` taps of the padded image.  Written as broadcast
    products of ``n x H/2 x W/2 x 1`` taps with ``n x 1 x 1 x K`` coefficients, the compiler fuses the whole
    stage into one pass that writes only the pooled map (a quarter of the pixels the batched product writes
    and the pooling reads back); its backward is fused the same way.  Meant for compiled graphs
    (:meth:`ConvNormStage.run` uses it only while compiling): eagerly, the ``4 D`` broadcast products would each
    be a pass over memory.
    """
    n, cin, height, width = x.shape
    kh, kw = conv.kernel_size
    ph, pw = conv.padding
    half_h, half_w = (height + 2 * ph - kh + 1) // 2, (width + 2 * pw - kw + 1) // 2
    assert materialize_available(), "conv_instance_norm_pool needs torch.library.custom_op (torch >= 2.4)"
    _, coef, shift = affine_coefficients(x, conv, norm)
    padded = _materialized(F.pad(x, (pw, pw, ph, ph)))
    coef, shift = _materialized(coef), _materialized(shift)
    base = shift[:, None, None, :]                                        # n, 1, 1, K
    total: Tensor | None = None
    for a in range(2):
        for b in range(2):
            acc = base
            d = 0
            for ci in range(cin):
                for i in range(kh):
                    for j in range(kw):
                        tap = padded[:, ci, a + i:a + i + 2 * half_h:2, b + j:b + j + 2 * half_w:2]
                        acc = acc + tap.unsqueeze(-1) * coef[:, d, None, None, :]
                        d += 1
            phase = act(acc)
            total = phase if total is None else total + phase
    assert total is not None
    return (total * 0.25).permute(0, 3, 1, 2)                            # n, K, H/2, W/2 channels-last


class ConvNormStage(nn.Sequential):
    """``conv -> norm -> ...`` (a ``Sequential``, same children and state dict) using the shortcut when it applies.

    Models never build it: they build plain ``nn.Sequential`` stages, and the speed layer swaps this class in
    around the same child modules (:func:`install`) and back out (:func:`uninstall`), so parameters, their
    identity (optimizers keep working) and the state dict are unchanged by the swap.
    ``use_shortcut`` is decided from the first two layers at construction.  ``fuse_pooling`` lets compiled graphs of a
    ``conv -> norm -> activation -> 2x2 average pool`` stage use :func:`conv_instance_norm_pool`, which they do
    only inside :func:`static_shape_calls` (ddkit's own compiled calls, ``CompiledOrEager``): with symbolic
    sizes (a user's own ``torch.compile`` once a batch size changes) Inductor 2.13 fails to lower the fused
    stage's channels-last output, so other compiled graphs keep the batched product.
    """

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__(*layers)
        self.use_shortcut = self.shortcut_possible()
        self.fuse_pooling = materialize_available()
        self.static_shapes = False  # set only for the duration of a static-shape compiled call

    def shortcut_possible(self) -> bool:
        return len(self) >= 2 and shortcut_applies(self[0], self[1])

    def forward(self, x: Tensor) -> Tensor:
        return self.run(x)

    def run(self, x: Tensor, stop: int | None = None) -> Tensor:
        """The layers up to (not including) index ``stop`` (all by default; negative counts from the end), so that
        callers that need an inner activation (CAFE's pre-pooling taps) still get the shortcut."""
        layers = list(self)[:stop]
        if (self.use_shortcut and self.fuse_pooling and self.static_shapes and _is_compiling()
                and pooled_shortcut_applies(layers)):
            x = conv_instance_norm_pool(x, layers[0], layers[1], layers[2])
            layers = layers[4:]
        elif self.use_shortcut and len(layers) >= 2:
            x = conv_instance_norm(x, layers[0], layers[1])
            layers = layers[2:]
        for layer in layers:
            x = layer(x)
        return x


def _is_compiling() -> bool:
    """True while torch.compile traces (``torch.compiler.is_compiling`` from torch 2.3, dynamo's before)."""
    check = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling
    return bool(check())


def _swap_children(net: nn.Module, convert: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    """Replace every descendant ``m`` of ``net`` for which ``convert(m)`` returns a module (depth first)."""
    for name, child in list(net.named_children()):
        new = convert(child)
        if new is not None:
            setattr(net, name, new)  # also right for ModuleList/Sequential children (named '0', '1', ...)
        else:
            _swap_children(child, convert)
    return net


def install(net: nn.Module, fuse_pooling: bool = True) -> nn.Module:
    """Swap :class:`ConvNormStage` in for every plain ``nn.Sequential`` that starts ``conv -> instance norm`` where
    the shortcut applies (:func:`shortcut_applies`); returns ``net`` (changed in place).

    ``fuse_pooling=False`` keeps compiled graphs on the batched product (:func:`conv_instance_norm`) followed by
    the stage's own activation and pooling modules.
    """
    def convert(module: nn.Module) -> nn.Module | None:
        if type(module) is nn.Sequential and len(module) >= 2 and shortcut_applies(module[0], module[1]):
            stage = ConvNormStage(*module)
            stage.fuse_pooling = fuse_pooling and stage.fuse_pooling
            stage.train(module.training)
            return stage
        return None

    return _swap_children(net, convert)


def uninstall(net: nn.Module) -> nn.Module:
    """The reverse of :func:`install`: plain ``nn.Sequential`` stages around the same children (the official
    ``Conv2d -> GroupNorm`` computation); returns ``net`` (changed in place)."""
    def convert(module: nn.Module) -> nn.Module | None:
        if isinstance(module, ConvNormStage):
            plain = nn.Sequential(*module)
            plain.train(module.training)
            return plain
        return None

    return _swap_children(net, convert)


def installed(net: nn.Module) -> bool:
    """Whether some stage of ``net`` runs the shortcut."""
    return any(isinstance(m, ConvNormStage) and m.use_shortcut for m in net.modules())


def fuses_pooling(net: nn.Module) -> bool:
    """Whether ddkit's compiled calls of ``net`` run some stage through :func:`conv_instance_norm_pool`, which
    never materialises the stage's full-resolution map (callers size their CPU chunks by that)."""
    return any(isinstance(m, ConvNormStage) and m.use_shortcut and m.fuse_pooling
               and pooled_shortcut_applies(list(m)) for m in net.modules())


@contextmanager
def static_shape_calls(stages: list[ConvNormStage]) -> Iterator[None]:
    """Mark ``stages`` as traced with static sizes for the duration (dynamo guards on the flag, so graphs traced
    inside and outside the block are kept apart), so that they may take :func:`conv_instance_norm_pool`."""
    for stage in stages:
        stage.static_shapes = True
    try:
        yield
    finally:
        for stage in stages:
            stage.static_shapes = False
