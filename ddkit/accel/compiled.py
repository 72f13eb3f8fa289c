"""torch.compile as an opt-in speed lever with an eager fallback.

On the 2-core CPUs this project is measured on, a compiled ConvNet-3 runs a training step about 1.5x faster and a
no-grad forward about 1.7x faster than eager (Inductor fuses normalisation, activation and pooling into the
passes around each convolution; benchmarks/RESULTS.md).  Passes over small chunks of a batch (about 16
Fashion-MNIST images) keep each chunk's activations in cache: an eager 256-image training step ran 1.4-1.6x
faster that way; compiled training passes gain less (about 5-10 %) and prefer chunks about twice that size
(:data:`CPU_TRAIN_CHUNK_PIXELS`).  :func:`forward_of` chunks only where that is exact (no batch norm).  Compiling costs about 20 s per graph, so it pays only on long runs: every user of this module
resolves a ``compile`` option "auto" | "on" | "off", where "auto" means on for long float32 CPU runs only.  On
accelerators "auto" stays off (no measurement there yet).
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import Tensor, nn

from .patchnorm import ConvNormStage, static_shape_calls

#: CPU: input pixels per forward pass (16 Fashion-MNIST images, 196 8x8 digits, 12 CIFAR images).  Small passes keep
#: a pass's activations (128 x 32 x 32 floats per 28x28 image after ConvNet-3's first conv) in cache; on 2 cores
#: an eager training step over 256 images took 1.26-1.34 s in chunks of 16 against 1.85-2.01 s whole
#: (``python -m benchmarks.bench_levers``).  Accelerators take whole batches.
CPU_CHUNK_PIXELS = 16 * 28 * 28

#: CPU: input pixels per *compiled* pass of a network whose first stage runs fused
#: (``ddkit.models.patchnorm.conv_instance_norm_pool``: no full-resolution map is written, so the small passes'
#: reason is gone and larger ones run the 128-channel convolutions more efficiently).  64 Fashion-MNIST images: a
#: no-grad ConvNet-3 forward of 2,560 images took 2.23 s in chunks of 64, 2.39 s in 32, 2.31 s in 128 and 2.80 s in
#: 16, against 2.95 s for the unfused shortcut in chunks of 16 (one process, interleaved; benchmarks/RESULTS.md).
FUSED_CHUNK_PIXELS = 64 * 28 * 28

#: CPU: input pixels per *compiled training* pass (32 Fashion-MNIST images).  With glibc's default allocator a
#: whole 100-image batch re-faults its 52 MB activation tensors every step (they are mmapped and unmapped); chunks
#: of 20-32 images stay under the mmap threshold and ran a compiled ConvNet-3 step 5-11 % faster.  With
#: ``ddkit.engine.keep_freed_memory`` (what the CLI does) whole batches and chunks of 25 ran within 2.5 % of each
#: other, so the chunks cost nothing there and protect API users who do not call it
#: (``python -m benchmarks.bench_train_chunk``; benchmarks/RESULTS.md).
CPU_TRAIN_CHUNK_PIXELS = 32 * 28 * 28


#: The one rule for when compiling pays off: a run that pushes at least this many input pixels through one compiled
#: network function (images x height x width, summed over the run).  A compile costs about 20 s per graph on the
#: 2-core CPUs here and saves about a third of every step (1.5x); Fashion-MNIST IPC 10 evaluated for 300 epochs
#: is 2.4e7 pixel-steps and gained (benchmarks/bench_eval_cost.py), the digits runs of the tests and the main
#: job (under 1e7) would spend most of their time compiling.
COMPILE_MIN_PIXEL_STEPS = 1.5e7


def compile_pays_off(pixel_steps: float) -> bool:
    """Whether a run of ``pixel_steps`` input pixels through one compiled function repays the compile time."""
    return pixel_steps >= COMPILE_MIN_PIXEL_STEPS


def compiler_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean "the compiler could not do it" (no C++ toolchain, an unsupported op), as
    opposed to errors of the computation itself (out of memory, a shape error), which must propagate."""
    kinds: list[type[BaseException]] = []
    dynamo_exc = getattr(getattr(torch, "_dynamo", None), "exc", None)
    for name in ("TorchDynamoException", "BackendCompilerFailed", "Unsupported"):
        kind = getattr(dynamo_exc, name, None)
        if isinstance(kind, type):
            kinds.append(kind)
    try:
        from torch._inductor import exc as inductor_exc  # noqa: PLC0415 - optional, version-dependent module
    except ImportError:  # pragma: no cover - torch without Inductor
        inductor_exc = None
    for name in ("InductorError", "CppCompileError", "CUDACompileError"):
        kind = getattr(inductor_exc, name, None)
        if isinstance(kind, type):
            kinds.append(kind)
    return tuple(kinds)


#: Graphs (input shapes, modes) one compiled function may hold.  Every model's forward is the same code object
#: (``FeatureNet.forward``), so one process that evaluates several set sizes and architectures meets more than
#: dynamo's default of 8, after which it would silently run eagerly.
COMPILED_GRAPHS_LIMIT = 64


class CompiledOrEager:
    """Calls ``torch.compile(fn)``; if compiling fails (no C++ compiler, an unsupported op), warns once and
    calls ``fn`` eagerly from then on, so a missing toolchain costs speed, never a run.  Any other error (out of
    memory, a wrong shape) propagates: it would fail eagerly too, and must not read as a compiler failure."""

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.fn = fn
        self.enabled = True  # False after the first compiler failure
        self._compiled = torch.compile(fn, dynamic=False)
        # the module behind ``fn`` (itself or a bound method's owner): its ConvNormStages may fuse their pooling in
        # these static-shape graphs (models/patchnorm.py)
        owner = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
        self._stages = [m for m in owner.modules() if isinstance(m, ConvNormStage)] if isinstance(owner, nn.Module) else []

    def __call__(self, x: Tensor) -> Tensor:
        if self.enabled:
            try:
                limit = max(COMPILED_GRAPHS_LIMIT, torch._dynamo.config.cache_size_limit)
                # for this call only: no global change
                with torch._dynamo.config.patch(cache_size_limit=limit), static_shape_calls(self._stages):
                    return self._compiled(x)
            except torch.OutOfMemoryError:
                raise
            except compiler_errors() as exc:  # only the compiler's own failures fall back to eager
                warnings.warn(f"torch.compile failed ({type(exc).__name__}: {str(exc)[:200]}); running eagerly",
                              RuntimeWarning, stacklevel=2)
                self.enabled = False
        return self.fn(x)


def cpu_chunk(image_shape: tuple[int, ...], device: torch.device, pixels: int = CPU_CHUNK_PIXELS) -> int | None:
    """Images per pass under ``pixels`` input pixels on CPU (at least 1); ``None`` (whole batch) elsewhere."""
    if device.type != "cpu":
        return None
    return max(1, pixels // max(1, image_shape[-1] * image_shape[-2]))


def train_chunk(image_shape: tuple[int, ...], device: torch.device, compiled: bool) -> int | None:
    """Images per training pass on CPU: :data:`CPU_TRAIN_CHUNK_PIXELS` compiled, :data:`CPU_CHUNK_PIXELS` eager."""
    return cpu_chunk(image_shape, device, CPU_TRAIN_CHUNK_PIXELS if compiled else CPU_CHUNK_PIXELS)


def even_chunk(n: int, chunk: int) -> int:
    """The chunk size to split ``n`` rows with: a divisor of ``n`` in ``[chunk/2, chunk]`` if there is one, so
    that every pass has the same shape (one compiled graph instead of two), else ``chunk``."""
    if n <= chunk:
        return n
    for size in range(chunk, max(1, (chunk + 1) // 2) - 1, -1):
        if n % size == 0:
            return size
    return chunk


class ChunkedForward:
    """``fn`` applied to consecutive chunks of the batch, outputs concatenated.

    The same function as ``fn`` when samples are independent (no batch norm), so training through it takes the
    same SGD steps, while each operation works on a cache-sized tensor (faster on CPU).
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], chunk: int) -> None:
        self.fn = fn
        self.chunk = int(chunk)

    def __call__(self, x: Tensor) -> Tensor:
        if x.shape[0] <= self.chunk:
            return self.fn(x)
        return torch.cat([self.fn(part) for part in x.split(even_chunk(x.shape[0], self.chunk))])


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has batch-norm layers (whose training-mode outputs depend on the whole batch); the same
    test as :attr:`ddkit.models.FeatureNet.uses_batchnorm`, for any module."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def forward_of(model: nn.Module, compiled: bool, chunk: int | None = None) -> Callable[[Tensor], Tensor]:
    """``model``'s forward for training, compiled or eager, over chunks of ``chunk`` images (:func:`train_chunk`).

    Chunking pays most for eager passes (a 256-image ConvNet-3 step: 1.26-1.34 s in chunks of 16 against
    1.85-2.01 s whole) and a little for compiled ones (100 images: 0.41-0.43 s in chunks of 20-25 against
    0.44-0.49 s whole, interleaved runs of 24-30 rounds).  The parameters stay the module's own, so an optimizer
    over ``model.parameters()`` still sees them.  Chunking is skipped for models with batch norm (statistics
    over the whole batch) and when ``chunk`` is ``None``.
    """
    forward: Callable[[Tensor], Tensor] = CompiledOrEager(model) if compiled else model
    if chunk is None or chunk < 1 or has_batchnorm(model):
        return forward
    return ChunkedForward(forward, chunk)
