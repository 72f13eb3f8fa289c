"""DM and CAFE on Fashion-MNIST (CPU): seconds per iteration, peak memory, accuracy at a stated budget.

Run every timing under ``flock /tmp/ddkit-bench.lock`` so that benchmarks never overlap::

    python -m benchmarks.bench_dm_cafe speed --method dm --ipc 10 --iters 15 [--variant official|paired]
    python -m benchmarks.bench_dm_cafe accuracy --method dm --ipc 10 --iters 99
    python -m benchmarks.bench_dm_cafe speed --method cafe --ipc 1 --iters 2 --warmup 0
    python -m benchmarks.bench_dm_cafe accuracy --method cafe --ipc 1 --iters 2 [--compile on]
    python -m benchmarks.bench_dm_cafe report          # writes benchmarks/RESULTS_dm_cafe.md

``speed`` and ``accuracy`` measure in the current process and write one JSON file under
``benchmarks/_work/dm_cafe``; run each in a fresh process so that the peak RSS belongs to one setting.
``--variant official`` runs ``main_DM.py``'s formulation inside ddkit (per class: a forward of 256 real images and
of the synthetic images through the plain ``Conv2d``/``GroupNorm`` modules, NCHW, eager, one batch per class), a
same-session baseline beside the reference figures of anchors.md section R, since this machine is shared and
absolute timings drift.  The ddkit side runs as ``ddkit distill`` ships: ``speed=auto``, with the compile rule
applied to the run's ``config.iterations`` (the method's full budget for ``speed``, ``--iters`` for
``accuracy``), or forced with ``--compile on|off``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .common import COMPILE_CHOICES, PAPER_ROWS, allocator_as_run, apply_overrides, ddkit_speed, peak_rss_mib, save_json

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "_work" / "dm_cafe"
DATA = os.environ.get("DDKIT_DATA", str(ROOT.parent.parent / "shared" / "data"))

#: anchors.md section R: official main_DM.py on this machine kind (2 cores), Fashion-MNIST, ConvNet-3.
REFERENCE_DM = {1: (2.82, 1489), 10: (2.74, 1530), 50: (4.28, 2077)}
#: anchors.md section R: official DM, FMNIST IPC 10, 300-epoch evaluation, 2 fresh ConvNets, full test set.
REFERENCE_ACC = {"init": "75.41 ± 0.54", "after 99 iterations": "80.11 ± 0.10"}
PAPER = PAPER_ROWS


def save(name: str, data: dict[str, Any]) -> Path:
    return save_json(WORK, name, data)


def load(name: str) -> dict[str, Any] | None:
    path = WORK / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def machine() -> dict[str, Any]:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or "?",
            "load_avg_at_start": os.getloadavg()}


def setup(method: str, ipc: int, seed: int, data_root: str, overrides: dict[str, Any], compile: str = "auto"):
    """Fashion-MNIST, the method's default config (plus overrides), a synthetic set from its default init; the
    distiller's speed layer is ``speed=auto`` with the compile rule or ``compile`` forced (common.ddkit_speed)."""
    from ddkit.data import load_dataset
    from ddkit.engine import make_generator
    from ddkit.methods import create_distiller
    from ddkit.synthetic import SyntheticSet

    real = load_dataset("fashion-mnist", data_root)
    distiller = create_distiller(method, dataset="fashion-mnist", ipc=ipc)
    apply_overrides(distiller.config, overrides)
    distiller.speed = ddkit_speed(compile)  # before setup, which decides compilation
    syn = SyntheticSet.from_real(real, ipc, make_generator(seed, "init"), init=distiller.config.init)
    return real, distiller, syn


# ------------------------------------------------------------------------------------------------------- speed
def official_dm_step(distiller, real, syn, generator: torch.Generator) -> dict[str, float]:
    """``main_DM.py`` ConvNet branch: per class, one forward of 256 real and one of the class's synthetic images."""
    from ddkit.accel import patchnorm
    from ddkit.methods.dm import frozen_embedder

    cfg = distiller.config
    net = frozen_embedder(distiller, real, generator, syn.images.dtype)
    patchnorm.uninstall(net)  # plain modules: the official nn.Conv2d -> nn.GroupNorm computation, NCHW, eager
    loss = torch.zeros(())
    for c in range(real.num_classes):
        img_real = distiller.real_batch(real, c, cfg.batch_real, generator)
        img_syn = syn.images[c * syn.ipc:(c + 1) * syn.ipc]
        if not distiller.aug.is_identity:
            p = distiller.aug.sample(1, generator)
            img_real = distiller.aug.apply(img_real, p)
            img_syn = distiller.aug.apply(img_syn, p)
        output_real = net.features(img_real).detach()
        output_syn = net.features(img_syn)
        loss = loss + ((output_real.mean(0) - output_syn.mean(0)) ** 2).sum()
    distiller.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    distiller.optimizer.step()
    return {"loss": float(loss.detach())}


def cmd_speed(args: argparse.Namespace) -> None:
    from ddkit.engine import make_generator

    overrides = json.loads(args.set) if args.set else {}
    paired_keep = args.variant == "paired" and args.allocator == "keep"  # both variants keep memory
    keeps_memory = allocator_as_run("ddkit" if paired_keep else args.variant)
    real, distiller, syn = setup(args.method, args.ipc, args.seed, args.data_root, overrides, args.compile)
    generator = make_generator(args.seed, "distill")
    distiller.setup(real, syn, generator)
    if args.variant == "paired":
        return cmd_speed_paired(args, real, distiller, syn, generator, overrides, keeps_memory)
    step: Callable[[int], dict[str, float]]
    if args.variant == "official":
        assert args.method == "dm", "the official-formulation variant exists for DM only"
        step = lambda it: official_dm_step(distiller, real, syn, generator)  # noqa: E731
    elif args.split:
        assert args.method == "dm", "--split times DM's phases"
        step = lambda it: dm_split_step(distiller, real, syn, generator)  # noqa: E731
    else:
        step = lambda it: distiller.step(it, real, syn, generator)  # noqa: E731
    times, metrics = [], []
    start = machine()
    for it in range(1, args.warmup + args.iters + 1):
        t0 = time.perf_counter()
        m = step(it)
        dt = time.perf_counter() - t0
        if it > args.warmup:
            times.append(dt)
            metrics.append(m)
        print(f"it {it}: {dt:.3f} s {json.dumps({k: round(v, 4) for k, v in m.items()})}", flush=True)
    result = {
        "method": args.method, "variant": args.variant, "ipc": args.ipc, "iters": args.iters,
        "warmup": args.warmup, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
        "times": times, "peak_rss_mib": peak_rss_mib(), "overrides": overrides, "compile": args.compile,
        "speed": repr(distiller.speed), "config": {k: v for k, v in vars(distiller.config).items()}, "machine": start,
        "load_avg_at_end": os.getloadavg(), "metrics": metrics, "keeps_freed_memory": keeps_memory,
        "median_metrics": {k: statistics.median(m[k] for m in metrics) for k in metrics[0]} if metrics else {},
    }
    name = f"speed_{args.method}_{args.variant}_ipc{args.ipc}" + (f"_{args.tag}" if args.tag else "")
    print(save(name, result))
    print(json.dumps({k: result[k] for k in ("median_s", "peak_rss_mib", "median_metrics")}))


def cmd_speed_paired(args: argparse.Namespace, real, distiller, syn, generator, overrides,
                     keeps_memory: bool) -> None:
    """DM, ddkit and the official formulation side by side in one process: each round runs one iteration of
    each, alternating which goes first, so that both see the same machine state (this VM's speed drifts by
    10-20 % between processes and sessions).  Reports each variant's median and the median of the per-round
    ratios.  Peak memory is not separable here; take it from the single-variant runs.  ``--allocator keep`` gives
    both variants ddkit's allocator setting (which spares the official formulation's whole-batch passes their
    page faults): the conservative comparison."""
    assert args.method == "dm", "the paired variant exists for DM only"
    steps = {"ddkit": lambda it: distiller.step(it, real, syn, generator),
             "official": lambda it: official_dm_step(distiller, real, syn, generator)}
    times: dict[str, list[float]] = {"ddkit": [], "official": []}
    start = machine()
    for it in range(1, args.warmup + args.iters + 1):
        order = ("official", "ddkit") if it % 2 else ("ddkit", "official")
        row = {}
        for name in order:
            t0 = time.perf_counter()
            steps[name](it)
            row[name] = time.perf_counter() - t0
            if it > args.warmup:
                times[name].append(row[name])
        print(f"round {it}: ddkit {row['ddkit']:.3f} s, official {row['official']:.3f} s, "
              f"ratio {row['ddkit'] / row['official']:.3f}", flush=True)
    ratios = [d / o for d, o in zip(times["ddkit"], times["official"])]
    result = {
        "method": args.method, "variant": "paired", "ipc": args.ipc, "iters": args.iters, "warmup": args.warmup,
        "times": times, "median_s": {k: statistics.median(v) for k, v in times.items()},
        "ratio_of_medians": statistics.median(times["ddkit"]) / statistics.median(times["official"]),
        "median_round_ratio": statistics.median(ratios), "round_ratios": ratios, "overrides": overrides,
        "compile": args.compile, "speed": repr(distiller.speed), "keeps_freed_memory": keeps_memory,
        "machine": start, "load_avg_at_end": os.getloadavg(),
    }
    name = f"speed_dm_paired_ipc{args.ipc}" + (f"_{args.tag}" if args.tag else "")
    print(save(name, result))
    print(json.dumps({k: result[k] for k in ("median_s", "ratio_of_medians", "median_round_ratio")}))


def dm_split_step(distiller, real, syn, generator) -> dict[str, float]:
    """One ddkit DM iteration timed by phase: real branch (draw and class means), synthetic forward, backward."""
    t0 = time.perf_counter()
    draw = distiller.draw(real, syn, generator)
    t1 = time.perf_counter()
    means = distiller.syn_means(draw, syn.images, distiller._syn_labels, distiller._syn_row_class, real.num_classes)
    loss = ((draw.real_means - means) ** 2).sum()
    t2 = time.perf_counter()
    distiller.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    t3 = time.perf_counter()
    distiller.optimizer.step()
    return {"loss": float(loss.detach()), "s_real_branch": t1 - t0, "s_syn_forward": t2 - t1, "s_backward": t3 - t2}


# ---------------------------------------------------------------------------------------------------- accuracy
def cmd_accuracy(args: argparse.Namespace) -> None:
    from ddkit.engine import distill
    from ddkit.engine.callbacks import Callback
    from ddkit.evaluation import EvalProtocol, evaluate

    class Record(Callback):
        """Keeps each iteration's metrics (CAFE: image updates, inner epochs, seconds)."""

        def __init__(self) -> None:
            self.rows: list[dict[str, float]] = []

        def on_iteration_end(self, state) -> None:
            self.rows.append(dict(state.metrics))

    overrides = json.loads(args.set) if args.set else {}
    keeps_memory = allocator_as_run("ddkit")  # as `ddkit distill` / `ddkit evaluate` run
    real, distiller, syn = setup(args.method, args.ipc, args.seed, args.data_root, overrides, args.compile)
    distiller.config.iterations = args.iters  # as `ddkit distill --iterations N`: the compile rule reads the run's length
    protocol = EvalProtocol(runs=args.runs, epochs=args.epochs, dsa=True)
    t0 = time.perf_counter()
    before = None if args.skip_init else evaluate(syn, real, protocol, seed=args.seed)
    t_eval = time.perf_counter() - t0
    t0 = time.perf_counter()
    record = Record()
    distill(distiller, real, syn, iterations=args.iters, seed=args.seed, callbacks=[record])
    t_distill = time.perf_counter() - t0
    after = evaluate(syn, real, protocol, seed=args.seed)
    accs = {"init": [r.accuracy for r in before.rows] if before else [], "after": [r.accuracy for r in after.rows]}
    result = {
        "method": args.method, "ipc": args.ipc, "iters": args.iters, "runs": args.runs, "epochs": args.epochs,
        "dsa_eval": True, "seed": args.seed, "accuracy": accs, "distill_s": t_distill,
        "eval_s_per_model": t_eval / max(args.runs, 1) if before else None, "overrides": overrides,
        "compile": args.compile, "speed": repr(distiller.speed), "machine": machine(),
        "peak_rss_mib": peak_rss_mib(), "metrics": record.rows, "keeps_freed_memory": keeps_memory,
    }
    name = f"acc_{args.method}_ipc{args.ipc}_it{args.iters}" + (f"_{args.tag}" if args.tag else "")
    print(save(name, result))
    print(json.dumps({k: statistics.fmean(v) for k, v in accs.items() if v}))


# ------------------------------------------------------------------------------------------------------ report
def _ms(xs: list[float]) -> str:
    if not xs:
        return "–"
    std = statistics.pstdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):.2f} ± {std:.2f}"


def cmd_report(args: argparse.Namespace) -> None:
    lines = ["## DM and CAFE (Fashion-MNIST, CPU, 2 threads)", ""]
    lines += [
        "Machine: a 2-core AMD EPYC VM (AVX2), torch 2.13 CPU, 2 threads, otherwise idle; one benchmark at a time",
        "under `flock /tmp/ddkit-bench.lock`.  *official formulation* runs `main_DM.py`'s per-class loop (eager,",
        "NCHW, one batch of 256 real images per class) inside ddkit on this machine in the same session: the",
        "like-for-like ratio.  anchors.md section R was measured on a machine of this kind that ran about 2.4x",
        "faster than this one (the official-style evaluation: 217 s here, 90 s there).  ddkit's DM runs with the",
        "speed layer (`speed=auto`: compiled channels-last embedder for runs long enough to repay it, cache-sized",
        "chunks).  Medians over 6 iterations after 2 warm-up iterations (which include the compile).",
        "",
        "### DM: seconds per iteration and peak memory (ConvNet-3, 256 real images per class, DSA on)",
        "",
        "| IPC | ddkit s/it (median) | peak RSS MiB | official formulation in ddkit, s/it | ratio to it |"
        " reference s/it (section R) | ratio to reference | reference peak MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for ipc in (1, 10, 50):
        ours = load(f"speed_dm_ddkit_ipc{ipc}")
        off = load(f"speed_dm_official_ipc{ipc}")
        ref_s, ref_mib = REFERENCE_DM[ipc]
        if ours is None:
            continue
        o = f"{off['median_s']:.2f}" if off else "–"
        r = f"{ours['median_s'] / off['median_s']:.2f}" if off else "–"
        lines.append(f"| {ipc} | {ours['median_s']:.2f} | {ours['peak_rss_mib']:.0f} | {o} | {r} | {ref_s:.2f} | "
                     f"{ours['median_s'] / ref_s:.2f} | {ref_mib} |")
    lines += ["", "### DM against the official formulation in one process (`speed --variant paired`)", "",
              "Each round runs one iteration of each, alternating which goes first; medians over the rounds after "
              "the warm-up.", "", "| IPC | rounds | ddkit s/it | official formulation s/it | ratio of medians |"
              " median of per-round ratios |", "|---|---|---|---|---|---|"]
    for ipc in (1, 10, 50):
        found = sorted(WORK.glob(f"speed_dm_paired_ipc{ipc}*.json"), key=lambda p: p.stat().st_mtime)
        if not found:
            continue
        res = json.loads(found[-1].read_text())
        lines.append(f"| {ipc} | {res['iters']} | {res['median_s']['ddkit']:.2f} | {res['median_s']['official']:.2f} |"
                     f" {res['ratio_of_medians']:.2f} | {res['median_round_ratio']:.2f} |")
    acc = load("acc_dm_ipc10_it99")
    lines += ["", "### DM: accuracy at the reference budget (IPC 10, 99 iterations)", ""]
    if acc:
        lines += [
            f"Evaluation: {acc['runs']} fresh ConvNet-3 per row, {acc['epochs']} epochs, DSA during training, lr 0.01 "
            "(x0.1 at half), SGD momentum 0.9, weight decay 5e-4, full 10k test set; same seeds for both rows.",
            "",
            "| synthetic set | ddkit | reference (official DM, section R) |",
            "|---|---|---|",
            f"| real initialisation | {_ms(acc['accuracy']['init'])} | {REFERENCE_ACC['init']} |",
            f"| after 99 DM iterations | {_ms(acc['accuracy']['after'])} | {REFERENCE_ACC['after 99 iterations']} |",
            "",
            f"Distillation wall time for the 99 iterations: {acc['distill_s']:.0f} s.",
        ]
    lines += ["", "### CAFE: seconds per outer iteration (ConvNet-3, official schedule and stopping rules)", "",
              "| IPC | s per outer iteration (median) | image updates per iteration | network epochs per iteration |"
              " peak RSS MiB |", "|---|---|---|---|---|"]
    for ipc in (1, 10):
        res = load(f"speed_cafe_ddkit_ipc{ipc}")
        if res is None:
            continue
        ups = [m.get("updates", 0) for m in res["metrics"]]
        eps = [m.get("inner_epochs", 0) for m in res["metrics"]]
        lines.append(f"| {ipc} | {res['median_s']:.1f} | {statistics.median(ups):.0f} | {statistics.median(eps):.0f} |"
                     f" {res['peak_rss_mib']:.0f} |")
    for ipc in (1, 10):
        res = load(f"acc_cafe_ipc{ipc}_it{args.cafe_iters}")
        if res is None:
            continue
        lines += ["", f"CAFE accuracy after {res['iters']} outer iterations at IPC {ipc} (noise initialisation, "
                      f"{res['runs']} ConvNets x {res['epochs']} epochs with DSA): init {_ms(res['accuracy']['init'])}, "
                      f"after {_ms(res['accuracy']['after'])} ({res['distill_s']:.0f} s of distillation)."]
    lines += ["", "### Full-budget commands (GPU) for the papers' rows", "",
              "Each command uses the method's full-budget defaults (DM: 20,000 iterations, lr_img 1, 256 real per "
              "class, real init, DSA; CAFE: 2,000 outer iterations, lr_img 0.1, noise init).  Evaluate with the DM "
              "protocol (5 fresh ConvNet-3, 1000 epochs, DSA).", ""]
    lines += _commands()
    out = ROOT / "RESULTS_dm_cafe.md"
    out.write_text("\n".join(lines) + "\n")
    print(out)


def _commands() -> list[str]:
    names = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST", "cifar10": "CIFAR-10"}
    short = {"mnist": "mnist", "fashion-mnist": "fmnist", "cifar10": "c10"}
    rows = ["| method | dataset | IPC | paper | distill | evaluate |", "|---|---|---|---|---|---|"]
    for method, label, extra in (("dm", "dm", ""), ("cafe", "cafe", ""), ("cafe", "cafe+dsa", " --set method.dsa=true")):
        for dataset in ("mnist", "fashion-mnist", "cifar10"):
            for i, ipc in enumerate((1, 10, 50)):
                out = f"runs/{label.replace('+', '_')}_{short[dataset]}_{ipc}"
                distill = (f"`ddkit distill --method {method} --dataset {dataset} --ipc {ipc} --out {out} "
                           f"--data-root DATA --device cuda{extra}`")
                evaluate = f"`ddkit evaluate {out} --data-root DATA --runs 5 --epochs 1000 --device cuda`"
                rows.append(f"| {label} | {names[dataset]} | {ipc} | {PAPER[(label, dataset)][i]} | {distill} | {evaluate} |")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("speed", "accuracy"):
        p = sub.add_parser(name)
        p.add_argument("--method", choices=["dm", "cafe"], default="dm")
        p.add_argument("--ipc", type=int, default=10)
        p.add_argument("--iters", type=int, default=15 if name == "speed" else 99)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--data-root", default=DATA)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--set", default="", help='JSON method-config overrides, e.g. \'{"batch_real": 128}\'')
        p.add_argument("--compile", choices=list(COMPILE_CHOICES), default="auto",
                       help="ddkit side: the speed layer's compile rule (auto) or forced on/off")
        p.add_argument("--tag", default="")
        if name == "speed":
            p.add_argument("--warmup", type=int, default=3)
            p.add_argument("--variant", choices=["ddkit", "official", "paired"], default="ddkit",
                           help="paired: DM only, ddkit and the official formulation alternating in one process")
            p.add_argument("--allocator", choices=["default", "keep"], default="default",
                           help="paired: glibc defaults for both, or ddkit's keep_freed_memory for both")
            p.add_argument("--split", action="store_true", help="DM: time the real branch, synthetic forward "
                           "and backward separately (ddkit variant)")
        else:
            p.add_argument("--runs", type=int, default=2)
            p.add_argument("--epochs", type=int, default=300)
            p.add_argument("--skip-init", action="store_true",
                           help="do not score the initial set (saves an evaluation at large IPC)")
    p = sub.add_parser("report")
    p.add_argument("--cafe-iters", type=int, default=2)
    args = parser.parse_args(argv)
    if hasattr(args, "threads"):
        torch.set_num_threads(args.threads)
    {"speed": cmd_speed, "accuracy": cmd_accuracy, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    main()
