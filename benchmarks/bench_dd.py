"""DD on Fashion-MNIST (CPU): seconds per iteration and peak memory with the bounded-memory ("checkpoint") and
the plain ("graph") unroll, and accuracy after a stated budget under the field's protocol and DD's own recipe.

Timings under the shared lock; memory in fresh processes (peak RSS is per process)::

    flock /tmp/ddkit-bench.lock python -m benchmarks.bench_dd speed --ipc 10 --threads 1   # both unrolls, side by side
    flock /tmp/ddkit-bench.lock python -m benchmarks.bench_dd speed --ipc 1 --threads 1
    python -m benchmarks.bench_dd memory --ipc 10 --unroll checkpoint                # and --unroll graph
    flock /tmp/ddkit-bench.lock python -m benchmarks.bench_dd accuracy --ipc 10 --iters 300
    python -m benchmarks.bench_dd report        # the markdown tables for RESULTS.md

``speed`` runs DD's defaults (LeNet, xavier init, noise images, real batch 1024; IPC 10: 10 data steps x 3 epochs
= 30 unrolled steps, IPC 1: 1 x 3) with the two unrolls alternating iteration by iteration in one process, and
reports the median wall and process-CPU seconds per iteration of each (on a shared machine, run it with
``--threads 1``: CPU time is what the load does not inflate) and the exact peak of the bytes autograd holds for backward
during one iteration of each (``saved_tensors_hooks``; machine-independent).  ``memory`` runs one unroll in a
fresh process and reports the resident memory after set-up and its peak during the iterations.
``--model convnet --batch-real 256`` shows a case where the unroll's activations dominate.

``accuracy`` distills for ``--iters`` iterations, then evaluates the set (1) under the field's protocol (what
``ddkit evaluate`` runs: ConvNet-3, SGD momentum 0.9, lr 0.01, DSA; ``--runs`` x ``--epochs``) beside random real
images of the same IPC, and (2) under DD's own recipe (fresh LeNets from DD's initialisation trained by the learned
schedule, :func:`ddkit.methods.dd.evaluate_dd_recipe`).  The set is saved under ``benchmarks/_work/dd/`` so that
``ddkit evaluate`` can re-run it.  There is no published DD number for Fashion-MNIST (anchors.md 1b): the
nearest are MNIST IPC 10, 79.5 +- 8.1 % (LeNet, DD's recipe, random init; DC paper Tab. 1) and the README's 94 %
(fixed init, 10 images).
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

from .common import peak_rss_mib, save_json

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "_work" / "dd"
RESULTS = ROOT / "results" / "dd"
DATA = os.environ.get("DDKIT_DATA", str(ROOT.parent.parent / "shared" / "data"))

#: anchors.md 1b (DC paper Tab. 1, DD with LeNet, its own recipe): MNIST IPC 10.  No Fashion-MNIST figure exists.
PAPER = {"mnist": {10: "79.5 ± 8.1 (LeNet, DD's recipe)"}, "fashion-mnist": {}}

#: Full budget on a GPU (DD's 400 epochs at batch 1024: 23,600 iterations), the field's protocol, then DD's own
#: recipe; ``--set method.unroll=graph`` runs the official plain unroll.  ``tests/test_perf_commands.py`` parses
#: the ``ddkit`` lines.
GPU_COMMANDS = """\
ddkit distill --method dd --dataset fashion-mnist --ipc {ipc} --data-root DATA --device cuda --out runs/dd_fm{ipc}
ddkit evaluate runs/dd_fm{ipc} --runs 5 --data-root DATA --device cuda      # the field's protocol, 1000 epochs
python -c "import ddkit; from ddkit.methods.dd import evaluate_dd_recipe as e; \\
s = ddkit.SyntheticSet.load('runs/dd_fm{ipc}'); \\
print(e(s, ddkit.load_real_for(s, 'DATA'), runs=5, device='cuda').to_markdown())"   # DD's own recipe"""


def _machine() -> dict[str, Any]:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or "?",
            "load_avg_at_start": os.getloadavg()}


def _setup(args: argparse.Namespace, **overrides: Any):
    from ddkit.data import load_dataset
    from ddkit.engine import make_generator
    from ddkit.methods.dd import DDDistiller
    from ddkit.synthetic import SyntheticSet

    real = load_dataset(args.dataset, args.data_root)
    cfg = DDDistiller.default_config(args.dataset, args.ipc)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    syn = SyntheticSet.from_real(real, args.ipc, make_generator(args.seed, "init"), init=cfg.init)
    distiller = DDDistiller(cfg)
    generator = make_generator(args.seed, "distill")
    distiller.setup(real, syn, generator)
    return real, syn, distiller, generator


class _SavedBytes:
    """Live and peak bytes of the tensors autograd holds for backward (the unroll's activation memory)."""

    def __init__(self) -> None:
        self.live = self.peak = 0

    def pack(self, t: torch.Tensor):
        n = t.numel() * t.element_size()
        self.live += n
        self.peak = max(self.peak, self.live)
        return _Held(t.detach(), n, self)

    @staticmethod
    def unpack(h: "_Held") -> torch.Tensor:
        return h.t


class _Held:
    def __init__(self, t: torch.Tensor, n: int, meter: _SavedBytes) -> None:
        self.t, self.n, self.meter = t, n, meter

    def __del__(self) -> None:
        self.meter.live -= self.n


def _vm(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process in MiB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{field} not in /proc/self/status")


def _speed_setup(args: argparse.Namespace):
    extra = {k: v for k, v in (("model", args.model), ("batch_real", args.batch_real)) if v is not None}
    return _setup(args, **extra)


def _tag(args: argparse.Namespace, distiller) -> str:
    return f"{args.dataset}_ipc{args.ipc}_{distiller.config.model}_b{distiller.config.batch_real}"


def cmd_speed(args: argparse.Namespace) -> None:
    """Both unrolls in one process, iterations alternating (order reversed every round): median s/it side by side,
    and the exact peak of the bytes autograd holds for backward during one iteration of each."""
    torch.set_num_threads(args.threads)
    real, syn, distiller, generator = _speed_setup(args)
    modes = ["checkpoint", "graph"]
    secs: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    it = 0
    for round_ in range(args.warmup + args.iters):
        for mode in (modes if round_ % 2 == 0 else modes[::-1]):
            distiller.config.unroll = mode
            it += 1
            t0, c0 = time.perf_counter(), time.process_time()
            distiller.step(it, real, syn, generator)
            if round_ >= args.warmup:
                secs[mode].append(time.perf_counter() - t0)
                cpu[mode].append(time.process_time() - c0)
    saved = {}
    for mode in modes:
        distiller.config.unroll = mode
        meter = _SavedBytes()
        it += 1
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            distiller.step(it, real, syn, generator)
        saved[mode] = meter.peak / 2**20
    result = {
        "dataset": args.dataset, "ipc": args.ipc, "model": distiller.config.model,
        "inner_steps": distiller.total_steps, "distill_steps": distiller.distill_steps,
        "batch_real": distiller.config.batch_real, "iters": args.iters, "warmup": args.warmup,
        "median_s": {m: statistics.median(secs[m]) for m in modes}, "seconds": secs,
        "median_cpu_s": {m: statistics.median(cpu[m]) for m in modes}, "cpu_seconds": cpu,
        "saved_for_backward_peak_mib": saved, "machine": _machine(),
    }
    print(save_json(RESULTS, f"speed_{_tag(args, distiller)}", result))
    print(json.dumps({k: result[k] for k in ("median_s", "median_cpu_s", "saved_for_backward_peak_mib")}))


def cmd_memory(args: argparse.Namespace) -> None:
    """One unroll in a fresh process: resident memory after set-up (data loaded) and its peak over ``--iters``
    iterations (the kernel's high-water mark, reset after set-up: ``/proc/self/clear_refs``)."""
    torch.set_num_threads(args.threads)
    real, syn, distiller, generator = _speed_setup(args)
    distiller.config.unroll = args.unroll
    rss_setup = _vm("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    for it in range(1, args.iters + 1):
        distiller.step(it, real, syn, generator)
    result = {
        "dataset": args.dataset, "ipc": args.ipc, "model": distiller.config.model, "unroll": args.unroll,
        "inner_steps": distiller.total_steps, "distill_steps": distiller.distill_steps,
        "batch_real": distiller.config.batch_real, "iters": args.iters,
        "rss_after_setup_mib": rss_setup, "peak_rss_during_iterations_mib": _vm("VmHWM"), "machine": _machine(),
    }
    print(save_json(RESULTS, f"memory_{_tag(args, distiller)}_{args.unroll}", result))
    print(json.dumps({k: result[k] for k in ("rss_after_setup_mib", "peak_rss_during_iterations_mib")}))


def cmd_accuracy(args: argparse.Namespace) -> None:
    from ddkit.engine import distill, make_generator
    from ddkit.engine.callbacks import Callback
    from ddkit.evaluation import EvalProtocol, evaluate
    from ddkit.methods.dd import evaluate_dd_recipe
    from ddkit.synthetic import SyntheticSet

    torch.set_num_threads(args.threads)
    real, syn, distiller, _ = _setup(args)
    losses: list[float] = []

    class Record(Callback):
        def on_iteration_end(self, state) -> None:
            losses.append(float(state.metrics["loss"]))

    t0 = time.perf_counter()
    distill(distiller, real, syn, iterations=args.iters, seed=args.seed, callbacks=[Record()])
    distill_s = time.perf_counter() - t0
    syn.meta.update({"method": "dd", "ipc": args.ipc, "iterations": args.iters, "seed": args.seed})
    out = WORK / f"{args.dataset}_ipc{args.ipc}_it{args.iters}"
    syn.cpu().save(out)
    protocol = EvalProtocol(runs=args.runs, epochs=args.epochs)
    field = [r.accuracy for r in evaluate(syn, real, protocol, seed=args.seed).rows]
    baseline: list[float] = []
    if args.baseline_runs > 0:  # 0: the random real set is evaluated elsewhere (e.g. the one KIP/FRePo start from)
        random_real = SyntheticSet.from_real(real, args.ipc, make_generator(args.seed, "baseline"), init="real")
        baseline = [r.accuracy for r in evaluate(random_real, real, dataclasses.replace(
            protocol, runs=args.baseline_runs), seed=args.seed).rows]
    recipe = [r.accuracy for r in evaluate_dd_recipe(syn, real, runs=args.recipe_runs, seed=args.seed).rows]
    result = {
        "dataset": args.dataset, "ipc": args.ipc, "iters": args.iters, "distill_s": distill_s,
        "model": distiller.config.model, "inner_steps": distiller.total_steps, "loss_first_last": [
            statistics.fmean(losses[:10]), statistics.fmean(losses[-10:])],
        "step_lrs": syn.meta["dd"]["step_lrs"], "protocol": {"runs": args.runs, "epochs": args.epochs},
        "field": field, "random_real_field": baseline, "dd_recipe": recipe, "set": str(out),
        "machine": _machine(),
    }
    name = f"accuracy_{args.dataset}_ipc{args.ipc}_it{args.iters}"
    print(save_json(RESULTS, name, result))
    print(json.dumps({k: result[k] for k in ("field", "random_real_field", "dd_recipe", "distill_s")}))


def _ms(xs: list[float]) -> str:
    if not xs:
        return "–"
    return f"{statistics.fmean(xs):.1f} ± {statistics.pstdev(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"


def cmd_report(args: argparse.Namespace) -> None:
    memory = {}
    for p in RESULTS.glob("memory_*.json"):
        r = json.loads(p.read_text())
        memory[(r["dataset"], r["ipc"], r["model"], r["batch_real"], r["unroll"])] = r
    speed = {}
    for p in RESULTS.glob("speed_*.json"):
        r = json.loads(p.read_text())
        speed[(r["dataset"], r["ipc"], r["model"], r["batch_real"])] = r
    print("| dataset | IPC | model, real batch | inner steps | s/it checkpoint (CPU-s) | s/it graph (CPU-s) | "
          "ratio (wall) | saved for backward, peak MiB: checkpoint / graph | peak RSS MiB during iterations: "
          "checkpoint / graph (after set-up) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key in sorted(set(speed) | {k[:4] for k in memory}):
        r = speed.get(key)
        mem = [memory.get((*key, m)) for m in ("checkpoint", "graph")]
        info = r or next(m for m in mem if m)
        rss = " / ".join(f"{m['peak_rss_during_iterations_mib']:.0f}" if m else "–" for m in mem)
        setup = next((f" ({m['rss_after_setup_mib']:.0f})" for m in mem if m), "")
        cells = ["–"] * 4
        if r is not None:
            t, c, saved = r["median_s"], r["median_cpu_s"], r["saved_for_backward_peak_mib"]
            load = r["machine"]["load_avg_at_start"][0]
            cells = [f"{t['checkpoint']:.3f} ({c['checkpoint']:.3f})", f"{t['graph']:.3f} ({c['graph']:.3f})",
                     f"{t['checkpoint'] / t['graph']:.2f}x ({r['iters']} its each, {r['machine']['threads']} thr, "
                     f"load {load:.1f})", f"{saved['checkpoint']:.1f} / {saved['graph']:.1f}"]
        print(f"| {key[0]} | {key[1]} | {key[2]}, {key[3]} | "
              f"{info['distill_steps']} x {info['inner_steps'] // info['distill_steps']} | {' | '.join(cells)} | "
              f"{rss}{setup} |")
    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("accuracy_*.json"))]
    print()
    print("| dataset | IPC | iterations (s) | field protocol: DD set | random real | DD's recipe (LeNet) "
          "| outer loss first -> last 10 its | paper |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["dataset"], r["ipc"], r["iters"])):
        p = r["protocol"]
        print(f"| {r['dataset']} | {r['ipc']} | {r['iters']} ({r['distill_s']:.0f} s) | {_ms(r['field'])} "
              f"({p['runs']} x {p['epochs']} ep) | {_ms(r['random_real_field'])} | {_ms(r['dd_recipe'])} | "
              f"{r['loss_first_last'][0]:.3f} -> {r['loss_first_last'][1]:.3f} | "
              f"{PAPER.get(r['dataset'], {}).get(r['ipc'], 'none published')} |")
    print()
    for ipc in (1, 10):
        print(GPU_COMMANDS.format(ipc=ipc))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, func in (("speed", cmd_speed), ("memory", cmd_memory), ("accuracy", cmd_accuracy)):
        p = sub.add_parser(name)
        p.add_argument("--dataset", default="fashion-mnist")
        p.add_argument("--ipc", type=int, default=10)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--data-root", default=DATA)
        p.set_defaults(func=func)
        if name in ("speed", "memory"):
            p.add_argument("--iters", type=int, default=10 if name == "speed" else 2)
            p.add_argument("--model", default=None, help="inner network (default: DD's, LeNet for Fashion-MNIST)")
            p.add_argument("--batch-real", type=int, default=None, help="real batch (default: DD's 1024)")
        if name == "speed":
            p.add_argument("--warmup", type=int, default=1)
        if name == "memory":
            p.add_argument("--unroll", choices=["checkpoint", "graph"], default="checkpoint")
        if name == "accuracy":
            p.add_argument("--iters", type=int, default=300)
            p.add_argument("--runs", type=int, default=3)
            p.add_argument("--epochs", type=int, default=300)
            p.add_argument("--recipe-runs", type=int, default=5)
            p.add_argument("--baseline-runs", type=int, default=3,
                           help="models on random real images (stream 'baseline'); 0 skips them")
    r = sub.add_parser("report")
    r.set_defaults(func=cmd_report)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
