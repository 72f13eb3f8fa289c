"""Baseline table: whole dataset, random, herding, k-center at IPC 1/10/50 with ConvNet-3 on Fashion-MNIST and
MNIST, beside the DC paper's rows (anchors.md §1a).

CPU budget (stated in RESULTS.md beside every figure): each set is scored by ``--runs`` fresh ConvNets trained
``--epochs`` epochs with DSA (the library's protocol), on the full 10k test split; herding/k-center embed with a
ConvNet trained ``--feature-epochs`` epochs on the real training set; the whole-dataset row trains
``--full-epochs`` epochs.  Results accumulate in ``benchmarks/results/baselines.json`` (re-running skips finished
cells, so an interrupted run resumes).  The full protocol is ``--runs 5 --epochs 1000`` (and 300 for DC's no-DSA
protocol), ready for a GPU with ``--device cuda``.

    python -m benchmarks.bench_baselines --datasets fashion-mnist,mnist --ipcs 1,10,50 --runs 2 --epochs 300
"""
from __future__ import annotations

import argparse
import time

# DC paper Tab. 1 (anchors.md §1a): mean ± std at IPC 1 / 10 / 50
PAPER = {
    ("mnist", "whole"): "99.6 ± 0.0",
    ("fashion-mnist", "whole"): "93.5 ± 0.1",
    ("mnist", "random"): ["64.9 ± 3.5", "95.1 ± 0.9", "97.9 ± 0.2"],
    ("mnist", "herding"): ["89.2 ± 1.6", "93.7 ± 0.3", "94.8 ± 0.2"],
    ("fashion-mnist", "random"): ["51.4 ± 3.8", "73.8 ± 0.7", "82.5 ± 0.7"],
    ("fashion-mnist", "herding"): ["67.0 ± 1.9", "71.1 ± 0.7", "71.9 ± 0.8"],
}


def main() -> None:
    import torch

    from ddkit import load_dataset
    from ddkit.api import distill
    from ddkit.evaluation import EvalProtocol, evaluate, evaluate_tensors

    from .common import DEFAULT_DATA, RESULTS, load_results, save_results

    p = argparse.ArgumentParser()
    p.add_argument("--datasets", default="fashion-mnist,mnist")
    p.add_argument("--methods", default="random,herding,kcenter")
    p.add_argument("--ipcs", default="1,10,50")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--feature-epochs", type=int, default=1)
    p.add_argument("--full-epochs", type=int, default=2)
    p.add_argument("--full-runs", type=int, default=1)
    p.add_argument("--skip-full", action="store_true")
    p.add_argument("--data-root", default=DEFAULT_DATA)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tag", default="baselines")
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 when the machine is shared)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = load_results(args.tag)
    protocol = EvalProtocol(runs=args.runs, epochs=args.epochs)
    for ds in args.datasets.split(","):
        real = load_dataset(ds, args.data_root)
        if not args.skip_full and f"{ds}/whole" not in results:
            start = time.perf_counter()
            full = EvalProtocol(runs=args.full_runs, epochs=args.full_epochs)
            rep = evaluate_tensors(real.train_images, real.train_labels, real, full, seed=0, method="whole",
                                   device=args.device)
            results[f"{ds}/whole"] = {"accs": rep.summary()["convnet"]["accs"], "epochs": args.full_epochs,
                                      "runs": args.full_runs, "seconds": time.perf_counter() - start}
            save_results(args.tag, results)
            print(ds, "whole", results[f"{ds}/whole"], flush=True)
        for method in args.methods.split(","):
            for ipc in [int(i) for i in args.ipcs.split(",")]:
                key = f"{ds}/{method}/{ipc}"
                if key in results:
                    continue
                start = time.perf_counter()
                opts = {} if method == "random" else {
                    "feature_epochs": args.feature_epochs,
                    # one feature network per dataset serves herding and k-center at every IPC
                    "embedding_cache": str(RESULTS.parent / "_work" / f"embeddings_{ds}_fe{args.feature_epochs}.safetensors")}
                syn = distill(real, method, ipc=ipc, seed=0, device=args.device, **opts)
                t_select = time.perf_counter() - start
                rep = evaluate(syn, real, protocol, seed=0, device=args.device)
                results[key] = {"accs": rep.summary()["convnet"]["accs"], "epochs": args.epochs, "runs": args.runs,
                                "select_seconds": t_select, "seconds": time.perf_counter() - start}
                save_results(args.tag, results)
                print(key, results[key], flush=True)
    print(markdown(results))


def cell(result: dict | None) -> str:
    """mean ± std with the cell's budget (runs x epochs), or a dash."""
    from .common import mean_std

    if not result:
        return "–"
    return f"{mean_std(result['accs'])} ({result['runs']}x{result['epochs']} ep)"


def markdown(results: dict) -> str:
    from .common import mean_std

    lines = ["| dataset | row | IPC 1 (ours) | IPC 10 (ours) | IPC 50 (ours) | DC paper 1 / 10 / 50 |",
             "|---|---|---|---|---|---|"]
    for ds in ("fashion-mnist", "mnist"):
        if f"{ds}/whole" in results:
            r = results[f"{ds}/whole"]
            lines.append(f"| {ds} | whole dataset ({r['epochs']} ep, {r['runs']} run) | {mean_std(r['accs'])} | | | "
                         f"{PAPER.get((ds, 'whole'), '–')} |")
        for method in ("random", "herding", "kcenter"):
            cells = [cell(results.get(f"{ds}/{method}/{i}")) for i in (1, 10, 50)]
            paper = PAPER.get((ds, method))
            # the DC paper's only k-center row is CIFAR-10's
            missing = "– (CIFAR-10 only: 21.5 / 14.7 / 27.0)" if method == "kcenter" else "–"
            lines.append(f"| {ds} | {method} | {' | '.join(cells)} | {' / '.join(paper) if paper else missing} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
