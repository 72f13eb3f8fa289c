"""The ``gpu-levers`` part of the suite: time every speed-layer lever (``ddkit/accel``) against plain modules on
CUDA, so that the first GPU run decides what ``speed: auto`` does there.

Until such a run, ``speed: auto`` on CUDA means plain modules (cuDNN convolution and GroupNorm, whole batches,
no compile): every lever in ``ddkit/accel`` was measured on the 2-core CPUs only (benchmarks/RESULTS.md).  This
module times each lever on the workloads the library runs, in one process, medians of ``repeats`` after
``warmup`` calls (which include compilation), with ``torch.cuda.synchronize`` around every call:

==================  =====================================================================================
lever               what it changes (all exact; the same parameters)
==================  =====================================================================================
compile             ``torch.compile`` of the network (``accel.compiled.CompiledOrEager``)
chunks              the batch in CPU-sized chunks (``ChunkedForward``, 16 / 32 Fashion-MNIST images)
patchnorm           the first stage's instance norm from patch statistics (``patchnorm.install``,
                    no fused pooling), eager and compiled
patchnorm-fused     the same with the pooled stage fused (compiled, static shapes: ``conv_instance_norm_pool``)
channels-last       compiled no-grad forward on channels-last tensors (DM's and CAFE's embedder)
==================  =====================================================================================

Workloads: an SGD training step on 100 and 256 images (the evaluation protocol's batches, DC's inner loop) and a
no-grad forward of 2,560 images (DM's real branch: 10 classes x 256), on Fashion-MNIST (1x28x28) and CIFAR
(3x32x32) shapes with ConvNet-3.  A lever is reported as a *candidate* for ``speed: auto`` on the device when its
median is at most ``CANDIDATE_RATIO`` of the plain one; switching it on is a change to ``accel/layer.py`` with
these figures beside it, not something this module does.

On a machine without CUDA the suite says so and writes a report saying it was skipped (exit status 0).
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

#: a lever this much faster than plain modules (median time ratio) is a candidate for ``speed: auto``
CANDIDATE_RATIO = 0.95

SHAPES = {"fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device, repeats: int, warmup: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after ``warmup`` calls (compiles happen in the warm-up)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def _model(shape: tuple[int, int, int], device, *, patch: bool = False, fused: bool = False, model: str = "convnet",
           channels_last: bool = False):
    import torch

    from ..accel import patchnorm
    from ..models import create_model

    torch.manual_seed(0)
    net = create_model(model, channels=shape[0], num_classes=10, image_size=shape[1:])
    net = patchnorm.install(net, fuse_pooling=fused) if patch else patchnorm.uninstall(net)
    net = net.to(device)
    return net.to(memory_format=torch.channels_last) if channels_last else net


def _train_step(net, x, y, compiled: bool, chunk: int | None) -> Callable[[], None]:
    import torch
    import torch.nn.functional as F

    from ..accel.compiled import forward_of

    forward = forward_of(net, compiled, chunk)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(forward(x), y).backward()
        opt.step()

    return step


def _forward(net, x, compiled: bool, chunk: int | None, channels_last: bool = False) -> Callable[[], None]:
    import torch

    from ..accel.compiled import ChunkedForward, CompiledOrEager

    net.requires_grad_(False)
    fn = CompiledOrEager(net.features) if compiled else net.features
    if chunk:
        fn = ChunkedForward(fn, chunk)
    xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def forward() -> None:
        with torch.no_grad():
            fn(xin)

    return forward


def variants(kind: str) -> list[tuple[str, dict[str, Any]]]:
    """``(lever, settings)`` pairs timed for a workload kind ("train" or "forward"); "plain" first."""
    common = [("plain", {}), ("compile", {"compiled": True}), ("chunks", {"chunk": 16}),
              ("patchnorm", {"patch": True}), ("patchnorm+compile", {"patch": True, "compiled": True}),
              ("patchnorm-fused+compile", {"patch": True, "fused": True, "compiled": True})]
    if kind == "train":
        return common + [("compile+chunks", {"compiled": True, "chunk": 32})]
    return common + [("channels-last+compile", {"compiled": True, "channels_last": True}),
                     ("patchnorm-fused+compile+chunks", {"patch": True, "fused": True, "compiled": True, "chunk": 64})]


def time_levers(device: str = "cuda", *, shapes: dict[str, tuple[int, int, int]] | None = None,
                batches: tuple[int, ...] = (100, 256), forward_batch: int = 2560, repeats: int = 10, warmup: int = 3,
                model: str = "convnet", log: Callable[[str], None] | None = None,
                only: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """One row per (shape, workload, lever): median seconds, the plain median and their ratio (``only``: these
    levers and "plain")."""
    import torch

    dev = torch.device(device)
    rows: list[dict[str, Any]] = []
    for shape_name, shape in (shapes or SHAPES).items():
        g = torch.Generator().manual_seed(0)
        work = [(f"train step, {n} images", "train", n) for n in batches]
        work.append((f"no-grad forward, {forward_batch} images", "forward", forward_batch))
        for label, kind, n in work:
            x = torch.randn(n, *shape, generator=g).to(dev)
            y = torch.randint(0, 10, (n,), generator=g).to(dev)
            plain = None
            for lever, s in variants(kind):
                if only is not None and lever != "plain" and lever not in only:
                    continue
                net = _model(shape, dev, patch=s.get("patch", False), fused=s.get("fused", False), model=model,
                             channels_last=s.get("channels_last", False))
                fn = (_train_step(net, x, y, s.get("compiled", False), s.get("chunk"))
                      if kind == "train" else
                      _forward(net, x, s.get("compiled", False), s.get("chunk"), s.get("channels_last", False)))
                try:
                    seconds = timed(fn, dev, repeats, warmup)
                    error = ""
                except Exception as exc:  # a lever that fails on this device is a result, not a crash
                    seconds, error = float("nan"), f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                if lever == "plain":
                    plain = seconds
                ratio = seconds / plain if plain and seconds == seconds else float("nan")
                rows.append({"device": str(dev), "shape": shape_name, "workload": label, "lever": lever,
                             "seconds": round(seconds, 5), "plain_seconds": round(plain, 5) if plain else None,
                             "ratio": round(ratio, 3), "candidate": bool(ratio == ratio and ratio <= CANDIDATE_RATIO
                                                                          and lever != "plain"),
                             "error": error})
                if log:
                    log(f"  {shape_name:13s} {label:34s} {lever:32s} {seconds * 1e3:9.2f} ms  x{ratio:.3f} {error}")
    return rows


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def run_levers(suite, out: str | Path, *, log: Callable[[str], None] | None = None) -> int:
    """The lever suite: time everything on CUDA, or say that it needs CUDA and skip; writes the report either way."""
    from ..io import atomic_write_text

    log = log or print
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = suite.levers or {}
    if spec.get("requires", "cuda") == "cuda" and not cuda_available():
        log(f"{suite.name}: needs a CUDA device (torch.cuda.is_available() is False here); skipped")
        atomic_write_text(out / "levers.json", json.dumps({"suite": suite.name, "skipped": "no CUDA device",
                                                           "rows": []}, indent=1) + "\n")
        write_levers_report(suite, out)
        return 0
    import torch

    shapes = {k: tuple(v) for k, v in (spec.get("dataset_shapes") or SHAPES).items()}
    rows = time_levers("cuda", shapes=shapes, batches=tuple(spec.get("batches", (100, 256))),
                       forward_batch=int(spec.get("forward_batch", 2560)), repeats=int(spec.get("repeats", 10)),
                       warmup=int(spec.get("warmup", 3)), model=str(spec.get("model", "convnet")), log=log)
    atomic_write_text(out / "levers.json", json.dumps({"suite": suite.name, "device": torch.cuda.get_device_name(0),
                                                       "torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    write_levers_report(suite, out)
    return 0


def write_levers_report(suite, out: Path) -> Path:
    from ..io import atomic_write_text

    path = out / "levers.json"
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"rows": []}
    lines = [f"# Speed-layer levers: `{suite.name}`", "", suite.description.strip(), ""]
    if data.get("skipped"):
        lines += [f"**Skipped: {data['skipped']}.** Run `ddkit bench {suite.name} --out DIR` on a machine with a "
                  f"CUDA GPU; until then `speed: auto` on CUDA means plain modules.", ""]
    elif not data["rows"]:
        lines += ["Not run yet.", ""]
    else:
        lines += [f"Device: {data.get('device')}, torch {data.get('torch')}. Medians of the suite's repeats after its "
                  f"warm-up calls (compiles included in the warm-up). ratio = lever / plain; a candidate for "
                  f"`speed: auto` on this device is at most {CANDIDATE_RATIO}.", "",
                  "| shape | workload | lever | ms | plain ms | ratio | candidate |", "|---|---|---|---|---|---|---|"]
        for r in data["rows"]:
            ms = "failed: " + r["error"] if r["error"] else f"{r['seconds'] * 1e3:.2f}"
            plain = f"{r['plain_seconds'] * 1e3:.2f}" if r["plain_seconds"] else "–"
            lines.append(f"| {r['shape']} | {r['workload']} | {r['lever']} | {ms} | {plain} | {r['ratio']} | "
                         f"{'yes' if r['candidate'] else ''} |")
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    return out / "report.md"
