"""CPU speed levers on ConvNet-3 with Fashion-MNIST shapes: eager, torch.compile, channels-last, bf16 autocast.

Two workloads, each timed side by side in one process (medians of ``--repeats``, after one warm-up call that
includes the compile):

- a training step (forward, backward, SGD) on 100 images: the evaluation protocol at IPC 10 and DC's inner loop;
  and on 256 images (the protocol's batch at IPC >= 26, herding/k-center's feature network), whole or in the
  library's cache-sized chunks of 16 (``ddkit.accel.compiled.forward_of``);
- a no-grad forward of 2560 images (10 classes x 256): DM's real branch, in batches of 256 or chunks of 16.

The network is the one ddkit runs on CPU (``speed=auto``): ConvNet-3 with the patch-statistics first stage
swapped in (``ddkit.accel.patchnorm.install``).

    python -m benchmarks.bench_levers [--repeats 5] [--skip-bf16]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (compiles)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-bf16", action="store_true")
    args = p.parse_args()

    import torch
    import torch.nn.functional as F

    from ddkit.accel import patchnorm
    from ddkit.models import create_model

    torch.set_num_threads(args.threads)
    cl = torch.channels_last

    def net(channels_last: bool = False, frozen: bool = False):
        m = patchnorm.install(create_model("convnet", channels=1, image_size=(28, 28), num_classes=10))
        m = m.to(memory_format=cl) if channels_last else m
        return m.requires_grad_(not frozen)

    batches = {n: (torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,))) for n in (100, 256)}
    big = torch.randn(2560, 1, 28, 28)
    results: dict[str, float] = {}

    from ddkit.accel.compiled import forward_of

    def train_step(channels_last: bool, compiled: bool, bf16: bool = False, n: int = 100,
                   chunk: int | None = None) -> Callable[[], None]:
        model = net(channels_last)
        fwd = forward_of(model, compiled, chunk)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        x, y = batches[n]
        xb = x.contiguous(memory_format=cl) if channels_last else x

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(fwd(xb), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return step

    def forward(channels_last: bool, compiled: bool, chunk: int) -> Callable[[], None]:
        model = net(channels_last, frozen=True)
        fwd = torch.compile(model.features, dynamic=False) if compiled else model.features
        parts = [c.contiguous(memory_format=cl) if channels_last else c for c in big.split(chunk)]

        def run() -> None:
            with torch.no_grad():
                for part in parts:
                    fwd(part)
        return run

    results["train step, eager"] = timed(train_step(False, False), args.repeats)
    results["train step, compiled"] = timed(train_step(False, True), args.repeats)
    results["train step, compiled + channels-last"] = timed(train_step(True, True), args.repeats)
    for compiled in (False, True):
        for chunk in (None, 16):
            name = f"train step 256, {'compiled' if compiled else 'eager'}, {'chunks of 16' if chunk else 'whole batch'}"
            results[name] = timed(train_step(False, compiled, n=256, chunk=chunk), args.repeats)
    if not args.skip_bf16:
        results["train step, eager bf16 autocast"] = timed(train_step(False, False, bf16=True), 1)
    results["forward 2560, eager, batches of 256"] = timed(forward(False, False, 256), args.repeats)
    results["forward 2560, compiled, batches of 256"] = timed(forward(False, True, 256), args.repeats)
    results["forward 2560, compiled + channels-last, chunks of 64"] = timed(forward(True, True, 64), args.repeats)
    results["forward 2560, compiled + channels-last, chunks of 16"] = timed(forward(True, True, 16), args.repeats)
    for name, seconds in results.items():
        print(f"| {name} | {seconds:.3f} s |")
    from .common import save_results

    save_results("levers", results)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
