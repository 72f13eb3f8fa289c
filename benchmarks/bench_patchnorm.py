"""ConvNet-3 with and without the first stage's patch-statistics instance norm (``ddkit.accel.patchnorm``), CPU.

Variants: ``plain`` (the ``Conv2d`` / ``GroupNorm`` modules, as ``create_model`` builds them), ``shortcut``
(``patchnorm.install(net, fuse_pooling=False)``: the batched product, then the stage's activation and pooling
modules), ``fused`` (``patchnorm.install(net)``, what ``speed=auto`` runs on CPU: compiled graphs compute the
pooled map directly, ``conv_instance_norm_pool``; eagerly the same as ``shortcut``).

    python -m benchmarks.bench_patchnorm --rounds 10

One process, ``keep_freed_memory`` on (as the CLI runs).  For every workload the networks (same weights) run
in alternating order each round, so both see the same machine state; prints the median seconds and the ratio
and writes ``benchmarks/_work/patchnorm.json``.  Workloads: what DC/DSA's inner updates and the evaluation
protocol run (SGD steps on 100 / 256 images, compiled and eager), what DM's real branch runs (a compiled no-grad
forward of 2,560 images in chunks of 16), and a CIFAR-shaped step (27 values per patch instead of 9).
"""
from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from .common import interleaved_times, save_json

WORK = Path(__file__).resolve().parent / "_work"

#: name -> (channels, image side, images, compiled, training step)
WORKLOADS: dict[str, tuple[int, int, int, bool, bool]] = {
    "compiled step, 100 images (DC inner update)": (1, 28, 100, True, True),
    "compiled step, 256 images (evaluation batch)": (1, 28, 256, True, True),
    "eager step, 100 images": (1, 28, 100, False, True),
    "compiled no-grad forward, 2560 images in chunks of 16 (DM real branch)": (1, 28, 2560, True, False),
    "compiled step, 100 CIFAR-shaped images": (3, 32, 100, True, True),
}


#: variant -> (patch-statistics stage installed, fuse_pooling)
VARIANTS = {"plain": (False, False), "shortcut": (True, False), "fused": (True, True)}


def workload(channels: int, side: int, n: int, compiled: bool, train: bool, variant: str,
             chunk: int = 16) -> Callable[[], None]:
    from ddkit.accel import patchnorm
    from ddkit.accel.compiled import ChunkedForward, CompiledOrEager
    from ddkit.models import create_model

    torch.manual_seed(0)
    net = create_model("convnet", channels=channels, num_classes=10, image_size=(side, side))  # plain modules
    installed, fuse_pooling = VARIANTS[variant]
    if installed:
        patchnorm.install(net, fuse_pooling=fuse_pooling)
    x = torch.randn(n, channels, side, side)
    y = torch.randint(0, 10, (n,))
    forward = CompiledOrEager(net) if compiled else net
    if not train:
        chunked = ChunkedForward(forward, chunk)

        def run() -> None:
            with torch.no_grad():
                chunked(x)
        return run
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)

    def step() -> None:
        loss = F.cross_entropy(forward(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main(argv: list[str] | None = None) -> None:
    from ddkit.accel import keep_freed_memory

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    results = {}
    for name, spec in WORKLOADS.items():
        runs = {label: workload(*spec, variant=label) for label in VARIANTS if spec[3] or label != "fused"}
        if not spec[4]:  # the fused stage writes no full-resolution map, so larger chunks no longer spill the cache
            runs["fused, chunks of 64"] = workload(*spec, variant="fused", chunk=64)
        times = interleaved_times(runs, args.rounds, args.warmup)
        med = {label: statistics.median(t) for label, t in times.items()}
        results[name] = {"times": times, "median_s": med,
                         "ratio_to_plain": {label: m / med["plain"] for label, m in med.items()}}
        print(f"{name}: " + ", ".join(f"{label} {m:.3f} s ({m / med['plain']:.3f}x)" for label, m in med.items()),
              flush=True)
    save_json(WORK, "patchnorm", {"rounds": args.rounds, "threads": args.threads, "torch": torch.__version__,
                                  "results": results})


if __name__ == "__main__":
    main()
