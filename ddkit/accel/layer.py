"""The speed layer: every lever that makes a method fast on one kind of device, behind one setting.

``speed="auto"`` (the default) turns on, on CPU, the levers measured faster on the 2-core CPUs of this project
(benchmarks/RESULTS.md): the patch-statistics first stage (:mod:`ddkit.accel.patchnorm`), ``torch.compile`` for
runs long enough to repay it, cache-sized chunks of every pass, channels-last compiled embedders.  On CUDA (and
any other device) "auto" means plain modules: cuDNN's convolution and GroupNorm, whole batches, no compile, until
a benchmark measured on that device shows a lever faster there.  ``speed="plain"`` means plain everywhere: what
the official code computes, the same result up to float rounding.

Methods never size chunks or decide compilation: they ask this layer for a network (:meth:`SpeedLayer.prepare`),
a training forward, a no-grad forward and its chunk size, and whether their run compiles, given how much work
the run does (:meth:`SpeedLayer.compiles`: one rule, :func:`~ddkit.accel.compiled.compile_pays_off`).
"""
from __future__ import annotations

import copy
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from . import patchnorm
from .compiled import (
    CPU_CHUNK_PIXELS,
    CPU_TRAIN_CHUNK_PIXELS,
    FUSED_CHUNK_PIXELS,
    ChunkedForward,
    CompiledOrEager,
    compile_pays_off,
    cpu_chunk,
    has_batchnorm,
)

SPEED_MODES = ("auto", "plain")

#: CPU, eager: real images per no-grad forward chunk (DM's and CAFE's real branch).  Chunks this small keep the
#: first stage's activations (128 x 32 x 32 floats per 28x28 image) in the last-level cache and bound memory.
CPU_EAGER_NO_GRAD_CHUNK = 64

#: Input pixels per augmentation call (256 Fashion-MNIST images).  A DSA op costs mostly per call, so a real batch
#: is augmented in blocks this large and then forwarded in cache-sized chunks: augmenting 2,560 images in chunks of
#: 16 took 0.17-0.4 s against 0.06-0.07 s in blocks of 256 (one thread), several percent of a DM iteration.
AUG_BLOCK_PIXELS = 256 * 28 * 28

#: Accelerators: input pixels per batched per-class gradient pass (DC): all CIFAR-10 classes x 256 real images at
#: once; a memory bound for many classes (CIFAR-100), not a speed lever.
ACCEL_CHUNK_PIXELS = 2560 * 32 * 32

#: CPU: synthetic images per class up to which DC's synthetic side is batched over classes with vmap; above it the
#: per-class loop was faster on 2 cores (IPC 1: batched 0.35 vs loop 0.55 CPU-s; IPC 10: 4.3 vs 3.2).
CPU_BATCHED_SYN_MAX = 4


def check_speed(mode: str) -> str:
    """``mode`` lower-cased if it is a speed setting, else a ConfigError listing them."""
    value = str(mode).lower()
    if value not in SPEED_MODES:
        raise ConfigError(f"speed must be one of {', '.join(SPEED_MODES)}, got {mode!r}")
    return value


class SpeedLayer:
    """The levers for one run on one device.  ``compile`` overrides the compile rule (benchmarks and tests only:
    True/False force it, None applies :func:`~ddkit.accel.compiled.compile_pays_off`)."""

    def __init__(self, mode: str = "auto", device: str | torch.device = "cpu", *, compile: bool | None = None) -> None:
        self.mode = check_speed(mode)
        self.device = torch.device(device)
        self.compile_override = compile
        #: iterations of the distillation run this layer serves (the engine's :meth:`plan_run`); None outside one
        self.run_iterations: int | None = None

    def __repr__(self) -> str:
        return f"SpeedLayer(mode={self.mode!r}, device={str(self.device)!r}, levers={self.levers})"

    @property
    def levers(self) -> bool:
        """Whether any lever is on: "auto" on CPU (the only device the levers were measured on)."""
        return self.mode == "auto" and self.device.type == "cpu"

    # ------------------------------------------------------------------ networks
    def prepare(self, net: nn.Module) -> nn.Module:
        """``net`` with the device's module swaps done (the patch-statistics first stage on CPU) or undone."""
        return patchnorm.install(net) if self.levers else patchnorm.uninstall(net)

    def plan_run(self, iterations: int) -> None:
        """The engine states the length of the run before the method's ``setup``, so :meth:`compiles_run` can
        weigh a compile against the whole run (a method's ``config.iterations`` is only its default budget)."""
        self.run_iterations = int(iterations)

    def compiles_run(self, pixels_per_iteration: float, dtype: torch.dtype, default_iterations: int) -> bool:
        """:meth:`compiles` for a distillation run that pushes ``pixels_per_iteration`` input pixels through its
        network per iteration, over the planned run (``default_iterations`` when no run was planned)."""
        iterations = default_iterations if self.run_iterations is None else self.run_iterations
        return self.compiles(pixels_per_iteration * iterations, dtype)

    def compiles(self, pixel_steps: float, dtype: torch.dtype = torch.float32) -> bool:
        """Whether a run pushing ``pixel_steps`` input pixels through a network function compiles it."""
        if self.compile_override is not None:
            return self.compile_override and self.levers
        return self.levers and dtype == torch.float32 and compile_pays_off(pixel_steps)

    # ------------------------------------------------------------------ forwards
    def train_forward(self, net: nn.Module, image_shape: tuple[int, ...], compiled: bool) -> Callable[[Tensor], Tensor]:
        """``net``'s forward for training: compiled or eager, over cache-sized chunks on CPU (the same SGD step
        for networks without batch norm: samples are independent).  Parameters stay the module's own."""
        if not self.levers:
            return net
        forward: Callable[[Tensor], Tensor] = CompiledOrEager(net) if compiled else net
        if has_batchnorm(net):
            return forward
        chunk = cpu_chunk(image_shape, self.device, CPU_TRAIN_CHUNK_PIXELS if compiled else CPU_CHUNK_PIXELS)
        return forward if chunk is None else ChunkedForward(forward, chunk)

    def compiled_forward(self, net: nn.Module, compiled: bool) -> Callable[[Tensor], Tensor] | None:
        """``net`` compiled (a function sharing its parameters), or None when this run does not compile."""
        return CompiledOrEager(net) if compiled and self.levers else None

    def embedder(self, compiled: bool, entry: str = "features") -> "Embedder":
        """A binder of fresh networks to one persistent forward (``entry``: "features" or "forward")."""
        return Embedder(compiled and self.levers, entry)

    def no_grad_chunk(self, image_shape: tuple[int, ...], net: nn.Module, compiled: bool) -> int:
        """Rows per no-grad forward of a batch of ``image_shape`` (``[N, C, H, W]``) through ``net``: everything
        for batch-norm nets (batch statistics) and without levers; on CPU the cache-sized chunk."""
        total = image_shape[0]
        if has_batchnorm(net) or total == 0 or not self.levers:
            return max(total, 1)
        if not compiled:
            return CPU_EAGER_NO_GRAD_CHUNK
        pixels = FUSED_CHUNK_PIXELS if patchnorm.fuses_pooling(net) else CPU_CHUNK_PIXELS
        return cpu_chunk(image_shape, self.device, pixels) or CPU_EAGER_NO_GRAD_CHUNK

    def graph_forward(self, fn: Callable[[Tensor], Tensor], net: nn.Module, image_shape: tuple[int, ...],
                      compiled: bool) -> Callable[[Tensor], Tensor]:
        """``fn`` (a forward of ``net`` kept in the graph) over cache-sized chunks where that is exact and pays:
        compiled CPU runs of networks without batch norm."""
        if not (self.levers and compiled) or has_batchnorm(net):
            return fn
        pixels = FUSED_CHUNK_PIXELS if patchnorm.fuses_pooling(net) else CPU_CHUNK_PIXELS
        chunk = cpu_chunk(image_shape, self.device, pixels)
        return fn if chunk is None else ChunkedForward(fn, chunk)

    # ------------------------------------------------------------------ per-class gradients (DC/DSA)
    def grad_chunk(self, image_shape: tuple[int, ...], compiled: bool) -> int | None:
        """Images per forward/backward pass of a per-class gradient: a cache-sized chunk on CPU, a memory bound on
        accelerators, the whole class without levers on CPU."""
        if self.device.type != "cpu":
            return max(1, ACCEL_CHUNK_PIXELS // max(1, image_shape[-1] * image_shape[-2]))
        if not self.levers:
            return None
        return cpu_chunk(image_shape, self.device, CPU_TRAIN_CHUNK_PIXELS if compiled else CPU_CHUNK_PIXELS)

    def grad_modes(self, syn_per_class: int) -> tuple[str, str]:
        """(real side, synthetic side) formulation of per-class gradients, both exact: "loop" (per class, the
        official formulation) or "batched" (vmap over classes).  Measured on CPU: the real side per class in
        chunks, the synthetic side batched for small classes; elsewhere the official loop until measured."""
        if not self.levers:
            return "loop", "loop"
        return "loop", "batched" if syn_per_class <= CPU_BATCHED_SYN_MAX else "loop"

    # ------------------------------------------------------------------ augmentation in blocks
    def augmented_chunks(self, augment: Callable[[Tensor, Tensor], Tensor], images: Tensor, row_class: Tensor,
                         labels: Tensor, chunk: int, dtype: torch.dtype) -> Iterator[tuple[Tensor, Tensor]]:
        """``(labels, augment(images, row_class))`` for consecutive chunks of ``chunk`` rows.

        On CPU augmentation runs per block of whole chunks (about :data:`AUG_BLOCK_PIXELS` pixels): the same images
        as augmenting chunk by chunk (each row gets its class's parameters either way) with fewer calls.
        """
        total = images.shape[0]
        pixels = max(1, images.shape[-1] * images.shape[-2])
        block = max(1, AUG_BLOCK_PIXELS // pixels // chunk) * chunk if self.levers else max(total, chunk)
        for start in range(0, total, block):
            stop = min(start + block, total)
            x = augment(images[start:stop].to(dtype), row_class[start:stop])
            for first in range(start, stop, chunk):
                last = min(first + chunk, stop)
                yield labels[first:last], x[first - start:last - start]


class Embedder:
    """A network's forward (``entry``: "features" or "forward") through one persistent, compiled, channels-last
    module that each fresh network of a run is copied into, so the compiled graphs serve the whole run (DM draws a
    new network every iteration; CAFE reads its network's accuracy hundreds of times).  Disabled, it is the
    network's own method.  On CPU the compiled forward fuses normalisation, activation and pooling into the passes
    around each convolution, which is where the eager forward spends about 40 % of its time.
    """

    def __init__(self, enabled: bool, entry: str = "features") -> None:
        self.enabled = enabled
        self.entry = entry
        self.module: nn.Module | None = None
        self._compiled: CompiledOrEager | None = None

    def bind(self, net: nn.Module) -> Callable[[Tensor], Tensor]:
        """The ``entry`` function with ``net``'s current parameters, buffers and train/eval mode."""
        if not self.enabled:
            return getattr(net, self.entry)
        if self.module is None or type(self.module) is not type(net):
            self.module = copy.deepcopy(net).requires_grad_(False).to(memory_format=torch.channels_last)
            self._compiled = CompiledOrEager(getattr(self.module, self.entry))
        else:
            with torch.no_grad():
                for mine, theirs in zip(self.module.state_dict().values(), net.state_dict().values()):
                    mine.copy_(theirs)
            self.module.train(net.training)
        return self._forward

    def _forward(self, x: Tensor) -> Tensor:
        assert self._compiled is not None
        return self._compiled(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x)
