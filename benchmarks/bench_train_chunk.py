"""Compiled ConvNet-3 training steps on Fashion-MNIST shapes: whole batch against chunks of it (CPU).

    python -m benchmarks.bench_train_chunk --batch 100 --chunks 100,25,20 --rounds 24
    python -m benchmarks.bench_train_chunk --batch 256 --chunks 256,64,32,16 --rounds 16

One process; every variant shares the compiled graphs of one network and its optimizer; each round runs one SGD
step of every variant, in alternating order, so that all variants see the same machine state (this VM drifts by
10-20 %).  Prints the median seconds per step and writes ``benchmarks/_work/train_chunk_b{batch}_{allocator}.json``.  The
chunked variants compute the same step (no batch norm in ConvNet-3); this is what chose
``ddkit.accel.compiled.CPU_TRAIN_CHUNK_PIXELS``.  The network is the one ddkit runs on CPU (``speed=auto``): the
patch-statistics first stage swapped in (``ddkit.accel.patchnorm.install``).
"""
from __future__ import annotations

import argparse
import statistics
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from .common import interleaved_times, save_json

WORK = Path(__file__).resolve().parent / "_work"


def main(argv: list[str] | None = None) -> None:
    from ddkit.accel import patchnorm
    from ddkit.accel.compiled import ChunkedForward, CompiledOrEager
    from ddkit.models import create_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--chunks", default="100,25,20", help="comma-separated images per pass (batch = whole)")
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--allocator", choices=["keep", "default"], default="keep",
                        help="keep: ddkit.accel.keep_freed_memory(), as the CLI runs; default: glibc's defaults")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.allocator == "keep":
        from ddkit.accel import keep_freed_memory

        keep_freed_memory()
    torch.manual_seed(0)
    net = patchnorm.install(create_model("convnet", channels=1, num_classes=10, image_size=(28, 28)))
    x = torch.randn(args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch,))
    compiled = CompiledOrEager(net)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    chunks = [int(c) for c in args.chunks.split(",")]
    forwards = {c: compiled if c >= args.batch else ChunkedForward(compiled, c) for c in chunks}

    def step(forward) -> None:
        loss = F.cross_entropy(forward(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times = interleaved_times({c: partial(step, f) for c, f in forwards.items()}, args.rounds, args.warmup)
    medians = {c: statistics.median(t) for c, t in times.items()}
    for c in chunks:
        print(f"chunk {c:4d}: median {medians[c]:.4f} s per step of {args.batch} images "
              f"({medians[c] / medians[chunks[0]]:.3f}x the first)")
    save_json(WORK, f"train_chunk_b{args.batch}_{args.allocator}", {"batch": args.batch, "allocator": args.allocator, "rounds": args.rounds, "times": times,
                                                   "medians": medians, "torch": torch.__version__,
                                                   "threads": args.threads})


if __name__ == "__main__":
    main()
