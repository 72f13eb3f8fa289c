"""DM: dataset condensation with distribution matching (Zhao & Bilen, WACV 2023).

Every iteration draws a freshly initialised, untrained embedding network, augments the real and the synthetic
images of each class with the *same* DSA parameters, and moves the synthetic images so that the class means of
their embeddings (``features(x)``, the official ``net.embed``) match those of a real batch:

    loss = sum_c || mean_i f(A_c(real_c,i)) - mean_j f(A_c(syn_c,j)) ||^2

Source: ``VICO-UoE/DatasetCondensation/main_DM.py`` (anchors.md section 2.3).  What differs from that script,
and why it is the same objective:

- The official code runs one forward per class (ConvNet branch).  With per-sample normalisation (instance,
  group, layer or none) each image's embedding does not depend on the rest of its batch, so forwarding all
  classes together gives the same numbers; here the real images go through the network in cache-sized chunks
  under ``torch.no_grad`` and only their per-class sums are kept, and all synthetic images go through one
  forward.  ``tests/test_dm.py`` checks loss and gradient against the per-class loop in float64.
- With batch-norm embedders the real images of all classes form one batch and the synthetic images another,
  which is exactly the official BN branch (``'BN' in args.model``).
- Siamese augmentation draws one parameter set per class from the run's generator (the official code reseeds
  the global RNG from the wall clock); classes that drew the same op family are augmented in one call.
- Embedding-network parameters never require gradients (official: ``param.requires_grad = False``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator

import torch
from torch import Tensor, nn

from ..augment import DSA
from ..data.realdata import RealData
from ..functional.compiled import (
    CPU_CHUNK_PIXELS,
    FUSED_CHUNK_PIXELS,
    ChunkedForward,
    CompiledOrEager,
    cpu_chunk,
    has_batchnorm,
    resolve_compile,
)
from ..models.patchnorm import fuses_pooling
from ..registry import METHODS
from ..synthetic import SyntheticSet
from .base import DistillConfig, Distiller
from .common import (  # noqa: F401  (re-exported for callers of the old location)
    ClassBatch,
    Params,
    augment_by_class,
    class_means,
    resolve_dsa,
    sample_class_params,
    sample_per_class,
)

#: Real images per no-grad forward chunk on CPU.  Chunks this small keep the first stage's activations
#: (128 x 32 x 32 floats per image for ConvNet-3 on 28x28 input) in the last-level cache and bound memory,
#: which is what makes the real branch fast on CPU (benchmarks/bench_dm_cafe.py).  Accelerators use one chunk.
CPU_REAL_CHUNK = 64
# The compiled forward (channels-last) takes chunks of CPU_CHUNK_PIXELS input pixels (16 Fashion-MNIST images, 196
# 8x8 digits; compiled.cpu_chunk) on both branches: on 2 cores (AMD EPYC, AVX2), a Fashion-MNIST ConvNet-3
# forward of 2560 images took 2.7 s in chunks of 16, 3.3 s in chunks of 64, 4.4 s compiled NCHW in chunks of 256,
# against about 7 s eager (benchmarks/RESULTS.md, issue 3).  When the first stage runs fused (patchnorm's
# conv_instance_norm_pool, the default ConvNet) the chunks are FUSED_CHUNK_PIXELS (64 images) instead.

#: DM README: "for CIFAR10 dataset we set --lr_img 1 for --ipc = 1/10/50, --lr_img 10 for
#: --ipc = 100/200/500/1000/1250.  For CIFAR100 dataset, we set --lr_img 1 for --ipc = 1/10/50/100/125."
LARGE_IPC = 100
LARGE_IPC_LR_IMG = 10.0


# ---------------------------------------------------------------------------------------------------------- config
@dataclass
class DMConfig(DistillConfig):
    """DM options; defaults are ``main_DM.py``'s argparse defaults unless stated."""

    iterations: int = 20000  # --Iteration 20000
    lr_img: float = 1.0  # --lr_img 1.0 (README: 10 for CIFAR-10 at IPC >= 100; see default_config)
    momentum_img: float = 0.5  # optimizer_img = SGD(..., momentum=0.5)
    init: str = "real"  # --init real
    batch_real: int = 256  # --batch_real 256 real images per class per iteration
    #: DSA strategy; None = the dataset's (README: no flip for MNIST/SVHN), "none" disables augmentation
    dsa_strategy: str | None = None
    #: README's out-of-memory workaround (TinyImageNet): forward and backward one class at a time.  The image
    #: update is the same sum of per-class gradients, so only peak memory changes (BN nets then see per-class
    #: synthetic batches).
    per_class_step: bool = False
    #: real images per no-grad forward chunk; 0 = automatic (CPU_REAL_CHUNK on CPU, everything at once on
    #: accelerators).  Ignored for batch-norm embedders, whose statistics need the whole real batch.
    real_chunk: int = 0
    #: run the *eager* embedder in channels-last layout (measured slower on CPU: the eager GroupNorm has no fast
    #: NHWC kernel); the compiled embedder (``compile``) always runs channels-last, where it is faster
    channels_last: bool = False
    #: compile the embedder's forward with torch.compile: "auto" (on for CPU runs of >= 1000 iterations in
    #: float32, where the one-off compile time of about a minute is amortised), "on" or "off".  Both branches
    #: use it: the no-grad real forward and the synthetic forward/backward (a second graph).
    compile: str = "auto"


# ------------------------------------------------------------------------------------------- speed helpers
def chunk_size(requested: int, images_shape: tuple[int, ...], device: torch.device, batchnorm: bool,
               compiled: bool = False, fused: bool = False) -> int:
    """Rows per no-grad chunk of a batch of ``images_shape``: everything for BN nets (batch statistics), else the
    request, else on CPU the compiled forward's cache-sized chunk (``compiled``; larger when the network's first
    stage runs ``fused``) or CPU_REAL_CHUNK, and on accelerators everything."""
    total = images_shape[0]
    if batchnorm or total == 0:
        return max(total, 1)
    if requested > 0:
        return requested
    if device.type != "cpu":
        return total
    if not compiled:
        return CPU_REAL_CHUNK
    return cpu_chunk(images_shape, device, FUSED_CHUNK_PIXELS if fused else CPU_CHUNK_PIXELS) or CPU_REAL_CHUNK


def to_layout(x: Tensor, channels_last: bool) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def frozen_embedder(distiller: Distiller, real: RealData, generator: torch.Generator, dtype: torch.dtype,
                    channels_last: bool) -> nn.Module:
    """A fresh network (initialised from ``generator``) with frozen parameters, in train mode as officially."""
    net = distiller.new_network(real, generator)
    net.requires_grad_(False)
    net.to(dtype=dtype)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    return net.train()


class CompiledEmbedder:
    """The embedder's forward (real branch without grad, synthetic branch with), through one persistent and
    (optionally) compiled channels-last module.

    Each iteration's fresh network is copied into the persistent module in place, so the compiled graphs serve
    the whole run.  On CPU the compiled forward fuses normalisation, activation and pooling into the passes
    around each convolution, which is where the eager forward spends about 40% of its time
    (benchmarks/RESULTS.md, issue 3).  A compile failure falls back to eager with a warning.
    """

    def __init__(self, enabled: bool, entry: str = "features") -> None:
        self.enabled = enabled
        self.entry = entry  # the module method to run: "features" (DM) or "forward" (logits, CAFE's readings)
        self.module: nn.Module | None = None
        self._compiled: CompiledOrEager | None = None

    def bind(self, net: nn.Module) -> Callable[[Tensor], Tensor]:
        """The ``entry`` function with ``net``'s current parameters, buffers and train/eval mode."""
        if not self.enabled:
            return getattr(net, self.entry)
        if self.module is None or type(self.module) is not type(net):
            # channels-last suits the compiled graph (fused NHWC normalisation), unlike the eager GroupNorm
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


# ------------------------------------------------------------------------------------------------------- method
@dataclass
class _Draw:
    """Everything one DM iteration samples: the embedder, the real class means, the siamese parameters."""

    net: nn.Module
    real_means: Tensor  # [K, D], no graph
    params: list[Params]
    #: ``net.features``, or the compiled forward bound to ``net``'s parameters (the synthetic branch uses it too)
    features: Callable[[Tensor], Tensor]


class DMDistiller(Distiller):
    """Distribution matching with fresh random embedders (``ddkit distill --method dm``)."""

    name: ClassVar[str] = "dm"
    Config: ClassVar[type[DistillConfig]] = DMConfig

    def __init__(self, config: DMConfig | None = None, *, device: str | torch.device = "cpu") -> None:
        super().__init__(config, device=device)
        self.aug: DSA = DSA.from_strategy(None)
        self.encoder = CompiledEmbedder(False)
        self._syn_labels: Tensor | None = None
        self._syn_row_class: Tensor | None = None

    @classmethod
    def default_config(cls, dataset: str, ipc: int) -> DMConfig:
        """``main_DM.py`` defaults; lr_img 10 for CIFAR-10 at IPC >= 100 (DM README: "--lr_img 10 for
        --ipc = 100/200/500/1000/1250"; CIFAR-100 keeps 1 at every IPC)."""
        config = DMConfig()
        if dataset.lower().replace("-", "") == "cifar10" and ipc >= LARGE_IPC:
            config.lr_img = LARGE_IPC_LR_IMG
        return config

    # ------------------------------------------------------------------ lifecycle
    def setup(self, real: RealData, syn: SyntheticSet, generator: torch.Generator) -> None:
        cfg: DMConfig = self.config  # type: ignore[assignment]
        super().setup(real, syn, generator)
        self.aug = resolve_dsa(cfg.dsa_strategy, real.name)
        self.encoder = CompiledEmbedder(resolve_compile(cfg.compile, self.device, syn.images.dtype,
                                                          long_run=self.planned_iterations() >= 1000))
        hard = syn.hard_labels().long()
        self._syn_row_class = hard.cpu()
        self._syn_labels = hard.to(self.device)

    # ------------------------------------------------------------------ the objective
    def draw(self, real: RealData, syn: SyntheticSet, generator: torch.Generator) -> _Draw:
        """Sample the embedder, the real batch and the siamese parameters; reduce the real batch to class means.

        The order of draws from ``generator`` (network, real indices, augmentation) is fixed, so a resumed run
        repeats exactly.
        """
        cfg: DMConfig = self.config  # type: ignore[assignment]
        dtype = syn.images.dtype
        net = frozen_embedder(self, real, generator, dtype, cfg.channels_last)
        batch = sample_per_class(real, cfg.batch_real, generator, self.device)
        params = sample_class_params(self.aug, real.num_classes, generator, self.device)
        chunk = chunk_size(cfg.real_chunk, tuple(batch.images.shape), self.device, has_batchnorm(net),
                           compiled=self.encoder.enabled, fused=fuses_pooling(net))
        features = self.encoder.bind(net)
        real_means = real_feature_means(features, batch, self.aug, params, real.num_classes, chunk,
                                        dtype, cfg.channels_last)
        return _Draw(net, real_means, params, features)

    def syn_means(self, draw: _Draw, images: Tensor, labels: Tensor, row_class: Tensor, num_classes: int) -> Tensor:
        """Class means of the augmented synthetic embeddings (with graph)."""
        cfg: DMConfig = self.config  # type: ignore[assignment]
        x = augment_by_class(self.aug, images, row_class, draw.params)
        features = draw.features
        pixels = FUSED_CHUNK_PIXELS if fuses_pooling(draw.net) else CPU_CHUNK_PIXELS
        chunk = cpu_chunk(tuple(x.shape), self.device, pixels)
        if self.encoder.enabled and chunk is not None and not has_batchnorm(draw.net):
            # cache-sized passes, as on the real branch (exact: samples are independent without batch norm)
            features = ChunkedForward(features, chunk)
        feats = features(to_layout(x, cfg.channels_last))
        return class_means(feats, labels, num_classes)

    def loss(self, it: int, real: RealData, syn: SyntheticSet, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        draw = self.draw(real, syn, generator)
        assert self._syn_labels is not None and self._syn_row_class is not None, "setup() must run first"
        means = self.syn_means(draw, syn.images, self._syn_labels, self._syn_row_class, real.num_classes)
        loss = ((draw.real_means - means) ** 2).sum()
        # the official log prints the loss divided by the number of classes
        return loss, {"loss_per_class": float(loss.detach()) / real.num_classes}

    def step(self, it: int, real: RealData, syn: SyntheticSet, generator: torch.Generator) -> dict[str, float]:
        cfg: DMConfig = self.config  # type: ignore[assignment]
        if not cfg.per_class_step:
            return super().step(it, real, syn, generator)
        assert self.optimizer is not None and self._syn_row_class is not None, "setup() must run first"
        draw = self.draw(real, syn, generator)
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for c in range(real.num_classes):
            rows = torch.nonzero(self._syn_row_class == c).flatten()
            if rows.numel() == 0:
                continue
            images = syn.images[rows.to(self.device)]
            local = torch.zeros(rows.numel(), dtype=torch.long)
            x = augment_by_class(self.aug, images, local, [draw.params[c]])
            mean = draw.features(to_layout(x, cfg.channels_last)).mean(0)
            loss_c = ((draw.real_means[c] - mean) ** 2).sum()
            loss_c.backward()  # frees this class's graph before the next class is built
            total += float(loss_c.detach())
        self.optimizer.step()
        return {"loss": total, "loss_per_class": total / real.num_classes}


#: Input pixels per augmentation call on the real branch (256 Fashion-MNIST images).  A DSA op costs mostly per
#: call (a few small kernels, a grid sample), so the real batch is augmented in blocks this large and only then
#: forwarded in cache-sized chunks: augmenting 2,560 images in chunks of 16 took 0.17-0.4 s against 0.06-0.07 s
#: in blocks of 256 (one thread), several percent of a DM iteration.
AUG_BLOCK_PIXELS = 256 * 28 * 28


def augmented_chunks(aug: DSA, batch: ClassBatch, params: list[Params], chunk: int, dtype: torch.dtype,
                     channels_last: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    """``(labels, augmented images)`` for consecutive chunks of ``chunk`` rows of ``batch``.

    Augmentation runs per block of whole chunks (about :data:`AUG_BLOCK_PIXELS` pixels), which gives the same
    images as augmenting chunk by chunk (each row gets its class's parameters either way) with fewer calls; the
    chunk boundaries are those of ``range(0, total, chunk)`` whatever the block.
    """
    total = batch.images.shape[0]
    pixels = max(1, batch.images.shape[-1] * batch.images.shape[-2])
    block = max(1, AUG_BLOCK_PIXELS // pixels // chunk) * chunk
    for start in range(0, total, block):
        stop = min(start + block, total)
        x = augment_by_class(aug, batch.images[start:stop].to(dtype), batch.row_class[start:stop], params)
        x = to_layout(x, channels_last)
        for first in range(start, stop, chunk):
            last = min(first + chunk, stop)
            yield batch.labels[first:last], x[first - start:last - start]


@torch.no_grad()
def real_feature_means(features: Callable[[Tensor], Tensor], batch: ClassBatch, aug: DSA, params: list[Params],
                       num_classes: int, chunk: int, dtype: torch.dtype, channels_last: bool) -> Tensor:
    """Per-class mean embedding of the augmented real batch, computed chunk by chunk without a graph.

    Real images are constants of the objective, so nothing about them needs to be kept for backward; summing
    embeddings per class chunk by chunk bounds memory by the chunk, whatever ``batch_real`` is.
    """
    sums: Tensor | None = None
    for labels, x in augmented_chunks(aug, batch, params, chunk, dtype, channels_last):
        feats = features(x)
        if sums is None:
            sums = feats.new_zeros((num_classes, feats.shape[1]))
        sums.index_add_(0, labels, feats)
    assert sums is not None, "empty real batch"
    counts = batch.counts.clamp_min(1).to(device=sums.device, dtype=sums.dtype)
    return sums / counts.view(-1, 1)


METHODS.register("dm", obj=DMDistiller)
