"""MTT on Fashion-MNIST beside the official mtt-distillation code run on the same machine (issue 15).

The official side is ``/work/shared/refbench/refbench.sh`` with ``REFBENCH_WHAT=mtt`` (its ``buffer.py`` and
``distill.py``, run unchanged apart from the run-time edits that script lists) plus, for accuracy, ``distill.py``
from the same patched scratch copy with an evaluation at the last iteration (``official-accuracy``).  Subcommands
(each prints one JSON line; ``speed`` and ``accuracy`` also store ``results/mtt_*.json``):

  experts            seconds per expert epoch: one expert, ``--epochs`` epochs on the first ``--train-n`` training
                     images, a test pass over the full 10k test set after every epoch (as buffer.py); ddkit's
                     defaults (SGD 0.01, batch 256, DSA).  Also writes the store the distill timings use.
  distill            seconds per distillation iteration (median after ``--warmup``) and peak RSS of this process:
                     IPC 10, expert_epochs 2, max_start_epoch 1 (the refbench settings), ``--syn-steps``,
                     ``--grad-mode``.  Run by ``speed`` in a fresh process per setting.
  speed              experts + distill at syn_steps 10/20/40 (checkpoint; ``--also-graph`` adds the unrolled graph).
  import-official    a ddkit store from buffer.py's ``replay_buffer_0.pt`` (list of experts, each a list of epochs,
                     each a list of parameters in ``net.parameters()`` order), so both sides of the accuracy
                     comparison match the very same trajectories.
  accuracy           ddkit: ``--iters`` iterations from a store, then the *official* evaluator (``evaluate_synset``
                     of the mtt-distillation scratch copy, with the learned lr, DSA, ``--epochs`` epochs,
                     ``--models`` networks) on the result and on its real-image initialisation.
  official-accuracy  the official distill.py for ``--iters`` iterations with the same settings, evaluated by itself
                     at iteration 0 and at the last iteration (``--eval_it ITERS --num_eval MODELS``).

Typical session (the official run at syn_steps 40 needs ~15 GiB: take the lock, run it alone):

  REF_DC_DIR=/work/ref/dc REF_MTT_DIR=/work/ref/mtt REF_VENV=/work/ref/venv FMNIST_ROOT=/work/ref/fm \\
    REFBENCH_WHAT=mtt MTT_BUFFER_TRAIN_N=6000 MTT_TRAIN_EPOCHS=2 MTT_ITERS=6 MTT_WARMUP=2 OUT_DIR=... \\
    flock /tmp/ddkit-bench.lock /work/shared/refbench/refbench.sh
  flock /tmp/ddkit-bench.lock python -m benchmarks.bench_mtt speed --data /work/ref/fm --train-n 6000
  python -m benchmarks.bench_mtt import-official SCRATCH/buffers/FashionMNIST/ConvNet/replay_buffer_0.pt --out S
  python -m benchmarks.bench_mtt accuracy --store S --ref-mtt SCRATCH/mtt --iters 60 --syn-steps 10
  python -m benchmarks.bench_mtt official-accuracy --ref-mtt SCRATCH/mtt --buffers SCRATCH/buffers --iters 60 ...
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, peak_rss_mib, run_child, save_results

REF_VENV = os.environ.get("REF_VENV", "/work/ref/venv")
FM_ROOT = os.environ.get("FMNIST_ROOT", "/work/ref/fm")


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _fashion(root: str, train_n: int | None = None):
    import ddkit

    real = ddkit.load_dataset("fashion-mnist", root)
    if train_n:
        real = dataclasses.replace(real, train_images=real.train_images[:train_n],
                                   train_labels=real.train_labels[:train_n])
    return real


# ---------------------------------------------------------------------------------------------------- experts
def cmd_experts(args: argparse.Namespace) -> dict[str, Any]:
    from ddkit.accel import keep_freed_memory
    from ddkit.experts import ExpertConfig, train_experts

    keep_freed_memory()  # as the ddkit CLI runs
    _threads(args.threads)
    real = _fashion(args.data, args.train_n)
    config = ExpertConfig(epochs=args.epochs)
    store = train_experts(real, config, args.out, 1, seed=0)
    info = store.info(0)
    train_s, test_s = info["train_seconds_per_epoch"], info["test_seconds_per_epoch"]
    row = {"what": "ddkit-experts", "train_n": len(real.train_images), "epochs": args.epochs,
           "train_s_median": statistics.median(train_s), "test_s_median": statistics.median(test_s),
           "epoch_s_median": statistics.median([a + b for a, b in zip(train_s, test_s)]),
           "test_accuracy": info["test_accuracy_per_epoch"], "peak_rss_mib": peak_rss_mib(), "store": str(store.root),
           "load_avg": os.getloadavg()}
    save_results(f"mtt_experts{args.tag}", row)
    return row


# ---------------------------------------------------------------------------------------------------- distill
def _distill_options(args: argparse.Namespace, store: str) -> dict[str, Any]:
    # refbench: --ipc 10 --expert_epochs 2 --max_start_epoch 1, distill.py's defaults otherwise
    return {"experts": store, "syn_steps": args.syn_steps, "expert_epochs": 2, "max_start_epoch": 1,
            "grad_mode": args.grad_mode}


def cmd_distill(args: argparse.Namespace) -> dict[str, Any]:
    import ddkit
    from ddkit.accel import keep_freed_memory
    from ddkit.engine import Callback

    if args.allocator == "keep":
        keep_freed_memory()
    _threads(args.threads)
    real = _fashion(args.data)
    seconds: list[float] = []
    losses: list[float] = []

    class Timer(Callback):
        def on_iteration_end(self, state) -> None:
            seconds.append(state.metrics["seconds"])
            losses.append(state.metrics["loss"])

    ddkit.distill(real, "mtt", ipc=args.ipc, iterations=args.warmup + args.iters, seed=0, device="cpu",
                  callbacks=[Timer()], **_distill_options(args, args.store))
    measured = seconds[args.warmup:]
    return {"what": "ddkit-distill", "ipc": args.ipc, "syn_steps": args.syn_steps, "grad_mode": args.grad_mode,
            "allocator": args.allocator, "n": len(measured), "median_s": statistics.median(measured),
            "min_s": min(measured), "max_s": max(measured), "seconds": seconds, "loss": losses,
            "peak_rss_mib": peak_rss_mib(), "load_avg": os.getloadavg()}


def cmd_speed(args: argparse.Namespace) -> dict[str, Any]:
    store = args.store
    out: dict[str, Any] = {"machine": os.uname().nodename, "threads": args.threads, "when": time.strftime("%F %T")}
    if not store:
        store = str(Path(tempfile.mkdtemp(prefix="ddkit-mtt-store-")) / "store")
        out["experts"] = run_child(["-m", "benchmarks.bench_mtt", "experts", "--data", args.data, "--train-n",
                                    str(args.train_n), "--epochs", "2", "--out", store, "--threads", str(args.threads)])
        print(json.dumps(out["experts"]), file=sys.stderr, flush=True)
    modes = ["checkpoint"] + (["graph"] if args.also_graph else [])
    out["distill"] = []
    for steps in args.syn_steps_list:
        for mode in modes:
            row = run_child(["-m", "benchmarks.bench_mtt", "distill", "--data", args.data, "--store", store,
                             "--syn-steps", str(steps), "--grad-mode", mode, "--iters", str(args.iters),
                             "--warmup", str(args.warmup), "--threads", str(args.threads), "--allocator", args.allocator])
            out["distill"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "loss"}), file=sys.stderr, flush=True)
    save_results(f"mtt_speed{args.tag}", out)
    return out


# ---------------------------------------------------------------------------------------------------- official store
def cmd_import_official(args: argparse.Namespace) -> dict[str, Any]:
    """buffer.py's positional trajectories -> a ddkit store (names from ddkit's ConvNet, shapes checked)."""
    import torch

    from ddkit.experts import ExpertConfig, ExpertStore
    from ddkit.experts.train import store_spec
    from ddkit.models import create_model

    real = _fashion(args.data, args.train_n)
    # weights_only: a list of lists of lists of tensors, written by the official buffer.py run here
    buffer = torch.load(args.buffer, map_location="cpu", weights_only=True)
    names = [n for n, _ in create_model("convnet", channels=1, num_classes=10, image_size=(28, 28)).named_parameters()]
    epochs = len(buffer[0]) - 1
    spec = store_spec(real, ExpertConfig(epochs=epochs), seed=0)
    store = ExpertStore.create(args.out, spec, real.preprocess)
    for index, trajectory in enumerate(buffer):
        snaps = []
        for params in trajectory:
            if len(params) != len(names):
                raise SystemExit(f"expected {len(names)} parameters per epoch, got {len(params)}")
            snap = dict(zip(names, params))
            for n, p in snap.items():
                if list(p.shape) != spec.param_shapes[n]:
                    raise SystemExit(f"{n}: shape {list(p.shape)} vs ddkit's {spec.param_shapes[n]}")
            snaps.append(snap)
        store.write_expert(index, snaps, {"seed": None, "test_accuracy": float("nan"),
                                          "source": f"official buffer.py: {args.buffer}"})
    return {"what": "import-official", "experts": len(buffer), "epochs": epochs, "store": str(store.root)}


# ---------------------------------------------------------------------------------------------------- accuracy
#: scores a ddkit set with mtt-distillation's own evaluate_synset (its utils.py, from the patched scratch copy
#: refbench.sh made, which knows Fashion-MNIST), at the set's learned lr; runs in the reference venv
OFFICIAL_EVAL = r'''
import sys, time, json
import numpy as np, torch
mtt_dir, syn_path, root, epochs, models, lr = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
sys.path.insert(0, mtt_dir)
torch.set_num_threads(2)
from safetensors.torch import load_file
import utils
class A: pass
args = A()
args.zca, args.device, args.dataset, args.dsa, args.dc_aug_param = False, "cpu", "FashionMNIST", True, None
args.dsa_param, args.dsa_strategy = utils.ParamDiffAug(), "color_crop_cutout_flip_scale_rotate"
args.lr_net, args.epoch_eval_train, args.batch_train = lr, epochs, 256
channel, im_size, num_classes, *_, testloader, _, _, _ = utils.get_dataset("FashionMNIST", root, 256, args=args)
t = load_file(syn_path)
images, labels = t["images"].float(), t["labels"].long()
accs = []
for i in range(models):
    net = utils.get_network("ConvNet", channel, num_classes, im_size)
    _, _, acc = utils.evaluate_synset(i, net, images, labels, testloader, args)
    accs.append(100 * acc)
print("OFFICIAL_EVAL " + json.dumps({"accs": accs, "mean": float(np.mean(accs)), "std": float(np.std(accs)), "lr": lr}), flush=True)
'''


def official_eval(ref_mtt: str, syn_path: str, root: str, epochs: int, models: int, lr: float) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(OFFICIAL_EVAL)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="2")
    proc = subprocess.run([f"{REF_VENV}/bin/python", f.name, ref_mtt, syn_path, root, str(epochs), str(models), str(lr)],
                          capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("OFFICIAL_EVAL ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"official evaluation failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("OFFICIAL_EVAL "):])


def cmd_accuracy(args: argparse.Namespace) -> dict[str, Any]:
    import ddkit
    from ddkit.accel import keep_freed_memory
    from ddkit.engine import make_generator
    from ddkit.synthetic import SyntheticSet

    keep_freed_memory()
    _threads(args.threads)
    real = _fashion(args.data)
    opts = {**_distill_options(args, args.store), "max_start_epoch": args.max_start_epoch}
    t0 = time.perf_counter()
    syn = ddkit.distill(real, "mtt", ipc=args.ipc, iterations=args.iters, seed=args.seed, device="cpu", **opts)
    seconds = time.perf_counter() - t0
    out_dir = Path(tempfile.mkdtemp(prefix="ddkit-mtt-acc-"))
    syn.save(out_dir / "final")
    init = SyntheticSet.from_real(real, args.ipc, make_generator(args.seed, "init"))
    init.save(out_dir / "init")
    row = {"what": "ddkit-accuracy", "ipc": args.ipc, "syn_steps": args.syn_steps, "iters": args.iters,
           "distill_seconds": seconds, "learned_lr": syn.learned_lr, "sets": str(out_dir)}
    row["final"] = official_eval(args.ref_mtt, str(out_dir / "final" / "synset.safetensors"), args.data,
                                 args.epochs, args.models, syn.learned_lr)
    row["init"] = official_eval(args.ref_mtt, str(out_dir / "init" / "synset.safetensors"), args.data,
                                args.epochs, args.models, 0.01)
    save_results(f"mtt_accuracy{args.tag}", row)
    return row


def cmd_official_accuracy(args: argparse.Namespace) -> dict[str, Any]:
    """distill.py itself, evaluated by itself at iteration 0 and ``--iters`` (same settings as ``accuracy``)."""
    import re

    stub = str(Path(args.ref_mtt).parent / "stub")  # refbench.sh's do-nothing wandb
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", WANDB_MODE="disabled",
               PYTHONPATH=stub, PYTHONUNBUFFERED="1")
    cmd = [f"{REF_VENV}/bin/python", "distill.py", "--dataset", "FashionMNIST", "--model", "ConvNet", "--ipc",
           str(args.ipc), "--syn_steps", str(args.syn_steps), "--expert_epochs", "2", "--max_start_epoch",
           str(args.max_start_epoch), "--Iteration", str(args.iters), "--eval_it", str(args.iters), "--num_eval",
           str(args.models), "--epoch_eval_train", str(args.epochs), "--data_path", args.data, "--buffer_path",
           args.buffers]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=args.ref_mtt, capture_output=True, text=True, env=env)
    log = proc.stdout + proc.stderr
    Path(RESULTS / f"mtt_official_accuracy{args.tag}.log").write_text(log[-200000:])
    found = re.findall(r"Evaluate (\d+) random ConvNet, mean = ([\d.]+) std = ([\d.]+)", log)
    if proc.returncode != 0 or len(found) < 2:
        raise RuntimeError(f"official distill.py failed or printed no evaluation:\n{log[-3000:]}")
    row = {"what": "official-accuracy", "ipc": args.ipc, "syn_steps": args.syn_steps, "iters": args.iters,
           "seconds_total": time.perf_counter() - t0, "command": " ".join(cmd),
           "init": {"mean": 100 * float(found[0][1]), "std": 100 * float(found[0][2]), "n": int(found[0][0])},
           "final": {"mean": 100 * float(found[-1][1]), "std": 100 * float(found[-1][2]), "n": int(found[-1][0])}}
    save_results(f"mtt_official_accuracy{args.tag}", row)
    return row


# ---------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data", default=FM_ROOT, help="Fashion-MNIST root (torchvision layout)")
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--tag", default="")

    p = sub.add_parser("experts")
    common(p)
    p.add_argument("--train-n", type=int, default=6000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--out", required=True)
    for name in ("distill", "speed", "accuracy"):
        p = sub.add_parser(name)
        common(p)
        p.add_argument("--store", default="" if name == "speed" else None, required=name != "speed")
        p.add_argument("--ipc", type=int, default=10)
        p.add_argument("--iters", type=int, default=4 if name != "accuracy" else 60)
        p.add_argument("--warmup", type=int, default=2)
        p.add_argument("--grad-mode", default="checkpoint", choices=("checkpoint", "graph"))
        p.add_argument("--allocator", default="keep", choices=("keep", "default"),
                       help="keep: freed memory stays in the process, as the ddkit CLI runs")
        if name == "speed":
            p.add_argument("--syn-steps-list", type=int, nargs="+", default=[10, 20, 40])
            p.add_argument("--train-n", type=int, default=6000)
            p.add_argument("--also-graph", action="store_true")
        else:
            p.add_argument("--syn-steps", type=int, default=10)
        if name == "accuracy":
            p.add_argument("--ref-mtt", required=True, help="the patched mtt-distillation scratch copy of refbench.sh")
            p.add_argument("--max-start-epoch", type=int, default=1)
            p.add_argument("--epochs", type=int, default=300)
            p.add_argument("--models", type=int, default=2)
            p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("import-official")
    common(p)
    p.add_argument("buffer")
    p.add_argument("--out", required=True)
    p.add_argument("--train-n", type=int, default=6000)
    p = sub.add_parser("official-accuracy")
    common(p)
    p.add_argument("--ref-mtt", required=True)
    p.add_argument("--buffers", required=True, help="refbench's buffer folder (SCRATCH/buffers)")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--syn-steps", type=int, default=10)
    p.add_argument("--max-start-epoch", type=int, default=1)
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--models", type=int, default=2)
    args = parser.parse_args(argv)
    handler = {"experts": cmd_experts, "distill": cmd_distill, "speed": cmd_speed, "accuracy": cmd_accuracy,
               "import-official": cmd_import_official, "official-accuracy": cmd_official_accuracy}[args.cmd]
    print(json.dumps(handler(args)), flush=True)


if __name__ == "__main__":
    main()
