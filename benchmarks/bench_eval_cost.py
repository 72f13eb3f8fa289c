"""Evaluation cost: seconds and peak memory per evaluated model (Fashion-MNIST, IPC 10, 300 epochs, CPU).

Reference (anchors.md section R): the official ``evaluate_synset`` takes about 90 s per ConvNet at 300 epochs on
this machine kind.  Each measurement runs in a fresh process; the figure is the median over models.

    python -m benchmarks.bench_eval_cost [--models 3] [--epochs 300] [--variant ddkit|official]

``ddkit`` is ``ddkit evaluate`` as it ships (``EvalProtocol(speed="auto")``: the speed layer's compile rule and
chunks); ``official`` re-states ``evaluate_synset`` with plain modules.  For the official code itself, score the
same set (``ddkit distill --method random --dataset fashion-mnist --ipc 10 --seed 0``) with
``/work/shared/refbench/official-eval.py`` (see its README).
"""
from __future__ import annotations

import argparse
import json
import time

REFERENCE_SECONDS = 90.0


def child(args) -> None:
    import torch

    torch.set_num_threads(2)
    from ddkit import load_dataset
    from ddkit.api import distill
    from ddkit.evaluation import EvalProtocol, evaluate

    from .common import DEFAULT_DATA, allocator_as_run, peak_rss_mib

    # the allocator each program runs with: `ddkit evaluate` keeps freed memory, the official script does not
    allocator_as_run("official" if args.variant == "official" else "ddkit")
    real = load_dataset("fashion-mnist", args.data_root or DEFAULT_DATA)
    syn = distill(real, "random", ipc=10, seed=args.seed, device="cpu")
    if args.variant == "official":
        start = time.perf_counter()
        acc = official_evaluate(syn.images.detach(), syn.hard_labels(), real, args.epochs, args.seed)
        print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mib": peak_rss_mib(), "accuracy": acc}))
        return
    protocol = EvalProtocol(runs=1, epochs=args.epochs)  # speed="auto", as `ddkit evaluate` runs
    start = time.perf_counter()
    report = evaluate(syn, real, protocol, seed=args.seed, device="cpu")
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak_rss_mib(),
                      "accuracy": report.summary()["convnet"]["mean"]}))


def official_evaluate(images, labels, real, epochs: int, seed: int) -> float:
    """``evaluate_synset`` of the official DC/DSA/DM code, re-stated as plainly as it is written there, as a
    same-machine baseline: the official ``ConvNet`` layer stack (GroupNorm as instance norm, in-place ReLU),
    a shuffling DataLoader of batch 256, DSA on every batch, SGD(0.01, 0.9, 5e-4), lr x0.1 after half of the
    epochs, then the test split through a DataLoader of batch 256."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from ddkit.augment import DSA
    from ddkit.engine import make_generator

    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    channels = real.channels
    for depth in range(3):
        layers += [nn.Conv2d(channels, 128, 3, padding=3 if depth == 0 and real.image_size[0] == 28 else 1),
                   nn.GroupNorm(128, 128, affine=True), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2)]
        channels = 128
    net = nn.Sequential(*layers, nn.Flatten(), nn.LazyLinear(real.num_classes))
    net(images[:1])
    aug = DSA.from_strategy("color_crop_cutout_flip_scale_rotate")
    gen = make_generator(seed, "official-eval")
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    train = DataLoader(TensorDataset(images, labels), batch_size=256, shuffle=True)
    test = DataLoader(TensorDataset(real.test_images, real.test_labels), batch_size=256, shuffle=False)
    loss_fn = nn.CrossEntropyLoss()
    net.train()
    for ep in range(epochs + 1):  # official: range(Epoch + 1), decay at Epoch // 2
        if ep == epochs // 2:
            for g in opt.param_groups:
                g["lr"] *= 0.1
        for x, y in train:
            loss = loss_fn(net(aug(x, gen)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    correct = 0
    with torch.no_grad():
        for x, y in test:
            correct += int((net(x).argmax(1) == y).sum())
    return 100.0 * correct / len(real.test_labels)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", type=int, default=3)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--variant", default="ddkit", choices=("ddkit", "official"),
                   help="ddkit: EvalProtocol as shipped (speed=auto); official: evaluate_synset re-stated")
    p.add_argument("--data-root")
    p.add_argument("--child", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.child:
        return child(args)
    from .common import median, run_child, save_results

    rows = []
    for seed in range(args.models):
        argv = ["-m", "benchmarks.bench_eval_cost", "--child", "--epochs", str(args.epochs), "--seed", str(seed),
                "--variant", args.variant] + (["--data-root", args.data_root] if args.data_root else [])
        rows.append(run_child(argv))
        print(rows[-1], flush=True)
    secs = median([r["seconds"] for r in rows])
    result = {"variant": args.variant, "epochs": args.epochs, "rows": rows, "median_seconds": secs,
              "median_peak_rss_mib": median([r["peak_rss_mib"] for r in rows]),
              "reference_seconds": REFERENCE_SECONDS, "ratio": secs / REFERENCE_SECONDS}
    save_results(f"eval_cost_{args.variant}", result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
