"""Scale-out on this machine: 2 ranks x 1 thread (torchrun, gloo) against 1 process x 2 threads.

Both sides run the same ``ddkit`` command as a fresh process tree, so the wall time includes start-up (imports,
data loading, for torchrun the rendezvous), which is what a user waits for.  Commands, timed alternately,
``--repeats`` times each, medians reported:

- evaluate: a random-real digits set at IPC 10 (100 images), ``--runs R --epochs E`` (ConvNet, field protocol);
- experts:  ``ddkit experts --dataset digits --num-experts N --epochs E``;
- dsa (optional, ``--cases evaluate,experts,dsa``): ``ddkit distill --method dsa`` on digits (classes split over
  the ranks, image gradients all-reduced), ``--dsa-ipc``/``--dsa-iterations``, ``method.batch_real=64``.

Run under the benchmark lock so timings do not overlap other benchmarks::

    flock /tmp/ddkit-bench.lock .venv/bin/python -m benchmarks.bench_distributed --repeats 3
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DDKIT = [sys.executable, "-m", "ddkit"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ddkit"]


def timed(cmd: list[str], threads: int, cwd: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return seconds


def make_set(folder: Path, ipc: int) -> Path:
    from ddkit.data import load_dataset
    from ddkit.synthetic import SyntheticSet

    syn = SyntheticSet.from_real(load_dataset("digits"), ipc, torch.Generator().manual_seed(0), init="real")
    syn.meta.update({"method": "random", "ipc": ipc})
    syn.save(folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--eval-runs", type=int, default=4)
    ap.add_argument("--eval-epochs", type=int, default=300)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--expert-epochs", type=int, default=3)
    ap.add_argument("--dsa-ipc", type=int, default=10)
    ap.add_argument("--dsa-iterations", type=int, default=2)
    ap.add_argument("--cases", default="evaluate,experts", help="comma-separated: evaluate, experts, dsa")
    args = ap.parse_args()
    chosen = [c.strip() for c in args.cases.split(",") if c.strip()]
    work = Path(tempfile.mkdtemp(prefix="ddkit-bench-dist-"))
    try:
        synset = make_set(work / "set", 10)
        evaluate = ["evaluate", str(synset), "--runs", str(args.eval_runs), "--epochs", str(args.eval_epochs),
                    "--device", "cpu", "--eval-log", str(work / "log.jsonl")]
        experts = ["experts", "--dataset", "digits", "--num-experts", str(args.experts), "--epochs",
                   str(args.expert_epochs), "--device", "cpu", "--quiet"]
        dsa = ["distill", "--method", "dsa", "--dataset", "digits", "--ipc", str(args.dsa_ipc), "--iterations",
               str(args.dsa_iterations), "--device", "cpu", "--no-progress", "--set", "method.batch_real=64",
               "--out", str(work / "store")]
        cases = {
            "evaluate": (lambda: DDKIT + evaluate, lambda: TORCHRUN + evaluate),
            "experts": (lambda: DDKIT + experts + ["--out", str(work / "store")],
                        lambda: TORCHRUN + experts + ["--out", str(work / "store")]),
            "dsa": (lambda: DDKIT + dsa, lambda: TORCHRUN + dsa),
        }
        budgets = {
            "evaluate": f"digits IPC 10, {args.eval_runs} ConvNet runs x {args.eval_epochs} epochs",
            "experts": f"digits, {args.experts} experts x {args.expert_epochs} epochs",
            "dsa": f"digits IPC {args.dsa_ipc}, {args.dsa_iterations} DSA outer iterations, batch_real 64",
        }
        unknown = [c for c in chosen if c not in cases]
        if unknown:
            raise SystemExit(f"unknown case(s) {', '.join(unknown)}; expected {', '.join(cases)}")
        load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else ["?"]
        print(f"torch {torch.__version__}, {os.cpu_count()} CPUs visible, repeats {args.repeats}, "
              f"load average at start {' '.join(load)}")
        print("| command | budget | 1 process x 2 threads: median (each) s | 2 ranks x 1 thread: median (each) s "
              "| speed-up |")
        print("|---|---|---|---|---|")
        for name in chosen:
            single, multi = cases[name]
            budget = budgets[name]
            one, two = [], []
            for _ in range(args.repeats):
                for out, make, threads in ((one, single, 2), (two, multi, 1)):
                    shutil.rmtree(work / "store", ignore_errors=True)
                    (work / "log.jsonl").unlink(missing_ok=True)
                    out.append(timed(make(), threads, work))
            a, b = statistics.median(one), statistics.median(two)
            each = lambda xs: ", ".join(f"{x:.1f}" for x in xs)  # noqa: E731
            print(f"| {name} | {budget} | {a:.1f} ({each(one)}) | {b:.1f} ({each(two)}) | {a / b:.2f}x |", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
