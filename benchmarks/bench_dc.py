"""DC / DSA on Fashion-MNIST (CPU): seconds per outer iteration, peak memory, accuracy at a fixed budget.

Subcommands (run every timing under ``flock /tmp/ddkit-bench.lock`` so benchmarks never overlap)::

    python -m benchmarks.bench_dc micro --ipc 1            # which per-class gradient formulation is fastest
    python -m benchmarks.bench_dc speed --method dc --ipc 1 --iters 10 [--variant naive|paired]
    python -m benchmarks.bench_dc accuracy --method dc --ipc 1 --iters 50
    python -m benchmarks.bench_dc report                   # writes benchmarks/RESULTS_dc.md

``speed`` and ``accuracy`` run in the current process and store one JSON file under ``benchmarks/_work/dc``;
run each in a fresh process so that peak RSS belongs to one setting.  ``--variant naive`` is the official
formulation (``main.py``: per class, a forward and backward of the real batch, then of the synthetic batch with
a graph) inside ddkit with plain modules (``speed="plain"``: ``Conv2d``/``GroupNorm``, eager, whole batches), a
same-machine baseline next to the reference figures of anchors.md section R.  ``--variant fast`` is ddkit as
``ddkit distill`` ships it (``speed=auto``) with compilation forced on, which is what the speed layer's rule
decides for a full-budget CPU run (1000 outer iterations); ``--compile auto|off`` applies the rule to the
config's ``iterations`` or turns it off.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .common import COMPILE_CHOICES, PAPER_ROWS, allocator_as_run, apply_overrides, ddkit_speed, peak_rss_mib, save_json

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "_work" / "dc"
DATA = str(ROOT.parent.parent / "shared" / "data")

#: anchors.md section R: the official code on this machine kind (2 cores), Fashion-MNIST, ConvNet-3.
REFERENCE = {
    ("dc", 1): (7.53, 1837),
    ("dc", 10): (215.0, 1996),
    ("dsa", 1): (7.98, 1780),
    ("dsa", 10): (224.0, 2021),
}
PAPER = PAPER_ROWS


def save(name: str, data: dict[str, Any]) -> Path:
    return save_json(WORK, name, data)


def load_all() -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(WORK.glob("*.json"))} if WORK.exists() else {}


# ------------------------------------------------------------------------------------------------ the baseline
def naive_distiller(method: str, config):
    """The official per-class formulation, with ddkit's draws: the reference the fast path is timed against.

    ``speed="plain"``: the plain ``nn.Conv2d -> nn.GroupNorm`` modules, no compilation, and the inner network
    epochs on whole batches (``epoch('train', ...)``, batch 256), as the official code computes them."""
    from ddkit.methods.common import sample_class_params, sample_per_class
    from ddkit.methods.dc import DCDistiller, DSADistiller

    base = DSADistiller if method == "dsa" else DCDistiller

    class Naive(base):  # type: ignore[misc, valid-type]
        def matching_loss(self, net, real, syn, generator, *, real_forward=None):  # official: eager, per class
            cfg = self.config
            batch = sample_per_class(real, cfg.batch_real, generator, self.device)
            params = sample_class_params(self.aug, real.num_classes, generator, self.device)
            weights = list(net.parameters())
            loss = torch.zeros((), device=self.device)
            for c in range(real.num_classes):
                img_real = batch.images[batch.row_class == c]
                img_syn = syn.images[syn.class_slice(c)]
                if params[c]:
                    img_real = self.aug.apply(img_real, params[c])
                    img_syn = self.aug.apply(img_syn, params[c])
                lab = torch.full((img_real.shape[0],), c, dtype=torch.long, device=self.device)
                gw_real = [g.detach() for g in torch.autograd.grad(F.cross_entropy(net(img_real), lab), weights)]
                lab = torch.full((img_syn.shape[0],), c, dtype=torch.long, device=self.device)
                gw_syn = torch.autograd.grad(F.cross_entropy(net(img_syn), lab), weights, create_graph=True)
                loss = loss + official_match_loss(gw_syn, gw_real)
            return loss

    return Naive(config, speed="plain")


def official_match_loss(gw_syn, gw_real) -> torch.Tensor:
    """``distance_wb`` summed over parameters (``dis_metric='ours'``)."""
    total = torch.zeros((), device=gw_real[0].device)
    for gwr, gws in zip(gw_real, gw_syn):
        if gwr.dim() == 1:
            continue
        gwr, gws = gwr.reshape(gwr.shape[0], -1), gws.reshape(gws.shape[0], -1)
        total = total + torch.sum(1 - torch.sum(gwr * gws, -1) / (gwr.norm(dim=-1) * gws.norm(dim=-1) + 1e-6))
    return total


# ---------------------------------------------------------------------------------------------------- commands
def make(method: str, ipc: int, variant: str, overrides: dict[str, Any], compile: str = "on"):
    """The distiller of one variant: ``naive`` (official formulation, plain modules) or ``fast`` (ddkit,
    ``speed=auto``; ``compile`` "on" is what the rule resolves to in a full-budget CPU run, 1000 outer
    iterations)."""
    from ddkit.methods import create_distiller

    d = create_distiller(method, dataset="fashion-mnist", ipc=ipc)
    apply_overrides(d.config, overrides)
    if variant == "naive":
        return naive_distiller(method, d.config)
    d.speed = ddkit_speed(compile)  # before setup, which decides compilation
    return d


def cmd_speed(args: argparse.Namespace) -> dict[str, Any]:
    """Median seconds per outer iteration over ``--iters`` iterations (the first one is dropped)."""
    if args.variant == "paired":
        return cmd_speed_paired(args)
    from ddkit.data import load_dataset
    from ddkit.engine import distill, make_generator
    from ddkit.engine.callbacks import Callback
    from ddkit.synthetic import SyntheticSet

    torch.set_num_threads(args.threads)
    keeps_memory = allocator_as_run(args.variant)
    real = load_dataset("fashion-mnist", args.data)
    d = make(args.method, args.ipc, args.variant, parse_overrides(args.set), args.compile)
    syn = SyntheticSet.from_real(real, args.ipc, make_generator(0, "init"), init=d.config.init)
    times: list[dict[str, float]] = []
    clock = [time.process_time()]

    class Timer(Callback):
        """Wall seconds come from the engine; CPU seconds (all threads) are measured here."""

        def on_start(self, state):
            clock[0] = time.process_time()

        def on_iteration_end(self, state):
            now = time.process_time()
            times.append({**state.metrics, "cpu_seconds": now - clock[0]})
            clock[0] = now
            print(json.dumps({"it": state.iteration, **times[-1]}), file=sys.stderr, flush=True)

    distill(d, real, syn, iterations=args.iters + args.warmup, seed=0, callbacks=[Timer()])
    kept = times[args.warmup:]
    out = {
        "kind": "speed", "method": args.method, "ipc": args.ipc, "variant": args.variant, "set": args.set,
        "speed": repr(d.speed), "compile": args.compile if args.variant == "fast" else "off",
        "loops": list(d.loops), "iterations": len(kept),
        "seconds": [t["seconds"] for t in kept],
        "median_s": statistics.median(t["seconds"] for t in kept),
        "median_match_s": statistics.median(t["seconds_match"] for t in kept),
        "median_inner_s": statistics.median(t["seconds_inner"] for t in kept),
        "median_cpu_s": statistics.median(t["cpu_seconds"] for t in kept),
        "cpu_seconds": [t["cpu_seconds"] for t in kept],
        "peak_rss_mib": peak_rss_mib(), "threads": args.threads, "torch": torch.__version__,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"), "keeps_freed_memory": keeps_memory,
    }
    save(f"speed_{args.method}_ipc{args.ipc}_{args.variant}{args.tag}", out)
    return out


def cmd_speed_paired(args: argparse.Namespace) -> dict[str, Any]:
    """The official formulation (*naive*) and ddkit (*fast*) side by side in one process: each round runs one
    outer iteration of each, alternating which goes first (naive first in odd rounds), on their own synthetic
    sets from the same initialisation and their own generators with the same seed.  Both see the same machine
    state, which a fresh process per variant does not guarantee on this VM (10-20 % drift).  Peak memory is not
    separable here; take it from the single-variant runs."""
    from ddkit.data import load_dataset
    from ddkit.engine import make_generator
    from ddkit.synthetic import SyntheticSet

    torch.set_num_threads(args.threads)
    keeps_memory = allocator_as_run("fast" if args.allocator == "keep" else "naive")  # one setting for both
    real = load_dataset("fashion-mnist", args.data)
    overrides = parse_overrides(args.set)
    names = ("naive", "fast")
    runs = {}
    for name in names:
        d = make(args.method, args.ipc, name, overrides, args.compile)
        syn = SyntheticSet.from_real(real, args.ipc, make_generator(0, "init"), init=d.config.init)
        generator = make_generator(0, "distill")
        d.setup(real, syn, generator)
        runs[name] = (d, syn, generator)
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for it in range(1, args.warmup + args.iters + 1):
        for name in (names if it % 2 else names[::-1]):
            d, syn, generator = runs[name]
            wall, cpu = time.perf_counter(), time.process_time()
            metrics = d.step(it, real, syn, generator)
            row = {**metrics, "seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu}
            print(json.dumps({"round": it, "variant": name, **row}), file=sys.stderr, flush=True)
            if it > args.warmup:
                rows[name].append(row)
    med = {name: {key: statistics.median(r[key] for r in rows[name])
                  for key in ("seconds", "seconds_match", "seconds_inner", "cpu_seconds")} for name in names}
    ratios = [f["seconds"] / n["seconds"] for f, n in zip(rows["fast"], rows["naive"])]
    out = {
        "kind": "speed_paired", "method": args.method, "ipc": args.ipc, "set": args.set, "compile": args.compile,
        "speed": {name: repr(runs[name][0].speed) for name in names}, "loops": list(runs["fast"][0].loops), "rounds": args.iters, "warmup": args.warmup, "rows": rows,
        "median": med, "ratio_of_medians": med["fast"]["seconds"] / med["naive"]["seconds"],
        "round_ratios": ratios, "median_round_ratio": statistics.median(ratios),
        "threads": args.threads, "torch": torch.__version__, "keeps_freed_memory": keeps_memory,
    }
    save(f"speed_{args.method}_ipc{args.ipc}_paired{args.tag}", out)
    return {k: out[k] for k in ("median", "ratio_of_medians", "round_ratios")}


def cmd_accuracy(args: argparse.Namespace) -> dict[str, Any]:
    """Init vs after ``--iters`` iterations, each scored by the same short protocol and seeds.

    ``--phase`` splits the work into commands that each fit the 15-minute budget of a benchmark command:
    ``init`` scores the initial set, ``distill`` runs the iterations and saves the set, ``final`` scores it.
    """
    from ddkit.data import load_dataset
    from ddkit.engine import distill, make_generator
    from ddkit.evaluation import EvalProtocol, evaluate
    from ddkit.synthetic import SyntheticSet

    torch.set_num_threads(args.threads)
    real = load_dataset("fashion-mnist", args.data)
    d = make(args.method, args.ipc, "fast", parse_overrides(args.set), args.compile)
    name = f"acc_{args.method}_ipc{args.ipc}_it{args.iters}"
    folder = WORK / f"syn_{args.method}_ipc{args.ipc}_it{args.iters}"
    protocol = EvalProtocol(models=("convnet",), runs=args.runs, epochs=args.epochs, dsa=args.method == "dsa")
    path = WORK / f"{name}.json"
    out: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {
        "kind": "accuracy", "method": args.method, "ipc": args.ipc, "iterations": args.iters,
        "init": d.config.init, "protocol": protocol.to_json(), "seed": args.seed}
    if args.phase == "init":
        syn = SyntheticSet.from_real(real, args.ipc, make_generator(args.seed, "init"), init=d.config.init)
        out["before"] = evaluate(syn, real, protocol, seed=args.seed).summary()["convnet"]
    elif args.phase == "distill":
        # resumable in pieces of --piece iterations, so that each command stays within its time budget
        done = int(out.get("done", 0))
        stop = args.iters if args.piece <= 0 else min(args.iters, done + args.piece)
        syn = SyntheticSet.from_real(real, args.ipc, make_generator(args.seed, "init"), init=d.config.init)
        t0 = time.perf_counter()
        distill(d, real, syn, iterations=stop, seed=args.seed, checkpoint_dir=folder / "ckpt", resume=done > 0)
        out["distill_s"] = out.get("distill_s", 0.0) + time.perf_counter() - t0
        out["done"] = stop
        if stop == args.iters:
            syn.save(folder)
    else:
        syn = SyntheticSet.load(folder)
        out["after"] = evaluate(syn, real, protocol, seed=args.seed).summary()["convnet"]
    save(name, out)
    return out


def cmd_micro(args: argparse.Namespace) -> dict[str, Any]:
    """Time the pieces of one matching step on Fashion-MNIST shapes, formulation by formulation, interleaved."""
    from ddkit.accel import patchnorm
    from ddkit.functional.distances import match_distance
    from ddkit.functional.pergrad import class_labels, naive_per_class_grads, per_class_grads, \
        per_class_grads_loop, split_parameters
    from ddkit.models import create_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    k, n, ipc = 10, 256, args.ipc
    # the network ddkit's DC runs on CPU (speed=auto): the patch-statistics first stage swapped in
    net = patchnorm.install(create_model("convnet", channels=1, num_classes=k, image_size=(28, 28)))
    diff, const = split_parameters(net, lambda name, p: p.dim() >= 2)
    xr = torch.randn(k, n, 1, 28, 28)
    yr = class_labels(k, n)
    xs = torch.randn(k, ipc, 1, 28, 28, requires_grad=True)
    ys = class_labels(k, ipc)
    with torch.no_grad():
        g_real = per_class_grads(net, diff, const, xr, yr, sample_chunk=8)

    def real_naive():
        naive_per_class_grads(net, list(diff), list(xr), list(yr))

    def real_loop(chunk):
        def f():
            with torch.no_grad():
                per_class_grads_loop(net, diff, const, xr, yr, sample_chunk=chunk)
        return f

    def real_batched(per_class):
        def f():
            with torch.no_grad():
                per_class_grads(net, diff, const, xr, yr, sample_chunk=per_class)
        return f

    def syn_naive():
        gs = naive_per_class_grads(net, list(diff), list(xs), list(ys), create_graph=True)
        match_distance(g_real, gs).backward()

    def syn_batched():
        match_distance(g_real, per_class_grads(net, diff, const, xs, ys)).backward()

    def syn_loop():
        match_distance(g_real, per_class_grads_loop(net, diff, const, xs, ys, create_graph=True)).backward()

    variants: dict[str, Callable[[], None]] = {
        "real: official per-class (256 per pass)": real_naive,
        "real: loop, 64 per pass": real_loop(64),
        "real: loop, 32 per pass": real_loop(32),
        "real: batched over classes, 2560 per pass": real_batched(None),
        "real: batched, 320 per pass (32/class)": real_batched(32),
        "real: batched, 80 per pass (8/class)": real_batched(8),
        "real: batched, 40 per pass (4/class)": real_batched(4),
        f"syn IPC {ipc}: official per-class + backward": syn_naive,
        f"syn IPC {ipc}: loop + backward": syn_loop,
        f"syn IPC {ipc}: batched + backward": syn_batched,
    }
    only = [v for v in variants if not args.only or any(s in v for s in args.only.split(","))]
    times: dict[str, list[float]] = {v: [] for v in only}
    for _ in range(args.rounds):
        for name in only:
            t = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - t)
            print(f"{name}: {times[name][-1]:.2f}s", file=sys.stderr, flush=True)
    out = {"kind": "micro", "ipc": ipc, "rounds": args.rounds, "times": times,
           "median_s": {k_: statistics.median(v) for k_, v in times.items()}}
    save(f"micro_ipc{ipc}{args.tag}", out)
    return out


# ------------------------------------------------------------------------------------------------------ report
def cmd_report(args: argparse.Namespace) -> dict[str, Any]:
    results = load_all()
    lines = [
        "## DC / DSA (gradient matching) — issue 4",
        "",
        "Fashion-MNIST, ConvNet-3 (width 128, instance norm, average pooling), CPU (2-core AMD EPYC, AVX2), "
        "2 threads, on an otherwise idle machine, one command at a time under `flock /tmp/ddkit-bench.lock`.  "
        "Seconds per outer iteration are medians (IPC 1: 5 iterations after one warm-up; IPC 10: one outer "
        "iteration each, i.e. 10 matching steps and 450 network updates); CPU seconds are summed over threads; "
        "peak RSS is the whole process (including the 60k-image training set) in a fresh interpreter per "
        "setting.  *official* is anchors.md section R, measured on a machine of this kind that ran about 2.4x "
        "faster than this one (the official-style evaluation takes 217 s here against its 90 s there).  "
        "*naive* is the official formulation run inside ddkit with the same draws, on this machine in this "
        "session: per class one forward/backward of 256 real images, then one of the synthetic images with "
        "`create_graph` (`main.py`), and the inner network epochs eager on whole batches, plain modules "
        "(`speed=plain`): the like-for-like baseline.  *fast* is ddkit's default (`speed=auto`: per-class real "
        "gradients in cache-sized chunks, the synthetic side batched over classes with `vmap` for small IPC; "
        "compiled inner updates).",
        "",
        "| method | IPC | loops | official s/it | naive s/it (CPU s) | fast s/it (CPU s) | fast / naive "
        "| fast / official | fast: matching / inner s | official RSS | naive RSS | fast RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (method, ipc), (ref_s, ref_rss) in REFERENCE.items():
        fast = results.get(f"speed_{method}_ipc{ipc}_fast_quiet") or results.get(f"speed_{method}_ipc{ipc}_fast")
        naive = results.get(f"speed_{method}_ipc{ipc}_naive_quiet") or results.get(f"speed_{method}_ipc{ipc}_naive")
        if not fast:
            continue
        naive_s = f"{naive['median_s']:.1f} ({naive['median_cpu_s']:.1f})" if naive else "–"
        naive_rss = f"{naive['peak_rss_mib']:.0f} MiB" if naive else "–"
        ratio_naive = f"**{fast['median_s'] / naive['median_s']:.2f}x**" if naive else "–"
        lines.append(
            f"| {method} | {ipc} | {fast['loops'][0]}/{fast['loops'][1]} | {ref_s:.2f} | {naive_s} | "
            f"{fast['median_s']:.1f} ({fast['median_cpu_s']:.1f}) | {ratio_naive} | "
            f"{fast['median_s'] / ref_s:.2f}x | {fast['median_match_s']:.1f} / {fast['median_inner_s']:.1f} | "
            f"{ref_rss} MiB | {naive_rss} | {fast['peak_rss_mib']:.0f} MiB |"
        )
    acc = [r for k, r in results.items() if k.startswith("acc_")]
    if acc:
        lines += ["", "Accuracy at a fixed budget (Fashion-MNIST test set, 10k images; 300-epoch evaluation of "
                  "fresh ConvNets as in anchors.md section R; DSA evaluated with DSA augmentation):", "",
                  "| method | IPC | init | iterations | before | after | distill time |", "|---|---|---|---|---|---|---|"]
        for r in sorted(acc, key=lambda r: (r["method"], r["ipc"])):
            if "before" not in r or "after" not in r:
                continue
            b, a = r["before"], r["after"]
            lines.append(f"| {r['method']} | {r['ipc']} | {r['init']} | {r['iterations']} | "
                         f"{b['mean']:.2f} ± {b['std']:.2f} | {a['mean']:.2f} ± {a['std']:.2f} | "
                         f"{r.get('distill_s', float('nan')) / 60:.1f} min |")
    micro = [r for k, r in results.items() if k.startswith("micro_")]
    for r in micro:
        lines += ["", f"Formulations of one matching step (IPC {r['ipc']}, median of {r['rounds']} interleaved "
                  "rounds, seconds):", "", "| formulation | s |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in r["median_s"].items()]
    lines += ["", "Full-budget runs for the papers' rows (GPU):", "", "```"]
    for method in ("dc", "dsa"):
        for ds in ("mnist", "fashion-mnist", "cifar10"):
            for ipc in (1, 10, 50):
                out = f"runs/{method}_{ds}_ipc{ipc}"
                epochs = 1000 if method == "dsa" else 300
                lines.append(f"ddkit distill --method {method} --dataset {ds} --ipc {ipc} --out {out} "
                             f"--data-root DATA --device cuda")
                extra = "" if method == "dsa" else " --no-dsa"
                lines.append(f"ddkit evaluate {out} --runs 5 --epochs {epochs}{extra}   "
                             f"# paper: {PAPER[(method, ds)][(1, 10, 50).index(ipc)]}")
    lines.append("```")
    text = "\n".join(lines) + "\n"
    if args.write:
        (ROOT / "RESULTS_dc.md").write_text(text)
    print(text)
    return {"written": bool(args.write)}


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = {"true": True, "false": False}.get(value.lower(), value)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("speed", "accuracy", "micro"):
        p = sub.add_parser(name)
        p.add_argument("--method", default="dc", choices=("dc", "dsa"))
        p.add_argument("--ipc", type=int, default=1)
        p.add_argument("--iters", type=int, default=10)
        p.add_argument("--warmup", type=int, default=1, help="speed: leading iterations not counted")
        p.add_argument("--variant", default="fast", choices=("fast", "naive", "paired"),
                       help="speed --variant paired: naive and fast alternating in one process")
        p.add_argument("--allocator", choices=("default", "keep"), default="default",
                       help="speed --variant paired: keep = both variants with keep_freed_memory (the official "
                            "formulation spared its page faults); default = glibc's defaults for both")
        p.add_argument("--set", action="append", default=[], help="config override field=value")
        p.add_argument("--compile", choices=list(COMPILE_CHOICES), default="on",
                       help="fast variant: compilation forced on (default: what the rule gives a full-budget CPU "
                            "run), off, or auto (the speed layer's rule on the config's iterations)")
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--data", default=DATA)
        p.add_argument("--tag", default="")
        p.add_argument("--rounds", type=int, default=3)
        p.add_argument("--only", default="")
        p.add_argument("--runs", type=int, default=2)
        p.add_argument("--epochs", type=int, default=300)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--phase", default="init", choices=("init", "distill", "final"))
        p.add_argument("--piece", type=int, default=0, help="accuracy --phase distill: iterations per command")
    rep = sub.add_parser("report")
    rep.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    out = {"speed": cmd_speed, "accuracy": cmd_accuracy, "micro": cmd_micro, "report": cmd_report}[args.cmd](args)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
