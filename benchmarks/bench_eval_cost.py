"""Evaluation cost: seconds and peak memory per evaluated model (Fashion-MNIST, IPC 10, 300 epochs, CPU).

Reference (anchors.md section R): the official ``evaluate_synset`` takes about 90 s per ConvNet at 300 epochs on
this machine kind.  Each measurement runs in a fresh process; the figure is the median over models.

    python -m benchmarks.bench_eval_cost [--models 3] [--epochs 300] [--variant plain|channels_last]
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

    from .common import DEFAULT_DATA, peak_rss_mib

    real = load_dataset("fashion-mnist", args.data_root or DEFAULT_DATA)
    syn = distill(real, "random", ipc=10, seed=args.seed, device="cpu")
    protocol = EvalProtocol(runs=1, epochs=args.epochs, channels_last=args.variant == "channels_last")
    start = time.perf_counter()
    report = evaluate(syn, real, protocol, seed=args.seed, device="cpu")
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak_rss_mib(),
                      "accuracy": report.summary()["convnet"]["mean"]}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", type=int, default=3)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--variant", default="plain")
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
