"""FRePo on Fashion-MNIST (CPU): seconds per iteration, peak memory, and accuracy under both protocols.

Each measurement runs in a fresh process (peak RSS is per process) under the shared lock, in chunks that each
fit a turn of the lock (the set is saved, and ``evaluate`` adds trained models to the result file one by one)::

    flock /tmp/ddkit-bench.lock python -m benchmarks.bench_frepo run --ipc 1 --iters 100 --runs 0
    flock /tmp/ddkit-bench.lock python -m benchmarks.bench_frepo evaluate frepo_fm_ipc1_it100 --protocol field \
        --which after,init --runs 2 --epochs 300
    flock /tmp/ddkit-bench.lock python -m benchmarks.bench_frepo evaluate frepo_fm_ipc1_it100 --protocol frepo \
        --which after,init --runs 2
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
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from .common import metrics_recorder, peak_rss_mib

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "frepo"  # one JSON per run (committed)
SETS = ROOT / "_work" / "frepo"  # the distilled sets, for ``evaluate`` and ``ddkit evaluate``
DATA = os.environ.get("DDKIT_DATA", str(ROOT.parent.parent / "shared" / "data"))

#: FRePo Tab. 1 (anchors.md 1b, [R]): Fashion-MNIST, ConvNet, FRePo's own evaluation, 500k distillation steps.
PAPER = {1: "75.6 ± 0.3", 10: "86.2 ± 0.2", 50: "89.6 ± 0.1"}

GPU_COMMANDS = """\
ddkit distill --method frepo --dataset fashion-mnist --ipc {ipc} --data-root DATA --device cuda \\
    --out runs/frepo_fm{ipc}                               # 500,000 iterations (README --num_train_steps)
ddkit evaluate runs/frepo_fm{ipc} --protocol frepo --device cuda     # FRePo eval.py: 5 x {steps} steps
ddkit evaluate runs/frepo_fm{ipc} --device cuda                      # the field's protocol: 5 x 1000 epochs"""


def _protocol(name: str, runs: int, epochs: int, steps: int | None):
    """The two protocols the table reports: the field's (``--epochs``) and FRePo's ``eval.py`` (its own steps)."""
    from ddkit.evaluation import EvalProtocol

    if name == "field":
        return EvalProtocol(runs=runs, epochs=epochs)
    if name == "frepo":
        return EvalProtocol.named("frepo", runs=runs, **({"steps": steps} if steps else {}))
    raise SystemExit(f"unknown protocol {name!r} (field or frepo)")


def _result_path(name: str) -> Path:
    path = RESULTS / f"{name}.json"
    if not path.exists():
        raise SystemExit(f"no result file {path}: run `bench_frepo run` first")
    return path


def cmd_run(args: argparse.Namespace) -> None:
    from ddkit.data import load_dataset
    from ddkit.engine import distill, make_generator
    from ddkit.io import atomic_write_json
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

    record = metrics_recorder()
    load_start = os.getloadavg()
    rss_before = peak_rss_mib()
    t0 = time.perf_counter()
    distill(distiller, real, syn, iterations=args.iters, seed=args.seed, callbacks=[record])
    distill_s = time.perf_counter() - t0
    peak_distill = peak_rss_mib()
    secs = [r["seconds"] for r in record.rows]
    steady = secs[min(args.warmup, len(secs) - 1):] or secs
    name = f"frepo_fm_ipc{args.ipc}_it{args.iters}" + (f"_{args.tag}" if args.tag else "")
    syn.meta.update({"method": "frepo", "ipc": args.ipc, "iterations": args.iters, "seed": args.seed})
    set_dir = syn.cpu().save(SETS / name)
    cfg = distiller.config
    result: dict[str, Any] = {
        "ipc": args.ipc, "iters": args.iters, "seed": args.seed, "overrides": overrides, "set": str(set_dir),
        "config": {k: getattr(cfg, k) for k in ("model", "batch_real", "num_models", "max_online_updates",
                                                "lr_img", "lr_final_ratio", "decay_iterations", "optimizer",
                                                "iterations", "flip")},
        "median_s": statistics.median(steady), "seconds": secs, "warmup": args.warmup, "distill_s": distill_s,
        "peak_rss_mib_distill": peak_distill, "peak_rss_mib_before": rss_before,
        "kernel_loss": [r.get("kernel_loss") for r in record.rows], "krr_acc": [r.get("krr_acc") for r in record.rows],
        "evals": {}, "protocols": {},
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or "?",
                    "load_avg_at_start": load_start, "load_avg_at_end": os.getloadavg()},
    }
    print(atomic_write_json(RESULTS / f"{name}.json", result))
    print(json.dumps({"median_s": result["median_s"], "peak_rss_mib": peak_distill}))
    if args.runs > 0:
        for protocol in args.protocols.split(","):
            _evaluate_into(name, protocol, ["after", "init"], args.runs, args.epochs, None, args.data_root, 0,
                           args.threads)


def _evaluate_into(name: str, protocol_name: str, which: list[str], runs: int, epochs: int, steps: int | None,
                   data_root: str, max_new: int, threads: int) -> None:
    """Train the models of ``protocol_name`` not yet in the result file on the distilled set ("after") or its
    real-image initialisation ("init"), writing the file after every model (a killed chunk keeps its models)."""
    from ddkit.data import load_dataset
    from ddkit.engine import make_generator
    from ddkit.evaluation import evaluate
    from ddkit.evaluation.report import Row
    from ddkit.io import atomic_write_json
    from ddkit.synthetic import SyntheticSet

    torch.set_num_threads(threads)
    path = _result_path(name)
    result = json.loads(path.read_text())
    protocol = _protocol(protocol_name, runs, epochs, steps)
    stored = result.setdefault("protocols", {}).get(protocol_name)
    budget = {k: v for k, v in protocol.to_json().items() if k != "runs"}
    if stored is not None and {k: v for k, v in stored.items() if k != "runs"} != budget:
        raise SystemExit(f"{name}: {protocol_name} models were trained under another budget ({stored}); "
                         f"use the same --epochs/--steps")
    result["protocols"][protocol_name] = protocol.to_json()
    real = load_dataset("fashion-mnist", data_root)
    for kind in which:
        if kind == "after":
            syn = SyntheticSet.load(result["set"])
        elif kind == "init":
            syn = SyntheticSet.from_real(real, result["ipc"], make_generator(result["seed"], "init"))
        else:
            raise SystemExit(f"--which takes after and/or init, got {kind!r}")
        rows = result.setdefault("evals", {}).setdefault(protocol_name, {}).setdefault(kind, [])
        done = [Row("frepo", "fashion-mnist", result["ipc"], r["model"], r["run"], result["seed"], r["accuracy"],
                    r["seconds"] or 0.0) for r in rows]
        limit = runs if max_new <= 0 else min(runs, len(done) + max_new)
        if limit <= len(done):
            continue

        def keep(row: Row, rows=rows) -> None:
            rows.append({"model": row.model, "run": int(row.run), "accuracy": row.accuracy, "seconds": row.seconds,
                         "load_avg": os.getloadavg()})
            atomic_write_json(path, result)
            print(f"{name} {protocol_name} {kind} run {row.run}: {row.accuracy:.2f} % ({row.seconds:.0f} s)",
                  flush=True)

        evaluate(syn, real, dataclasses.replace(protocol, runs=limit), seed=result["seed"], on_row=keep, done=done)
    atomic_write_json(path, result)


def cmd_evaluate(args: argparse.Namespace) -> None:
    _evaluate_into(args.name, args.protocol, args.which.split(","), args.runs, args.epochs, args.steps,
                   args.data_root, args.max_new, args.threads)


def _ms(xs: list[float]) -> str:
    if not xs:
        return "–"
    return f"{statistics.fmean(xs):.1f} ± {statistics.pstdev(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"


def cmd_report(args: argparse.Namespace) -> None:
    from ddkit.evaluation.protocol import frepo_steps

    rows = []
    for path in sorted(RESULTS.glob("*.json")):
        row = json.loads(path.read_text())
        # runs tagged acc* ran niced beside other jobs for their accuracy only: their s/it is not a timing
        row["timed"] = "_acc" not in path.stem
        rows.append(row)
    lines = ["| IPC | iterations (settings) | s/it (median) | peak RSS MiB | KRR acc. on the real batch, first -> "
             "last 10 its | field protocol: init -> after | frepo protocol: init -> after | paper (500k it, frepo "
             "protocol) |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["ipc"], r["iters"], json.dumps(r["overrides"]))):
        cells = []
        for name in ("field", "frepo"):
            acc = r.get("evals", {}).get(name)
            if not acc:
                cells.append("not run")
                continue
            p = r["protocols"][name]
            budget = f"{p['epochs']} ep" if p.get("steps") is None else \
                f"{frepo_steps(10 * r['ipc']) if p['steps'] == 'frepo' else p['steps']} steps"
            init, after = ([x["accuracy"] for x in acc.get(k, [])] for k in ("init", "after"))
            cells.append(f"{_ms(init)} -> {_ms(after)} ({max(len(init), len(after))} x {budget})")
        settings = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "defaults"
        speed = f"{r['median_s']:.2f}" if r["timed"] else "(not timed)"
        krr = [x for x in r.get("krr_acc", []) if x is not None]
        krr_cell = f"{statistics.fmean(krr[:10]):.1f} -> {statistics.fmean(krr[-10:]):.1f}" if krr else "–"
        lines.append(f"| {r['ipc']} | {r['iters']} ({settings}; real batch {r['config']['batch_real']}) | {speed} | "
                     f"{r['peak_rss_mib_distill']:.0f} | {krr_cell} | {cells[0]} | {cells[1]} | "
                     f"{PAPER.get(r['ipc'], '–')} |")
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
    p.add_argument("--runs", type=int, default=0, help="fresh networks per set and protocol (0: evaluate later)")
    p.add_argument("--epochs", type=int, default=300, help="epochs of the field's protocol (paper: 1000)")
    p.add_argument("--protocols", default="field,frepo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-root", default=DATA)
    p.add_argument("--set", default="", help='JSON FRePoConfig overrides, e.g. \'{"lr_img": 0.003}\'')
    p.add_argument("--tag", default="")
    p.set_defaults(func=cmd_run)
    e = sub.add_parser("evaluate", help="add trained models to a run's result file (resumable, model by model)")
    e.add_argument("name", help="result file stem, e.g. frepo_fm_ipc1_it100")
    e.add_argument("--protocol", choices=["field", "frepo"], required=True)
    e.add_argument("--which", default="after,init", help="after (the distilled set) and/or init (its start)")
    e.add_argument("--runs", type=int, default=2, help="models per set in total")
    e.add_argument("--epochs", type=int, default=300, help="epochs of the field's protocol (paper: 1000)")
    e.add_argument("--steps", type=int, default=None, help="frepo protocol: override eval.py's step budget")
    e.add_argument("--max-new", type=int, default=0, help="train at most this many models now (0: all missing)")
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--data-root", default=DATA)
    e.set_defaults(func=cmd_evaluate)
    r = sub.add_parser("report")
    r.set_defaults(func=cmd_report)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
