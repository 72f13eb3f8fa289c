"""FRePo on Fashion-MNIST (CPU): seconds per iteration, peak memory, and accuracy under both protocols.

Each measurement runs in a fresh process (peak RSS is per process) under the shared lock::

    flock /tmp/ddkit-bench.lock python -m benchmarks.bench_frepo run --ipc 1 --iters 100
    flock /tmp/ddkit-bench.lock python -m benchmarks.bench_frepo run --ipc 10 --iters 100
    python -m benchmarks.bench_frepo report        # the markdown table for RESULTS.md

``run`` distills with ``frepo``'s defaults (``script/distill.py``: 10 pool networks reset after 100 updates,
real batch 1024, LAMB lr 3e-4 with cosine decay over 500,000 iterations, learned labels, no ZCA on
Fashion-MNIST) unless told otherwise (``--set '{"lr_img": 0.003}'``), records the median seconds per iteration
and the peak RSS, then scores the real-image initialisation and the distilled set with

- the field's protocol (fresh ConvNet-3, SGD, ``--epochs`` epochs, DSA; FRePo's learned regression labels are
  trained with the squared error), and
- the ``frepo`` protocol (FRePo's ``eval.py``: ConvNet without normalisation, Adam 3e-4, warm-up then cosine,
  1000 / 2000 steps at 10 / 100 images).

The official FRePo code is JAX/Flax with TensorFlow data loading; it is not run here, so the comparison is with
the paper's numbers (FRePo Tab. 1, anchors.md 1b: Fashion-MNIST 75.6 / 86.2 at IPC 1 / 10 after 500,000
iterations).  Full-budget commands for a GPU are printed by ``report``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from .common import peak_rss_mib

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "results" / "frepo"
DATA = os.environ.get("DDKIT_DATA", str(ROOT.parent.parent / "shared" / "data"))

#: FRePo Tab. 1 (anchors.md 1b, [R]): Fashion-MNIST, ConvNet, FRePo's own evaluation, 500k distillation steps.
PAPER = {1: "75.6 ± 0.3", 10: "86.2 ± 0.2", 50: "89.6 ± 0.1"}

GPU_COMMANDS = """\
ddkit distill --method frepo --dataset fashion-mnist --ipc {ipc} --data-root DATA --device cuda \\
    --out runs/frepo_fm{ipc}                               # 500,000 iterations (README --num_train_steps)
ddkit evaluate runs/frepo_fm{ipc} --protocol frepo --device cuda     # FRePo eval.py: 5 x {steps} steps
ddkit evaluate runs/frepo_fm{ipc} --device cuda                      # the field's protocol: 5 x 1000 epochs"""


def cmd_run(args: argparse.Namespace) -> None:
    from ddkit.data import load_dataset
    from ddkit.engine import distill, make_generator
    from ddkit.engine.callbacks import Callback
    from ddkit.evaluation import EvalProtocol, evaluate
    from ddkit.methods import create_distiller
    from ddkit.synthetic import SyntheticSet

    torch.set_num_threads(args.threads)
    overrides = json.loads(args.set) if args.set else {}
    real = load_dataset("fashion-mnist", args.data_root)
    distiller = create_distiller("frepo", dataset="fashion-mnist", ipc=args.ipc)
    for key, value in overrides.items():
        if not hasattr(distiller.config, key):
            raise SystemExit(f"frepo has no option {key!r}")
        setattr(distiller.config, key, value)
    syn = SyntheticSet.from_real(real, args.ipc, make_generator(args.seed, "init"), soft_labels=True,
                                 learn_labels=distiller.config.learn_labels)

    class Record(Callback):
        def __init__(self) -> None:
            self.rows: list[dict[str, float]] = []

        def on_iteration_end(self, state) -> None:
            self.rows.append({k: float(v) for k, v in state.metrics.items()})

    record = Record()
    rss_before = peak_rss_mib()
    t0 = time.perf_counter()
    distill(distiller, real, syn, iterations=args.iters, seed=args.seed, callbacks=[record])
    distill_s = time.perf_counter() - t0
    peak_distill = peak_rss_mib()
    secs = [r["seconds"] for r in record.rows]
    steady = secs[min(args.warmup, len(secs) - 1):] or secs

    accs: dict[str, dict[str, list[float]]] = {}
    init = SyntheticSet.from_real(real, args.ipc, make_generator(args.seed, "init"))
    protocols = {"field": EvalProtocol(runs=args.runs, epochs=args.epochs),
                 "frepo": EvalProtocol.named("frepo", runs=args.runs)}
    eval_s: dict[str, float] = {}
    for name, protocol in protocols.items():
        if args.runs <= 0 or name not in args.protocols.split(","):
            continue
        t1 = time.perf_counter()
        accs[name] = {"init": [r.accuracy for r in evaluate(init, real, protocol, seed=args.seed).rows],
                      "after": [r.accuracy for r in evaluate(syn, real, protocol, seed=args.seed).rows]}
        eval_s[name] = time.perf_counter() - t1
    cfg = distiller.config
    result: dict[str, Any] = {
        "ipc": args.ipc, "iters": args.iters, "seed": args.seed, "overrides": overrides,
        "config": {k: getattr(cfg, k) for k in ("model", "batch_real", "num_models", "max_online_updates",
                                                "lr_img", "optimizer", "iterations", "flip")},
        "median_s": statistics.median(steady), "seconds": secs, "distill_s": distill_s,
        "peak_rss_mib_distill": peak_distill, "peak_rss_mib_before": rss_before,
        "kernel_loss": [r.get("kernel_loss") for r in record.rows], "krr_acc": [r.get("krr_acc") for r in record.rows],
        "accuracy": accs, "protocols": {k: p.to_json() for k, p in protocols.items() if k in accs},
        "eval_s": eval_s,
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or "?",
                    "load_avg_at_start": os.getloadavg()},
    }
    from ddkit.io import atomic_write_json

    name = f"frepo_fm_ipc{args.ipc}_it{args.iters}" + (f"_{args.tag}" if args.tag else "")
    path = atomic_write_json(WORK / f"{name}.json", result)
    print(path)
    print(json.dumps({"median_s": result["median_s"], "peak_rss_mib": peak_distill, "accuracy": accs}))


def _ms(xs: list[float]) -> str:
    if not xs:
        return "–"
    return f"{statistics.fmean(xs):.1f} ± {statistics.pstdev(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"


def cmd_report(args: argparse.Namespace) -> None:
    from ddkit.evaluation.protocol import frepo_steps

    rows = []
    for path in sorted(WORK.glob("*.json")):
        row = json.loads(path.read_text())
        # runs tagged acc* ran niced beside other jobs for their accuracy only: their s/it is not a timing
        row["timed"] = "_acc" not in path.stem
        rows.append(row)
    lines = ["| IPC | iterations (settings) | s/it (median) | peak RSS MiB | field protocol: init -> after |"
             " frepo protocol: init -> after | paper (500k it, frepo protocol) |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["ipc"], r["iters"], json.dumps(r["overrides"]))):
        cells = []
        for name in ("field", "frepo"):
            acc = r["accuracy"].get(name)
            if not acc:
                cells.append("not run")
                continue
            p = r["protocols"][name]
            budget = f"{p['epochs']} ep" if p.get("steps") is None else f"{frepo_steps(10 * r['ipc'])} steps"
            cells.append(f"{_ms(acc['init'])} -> {_ms(acc['after'])} ({p['runs']} x {budget})")
        settings = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "defaults"
        speed = f"{r['median_s']:.2f}" if r["timed"] else "(not timed)"
        lines.append(f"| {r['ipc']} | {r['iters']} ({settings}; real batch {r['config']['batch_real']}) | {speed} | "
                     f"{r['peak_rss_mib_distill']:.0f} | {cells[0]} | {cells[1]} | {PAPER.get(r['ipc'], '–')} |")
    print("\n".join(lines))
    print()
    for ipc in (1, 10):
        print(GPU_COMMANDS.format(ipc=ipc, steps=frepo_steps(10 * ipc)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run")
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--warmup", type=int, default=2, help="first iterations left out of the median")
    p.add_argument("--runs", type=int, default=2, help="fresh networks per set and protocol (0: no evaluation)")
    p.add_argument("--epochs", type=int, default=300, help="epochs of the field's protocol (paper: 1000)")
    p.add_argument("--protocols", default="field,frepo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-root", default=DATA)
    p.add_argument("--set", default="", help='JSON FRePoConfig overrides, e.g. \'{"lr_img": 0.003}\'')
    p.add_argument("--tag", default="")
    p.set_defaults(func=cmd_run)
    r = sub.add_parser("report")
    r.set_defaults(func=cmd_report)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
