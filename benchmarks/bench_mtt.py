"""MTT on Fashion-MNIST beside the official mtt-distillation code run on the same machine (issue 15).

The official side is ``/work/shared/refbench/refbench.sh`` with ``REFBENCH_WHAT=mtt`` (its ``buffer.py`` and
``distill.py``, run unchanged apart from the run-time edits that script lists) plus, for accuracy, ``distill.py``
from the same patched scratch copy with an evaluation at the last iteration (``official-accuracy``).  Subcommands
(each prints one JSON line; ``speed`` and ``accuracy`` also store ``results/mtt/*.json``):

  experts            seconds per expert epoch: one expert, ``--epochs`` epochs on the first ``--train-n`` training
                     images, a test pass over the full 10k test set after every epoch (as buffer.py); ddkit's
                     defaults (SGD 0.01, batch 256, DSA) through the speed layer.  ``--compile auto`` applies the
                     one compile rule to this short run (eager below 1.5e7 pixel-steps); ``on`` is what a
                     full-size store (60k images x 50 epochs) runs: epoch 1 then includes the compile and the
                     median is taken over the later epochs.  Also writes the store the distill timings use.
  distill            seconds per distillation iteration (median after ``--warmup``) and peak RSS of this process:
                     IPC 10, expert_epochs 2, max_start_epoch 1 (the refbench settings), ``--syn-steps``,
                     ``--grad-mode``.  Run by ``speed`` in a fresh process per setting.
  speed              experts + distill at syn_steps 10/20/40 (checkpoint; ``--also-graph`` adds the unrolled graph).
  import-official    a ddkit store from buffer.py's ``replay_buffer_0.pt`` (list of experts, each a list of epochs,
                     each a list of parameters in ``net.parameters()`` order).  Refuses a buffer whose epochs are
                     all equal: buffer.py run on CPU stores ``p.detach().cpu()``, the live parameter itself, so
                     every epoch is the final network (and distill.py's loss is x / 0 with it).
  export-official    the other way: a ddkit store written in buffer.py's layout, so that both sides of the
                     accuracy comparison match the very same (ddkit-trained) trajectories.
  accuracy           ddkit: ``--iters`` iterations from a store; saves the set and its real-image initialisation
                     (``--score`` also scores them here; otherwise run ``score`` on each, one locked command each).
  official-accuracy  the official distill.py for ``--iters`` iterations with the same settings, run from a copy of
                     the scratch folder with one run-time edit (the final images, labels and learned lr saved as
                     safetensors after the loop; its own evaluation is off: ``--num_eval 0``).
  official-speed     distill.py's seconds per iteration and peak RSS on a given buffer folder (real trajectories,
                     unlike refbench's CPU buffers).
  score              the *official* evaluator (``evaluate_synset`` of the mtt-distillation scratch copy: the learned
                     lr, DSA, ``--epochs`` epochs, ``--models`` networks) on one saved set, so both sides are scored
                     by the same evaluator with the same seeds.

Typical session (the official run at syn_steps 40 needs ~15 GiB: take the lock, run it alone):

  REF_DC_DIR=/work/ref/dc REF_MTT_DIR=/work/ref/mtt REF_VENV=/work/ref/venv FMNIST_ROOT=/work/ref/fm \\
    REFBENCH_WHAT=mtt MTT_BUFFER_TRAIN_N=6000 MTT_TRAIN_EPOCHS=2 MTT_ITERS=6 MTT_WARMUP=2 OUT_DIR=... \\
    flock /tmp/ddkit-bench.lock /work/shared/refbench/refbench.sh
  flock /tmp/ddkit-bench.lock python -m benchmarks.bench_mtt speed --data /work/ref/fm --train-n 6000
  python -m benchmarks.bench_mtt import-official SCRATCH/buffers/FashionMNIST/ConvNet/replay_buffer_0.pt --out S
  python -m benchmarks.bench_mtt accuracy --store S --iters 30 --syn-steps 10              # -> SETS/final, SETS/init
  python -m benchmarks.bench_mtt official-accuracy --ref-mtt SCRATCH/mtt --buffers SCRATCH/buffers --iters 30 ...
  python -m benchmarks.bench_mtt score SETS/final/synset.safetensors --ref-mtt SCRATCH/mtt --tag _ddkit
  python -m benchmarks.bench_mtt score OFFICIAL_SET.safetensors --ref-mtt SCRATCH/mtt --tag _official
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

    from ddkit.accel import SpeedLayer

    keep_freed_memory()  # as the ddkit CLI runs
    _threads(args.threads)
    real = _fashion(args.data, args.train_n)
    config = ExpertConfig(epochs=args.epochs, speed=args.speed)
    forced = {"auto": None, "on": True, "off": False}[args.compile]
    speed = SpeedLayer(args.speed, "cpu", compile=forced)
    store = train_experts(real, config, args.out, 1, seed=0, speed=speed)
    info = store.info(0)
    train_s, test_s = info["train_seconds_per_epoch"], info["test_seconds_per_epoch"]
    # a forced compile is paid in epoch 1: the steady cost is the median of the later epochs
    skip = 1 if args.compile == "on" and len(train_s) > 1 else 0
    row = {"what": "ddkit-experts", "train_n": len(real.train_images), "epochs": args.epochs, "speed": args.speed,
           "compile": args.compile, "epochs_skipped": skip,
           "train_s_median": statistics.median(train_s[skip:]), "test_s_median": statistics.median(test_s[skip:]),
           "epoch_s_median": statistics.median([a + b for a, b in zip(train_s[skip:], test_s[skip:])]),
           "train_s": train_s, "test_s": test_s,
           "test_accuracy": info["test_accuracy_per_epoch"], "peak_rss_mib": peak_rss_mib(), "store": str(store.root),
           "load_avg": os.getloadavg()}
    save_results(f"mtt/experts{args.tag}", row)
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
    modes = [args.grad_mode] + (["graph"] if args.also_graph and args.grad_mode != "graph" else [])
    out["distill"] = []
    for steps in args.syn_steps_list:
        for mode in modes:
            row = run_child(["-m", "benchmarks.bench_mtt", "distill", "--data", args.data, "--store", store,
                             "--syn-steps", str(steps), "--grad-mode", mode, "--iters", str(args.iters),
                             "--warmup", str(args.warmup), "--threads", str(args.threads), "--allocator", args.allocator])
            out["distill"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "loss"}), file=sys.stderr, flush=True)
    save_results(f"mtt/speed{args.tag}", out)
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
        if all(torch.equal(a, b) for a, b in zip(trajectory[0], trajectory[-1])):
            # buffer.py keeps ``p.detach().cpu()`` per epoch, which on a CPU run is the live parameter itself (no
            # copy): every epoch of such a buffer is the final network, and distill.py divides by zero with it
            raise SystemExit(f"{args.buffer}: expert {index} has the same parameters at every epoch (buffer.py run "
                             "on CPU stores the live parameters, not copies); export a ddkit store instead "
                             "(export-official)")
        snaps = []
        for params in trajectory:
            if len(params) != len(names):
                raise SystemExit(f"expected {len(names)} parameters per epoch, got {len(params)}")
            snap = {n: t.clone() for n, t in zip(names, params)}
            for n, p in snap.items():
                if list(p.shape) != spec.param_shapes[n]:
                    raise SystemExit(f"{n}: shape {list(p.shape)} vs ddkit's {spec.param_shapes[n]}")
            snaps.append(snap)
        store.write_expert(index, snaps, {"seed": None, "test_accuracy": float("nan"),
                                          "source": f"official buffer.py: {args.buffer}"})
    return {"what": "import-official", "experts": len(buffer), "epochs": epochs, "store": str(store.root)}


def cmd_export_official(args: argparse.Namespace) -> dict[str, Any]:
    """A ddkit store -> buffer.py's layout (``BUFFERS/FashionMNIST/ConvNet/replay_buffer_0.pt``: a list of experts,
    each a list of epochs, each the parameters in ``net.parameters()`` order), so that distill.py matches the very
    same trajectories as ddkit.  (buffer.py run on CPU cannot provide them: see import-official.)"""
    import torch

    from ddkit.experts import ExpertStore
    from ddkit.models import create_model

    store = ExpertStore.open(args.store)
    names = [n for n, _ in create_model("convnet", channels=1, num_classes=10, image_size=(28, 28)).named_parameters()]
    if list(store.spec.param_shapes) != names and set(store.spec.param_shapes) != set(names):
        raise SystemExit(f"{args.store}: not a Fashion-MNIST ConvNet store ({list(store.spec.param_shapes)})")
    buffer = [[[store.load(e, k)[n].contiguous() for n in names] for k in range(store.epochs + 1)]
              for e in store.experts()]
    out = Path(args.out) / "FashionMNIST" / "ConvNet"
    out.mkdir(parents=True, exist_ok=True)
    torch.save(buffer, out / "replay_buffer_0.pt")
    return {"what": "export-official", "experts": len(buffer), "epochs": store.epochs, "buffers": str(args.out)}


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
    out_dir = Path(args.sets or tempfile.mkdtemp(prefix="ddkit-mtt-acc-"))
    syn.save(out_dir / "final")
    init = SyntheticSet.from_real(real, args.ipc, make_generator(args.seed, "init"))
    init.save(out_dir / "init")
    row = {"what": "ddkit-accuracy", "ipc": args.ipc, "syn_steps": args.syn_steps, "iters": args.iters,
           "grad_mode": args.grad_mode, "distill_seconds": seconds, "learned_lr": syn.learned_lr,
           "sets": str(out_dir), "load_avg": os.getloadavg()}
    if args.score:
        if not args.ref_mtt:
            raise SystemExit("--score needs --ref-mtt")
        row["final"] = official_eval(args.ref_mtt, str(out_dir / "final" / "synset.safetensors"), args.data,
                                     args.epochs, args.models, syn.learned_lr)
        row["init"] = official_eval(args.ref_mtt, str(out_dir / "init" / "synset.safetensors"), args.data,
                                    args.epochs, args.models, 0.01)
    save_results(f"mtt/accuracy{args.tag}", row)
    return row


def _set_lr(path: str) -> float:
    """The learned step size stored with a set: a ddkit set's ``lr`` extra (metadata), or the ``lr`` tensor that
    official-accuracy saves; 0.01 (the field's evaluation lr) for a set without one."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        if "lr" in keys:
            return float(f.get_tensor("lr"))
        for key in keys:
            if key.endswith("lr") and f.get_slice(key).get_shape() in ([], [1]):
                return float(f.get_tensor(key))
    return 0.01


def cmd_score(args: argparse.Namespace) -> dict[str, Any]:
    """One saved set scored by the official ``evaluate_synset`` at its learned lr (or ``--lr``)."""
    lr = args.lr if args.lr is not None else _set_lr(args.set)
    t0 = time.perf_counter()
    result = official_eval(args.ref_mtt, args.set, args.data, args.epochs, args.models, lr)
    row = {"what": "score", "set": args.set, "epochs": args.epochs, "models": args.models, "lr": lr,
           "seconds": time.perf_counter() - t0, **result, "load_avg": os.getloadavg()}
    save_results(f"mtt/score{args.tag}", row)
    return row


#: the one run-time edit official-accuracy makes to its copy of the scratch folder: after the distillation loop
#: (before ``wandb.finish()``), save the final images, labels and learned lr for ``score``
FINAL_SAVE = ("__import__('safetensors.torch').torch.save_file({'images': image_syn.detach().cpu().contiguous(), "
              "'labels': label_syn.detach().cpu().contiguous(), 'lr': syn_lr.detach().cpu().reshape(())}, "
              "__import__('os').environ['REFBENCH_FINAL'])")


def cmd_official_speed(args: argparse.Namespace) -> dict[str, Any]:
    """distill.py (refbench's scratch copy, with its timing marks) on a given buffer folder: seconds per iteration
    (median after ``--warmup``) and peak RSS (GNU time) per syn_steps, one process each.  refbench.sh can only
    time distill.py on the buffer its own buffer.py run wrote, which on CPU holds one network per epoch (see
    import-official): a loss of x / 0 and NaN images from the first update on; this times it on real
    trajectories (e.g. a ddkit store written by export-official)."""
    import re

    stub = str(Path(args.ref_mtt).parent / "stub")  # refbench.sh's do-nothing wandb
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               WANDB_MODE="disabled", PYTHONPATH=stub, PYTHONUNBUFFERED="1")
    rows = []
    for steps in args.syn_steps_list:
        with tempfile.NamedTemporaryFile(suffix=".time", delete=False) as tf:
            time_file = tf.name
        cmd = ["/usr/bin/time", "-v", "-o", time_file, f"{REF_VENV}/bin/python", "distill.py", "--dataset",
               "FashionMNIST", "--model", "ConvNet", "--ipc", str(args.ipc), "--syn_steps", str(steps),
               "--expert_epochs", "2", "--max_start_epoch", "1", "--Iteration", str(args.iters - 1), "--eval_it",
               "1000000", "--num_eval", "0", "--data_path", args.data, "--buffer_path", args.buffers]
        proc = subprocess.run(cmd, cwd=args.ref_mtt, capture_output=True, text=True, env=env)
        log = proc.stdout + proc.stderr
        (RESULTS / "mtt").mkdir(parents=True, exist_ok=True)
        (RESULTS / "mtt" / f"official_speed_s{steps}{args.tag}.log").write_text(log[-100000:])
        starts = {int(m[0]): float(m[1]) for m in re.findall(r"REFBENCH_START (\d+) ([\d.]+)", log)}
        ends = {int(m[0]): float(m[1]) for m in re.findall(r"REFBENCH_ITER (\d+) ([\d.]+)", log)}
        its = [ends[i] - starts[i] for i in sorted(ends) if i in starts]
        rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", Path(time_file).read_text())
        if proc.returncode != 0 or len(its) <= args.warmup:
            raise RuntimeError(f"official distill.py failed:\n{log[-3000:]}")
        losses = re.findall(r"loss = (\S+)", log)
        row = {"what": "official-distill", "ipc": args.ipc, "syn_steps": steps, "n": len(its) - args.warmup,
               "median_s": statistics.median(its[args.warmup:]), "min_s": min(its[args.warmup:]),
               "max_s": max(its[args.warmup:]), "seconds": its, "losses_logged": losses,
               "peak_rss_mib": int(rss.group(1)) / 1024 if rss else None, "buffers": args.buffers,
               "load_avg": os.getloadavg()}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    out = {"when": time.strftime("%F %T"), "distill": rows}
    save_results(f"mtt/official_speed{args.tag}", out)
    return out


def cmd_official_accuracy(args: argparse.Namespace) -> dict[str, Any]:
    """distill.py itself for ``--iters`` updates (``--Iteration ITERS-1``: its loop runs iterations 0..Iteration,
    each ending with an update), its final set saved for ``score``; same settings as ``accuracy``."""
    import re
    import shutil

    work = Path(tempfile.mkdtemp(prefix="mtt-official-acc-"))
    shutil.copytree(args.ref_mtt, work / "mtt", ignore=shutil.ignore_patterns("logged_files"))
    script = work / "mtt" / "distill.py"
    text = script.read_text()
    edited, count = re.subn(r"^(\s*)wandb\.finish\(\)", lambda m: f"{m.group(1)}{FINAL_SAVE}\n{m.group(0)}", text,
                            flags=re.M)
    if count != 1:
        raise SystemExit(f"{script}: expected one wandb.finish() to save the final set before, found {count}")
    script.write_text(edited)
    final = Path(args.out) if args.out else work / "official_final.safetensors"
    stub = str(Path(args.ref_mtt).parent / "stub")  # refbench.sh's do-nothing wandb
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", WANDB_MODE="disabled",
               PYTHONPATH=stub, PYTHONUNBUFFERED="1", REFBENCH_FINAL=str(final.resolve()))
    cmd = [f"{REF_VENV}/bin/python", "distill.py", "--dataset", "FashionMNIST", "--model", "ConvNet", "--ipc",
           str(args.ipc), "--syn_steps", str(args.syn_steps), "--expert_epochs", "2", "--max_start_epoch",
           str(args.max_start_epoch), "--Iteration", str(args.iters - 1), "--eval_it", "1000000", "--num_eval", "0",
           "--data_path", args.data, "--buffer_path", args.buffers]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work / "mtt", capture_output=True, text=True, env=env)
    log = proc.stdout + proc.stderr
    Path(RESULTS / "mtt" / f"official_accuracy{args.tag}.log").write_text(log[-200000:])
    if proc.returncode != 0 or not final.exists():
        raise RuntimeError(f"official distill.py failed or saved no final set:\n{log[-3000:]}")
    starts = {int(m[0]): float(m[1]) for m in re.findall(r"REFBENCH_START (\d+) ([\d.]+)", log)}
    ends = {int(m[0]): float(m[1]) for m in re.findall(r"REFBENCH_ITER (\d+) ([\d.]+)", log)}
    its = [ends[i] - starts[i] for i in sorted(ends) if i in starts]
    row = {"what": "official-accuracy", "ipc": args.ipc, "syn_steps": args.syn_steps, "iters": args.iters,
           "updates_logged": len(its), "median_s": statistics.median(its) if its else None,
           "seconds_total": time.perf_counter() - t0, "command": " ".join(cmd), "set": str(final),
           "learned_lr": _set_lr(str(final)), "load_avg": os.getloadavg()}
    save_results(f"mtt/official_accuracy{args.tag}", row)
    return row


# ---------------------------------------------------------------------------------------------------- GPU commands
#: expert stores of the full-budget runs: official buffer.py budget (100 experts x 50 epochs; ZCA where the official
#: table uses it); FTD's are GSAM stores with alpha 0.3 for CIFAR-10 IPC 1/10 and 1 elsewhere (FTD Table 7)
GPU_STORES: dict[str, str] = {
    "ex/c10_zca": "--dataset cifar10 --set data.zca=true",
    "ex/c10": "--dataset cifar10",
    "ex/c100_zca": "--dataset cifar100 --set data.zca=true",
    "ex/c100": "--dataset cifar100",
    "ex/fm": "--dataset fashion-mnist",
    "ex/c10_zca_gsam03": "--dataset cifar10 --set data.zca=true --optimizer gsam --set expert.alpha=0.3",
    "ex/c10_zca_gsam": "--dataset cifar10 --set data.zca=true --optimizer gsam",
    "ex/c100_zca_gsam": "--dataset cifar100 --set data.zca=true --optimizer gsam",
    "ex/fm_gsam": "--dataset fashion-mnist --optimizer gsam",
}


def gpu_commands() -> tuple[list[str], list[str], list[str]]:
    """(expert commands, distill commands, evaluate commands) for the papers' MTT, FTD and DDPP rows and the
    Fashion-MNIST runs (no published row: ``distill.py``'s defaults).  Per-setting values come from the methods'
    own tables (``ddkit.methods.mtt.OFFICIAL_SETTINGS``, ``ftd.FTD_SETTINGS``): nothing is repeated here."""
    from ddkit.methods.mtt import OFFICIAL_ZCA

    common = "--data-root DATA --device cuda"
    experts = [f"ddkit experts {opts} --num-experts 100 --epochs 50 --out {out} {common}"
               for out, opts in GPU_STORES.items()]
    distill: list[str] = []
    for method in ("mtt", "ddpp", "ftd"):
        for dataset, short in (("cifar10", "c10"), ("cifar100", "c100"), ("fashion-mnist", "fm")):
            for ipc in (1, 10, 50):
                if dataset == "fashion-mnist":
                    store, zca = f"ex/fm{'_gsam' if method == 'ftd' else ''}", False
                elif method == "ftd":  # FTD's scripts use ZCA throughout
                    alpha03 = dataset == "cifar10" and ipc in (1, 10)
                    store, zca = f"ex/{short}_zca_gsam{'03' if alpha03 else ''}", True
                else:
                    zca = (dataset, ipc) in OFFICIAL_ZCA
                    store = f"ex/{short}{'_zca' if zca else ''}"
                distill.append(f"ddkit distill --method {method} --dataset {dataset} --ipc {ipc} --experts {store}"
                               f"{' --set data.zca=true' if zca else ''} --out runs/{method}_{short}_{ipc} {common}")
    evaluate = [f"ddkit evaluate runs/{c.split('--out runs/')[1].split()[0]} --runs 5 --epochs 1000 --device cuda "
                f"--data-root DATA --json runs/{c.split('--out runs/')[1].split()[0]}/eval.json" for c in distill]
    return experts, distill, evaluate


def cmd_gpu_commands(args: argparse.Namespace) -> dict[str, Any]:
    """Print the full-budget commands and check each one without data: it parses, its settings resolve and pass
    the run's checks, and its expert store (as its own command resolves it) has the run's dataset and
    preprocessing, FTD's optimiser, and enough epochs for ``max_start_epoch - 1 + expert_epochs``."""
    import shlex

    from ddkit.api import method_config
    from ddkit.cli import build_parser, resolve_run_config
    from ddkit.experts.command import resolve as resolve_experts
    from ddkit.validate import check_run_config

    experts, distill, evaluate = gpu_commands()
    parser = build_parser()
    stores: dict[str, tuple[str, Any, Any]] = {}
    for line in experts:
        a = parser.parse_args(shlex.split(line)[1:])
        config, data = resolve_experts(a)
        stores[a.out] = (a.dataset, config, data)
    checked = []
    for line in distill:
        a = parser.parse_args(shlex.split(line)[1:])
        cfg = resolve_run_config(a)
        check_run_config(cfg)
        mcfg = method_config(cfg.method, cfg.dataset, cfg.ipc, cfg.method_config)
        dataset, ecfg, edata = stores[a.experts]
        problems = []
        if dataset != cfg.dataset or edata.zca != cfg.data.zca:
            problems.append(f"store {a.experts} is {dataset} zca={edata.zca}, run {cfg.dataset} zca={cfg.data.zca}")
        if (cfg.method == "ftd") != (ecfg.optimizer == "gsam"):
            problems.append(f"{cfg.method} with {ecfg.optimizer} experts")
        if ecfg.epochs < mcfg.max_start_epoch - 1 + mcfg.expert_epochs:
            problems.append(f"store of {ecfg.epochs} epochs too short")
        if problems:
            raise SystemExit(f"{line}: {'; '.join(problems)}")
        checked.append({"command": line, "syn_steps": mcfg.syn_steps, "expert_epochs": mcfg.expert_epochs,
                        "max_start_epoch": mcfg.max_start_epoch, "lr_img": mcfg.lr_img, "lr_lr": mcfg.lr_lr,
                        "lr_teacher": mcfg.lr_teacher, "batch_syn": mcfg.batch_syn, "zca": cfg.data.zca,
                        **({"ema_decay": mcfg.ema_decay} if cfg.method == "ftd" else {}),
                        **({"beta": mcfg.beta} if cfg.method == "ddpp" else {})})
    for line in evaluate:
        parser.parse_args(shlex.split(line)[1:])
    print("\n".join(["# expert stores", *experts, "# distillation (per-setting defaults from the methods' tables)",
                     *distill, "# evaluation (5 ConvNet-3, 1000 epochs, the learned lr)", *evaluate]),
          file=sys.stderr)
    return {"what": "gpu-commands", "experts": len(experts), "distill": checked, "evaluate": len(evaluate)}


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
    p.add_argument("--speed", default="auto", choices=("auto", "plain"))
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                   help="auto: the compile rule for this run; on: as a full-size store (median skips epoch 1)")
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
            p.add_argument("--ref-mtt", help="the patched mtt-distillation scratch copy of refbench.sh (--score)")
            p.add_argument("--sets", help="folder for the final and initial sets (default: a new temporary one)")
            p.add_argument("--score", action="store_true", help="also score both sets here (long: 4 trainings)")
            p.add_argument("--max-start-epoch", type=int, default=1)
            p.add_argument("--epochs", type=int, default=300)
            p.add_argument("--models", type=int, default=2)
            p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("import-official")
    common(p)
    p.add_argument("buffer")
    p.add_argument("--out", required=True)
    p.add_argument("--train-n", type=int, default=6000)
    p = sub.add_parser("export-official")
    common(p)
    p.add_argument("store")
    p.add_argument("--out", required=True, help="buffer folder for distill.py --buffer_path")
    p = sub.add_parser("official-accuracy")
    common(p)
    p.add_argument("--ref-mtt", required=True)
    p.add_argument("--buffers", required=True, help="refbench's buffer folder (SCRATCH/buffers)")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--syn-steps", type=int, default=10)
    p.add_argument("--max-start-epoch", type=int, default=1)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--out", help="where the final set goes (default: the run's temporary folder)")
    p = sub.add_parser("official-speed")
    common(p)
    p.add_argument("--ref-mtt", required=True, help="refbench's patched scratch copy (SCRATCH/mtt)")
    p.add_argument("--buffers", required=True, help="a buffer folder (export-official)")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--syn-steps-list", type=int, nargs="+", default=[10, 20, 40])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p = sub.add_parser("score")
    common(p)
    p.add_argument("set", help="a synset.safetensors (ddkit) or official-accuracy's final set")
    p.add_argument("--ref-mtt", required=True)
    p.add_argument("--lr", type=float, help="evaluation lr (default: the set's learned lr)")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--models", type=int, default=2)
    sub.add_parser("gpu-commands", help="print and check (without data) the full-budget GPU commands")
    args = parser.parse_args(argv)
    handler = {"experts": cmd_experts, "distill": cmd_distill, "speed": cmd_speed, "accuracy": cmd_accuracy,
               "import-official": cmd_import_official, "export-official": cmd_export_official,
               "official-speed": cmd_official_speed, "official-accuracy": cmd_official_accuracy,
               "score": cmd_score, "gpu-commands": cmd_gpu_commands}[args.cmd]
    print(json.dumps(handler(args)), flush=True)


if __name__ == "__main__":
    main()
