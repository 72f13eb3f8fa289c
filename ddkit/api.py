"""High-level Python API, shared by the CLI.

    real = ddkit.load_dataset("digits")
    syn = ddkit.distill(real, method="dm", ipc=10, iterations=200, seed=0)
    report = ddkit.evaluate(syn, real, ddkit.EvalProtocol(runs=3, epochs=300))

Any tensors or torch ``Dataset`` can be used through :func:`real_from_tensors` / :func:`real_from_datasets`.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from . import distributed
from .config import RunConfig, apply_setting, to_yaml_dict, yaml_dump
from .data import load_dataset
from .data.preprocess import Preprocess
from .data.realdata import RealData
from .engine import Callback, GridSaver, MetricsLogger, PeriodicEval, ProgressBar, distill as run_engine, make_generator
from .engine.loggers import Fanout, check_loggers, make_loggers
from .engine.runfolder import RunFolder, check_resume, run_record
from .errors import ConfigError, DataError
from .evaluation import EvalProtocol
from .evaluation.compat import check_set_matches
from .validate import check_method_config, check_run_config, check_run_value
from .io import atomic_write_text
from .methods import METHODS, create_distiller
from .synthetic import SyntheticSet


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but torch.cuda.is_available() is False on this machine")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ConfigError(f"unknown device {name!r}; expected cpu, cuda, cuda:N or auto")
    return torch.device(name)


def method_config(method: str, dataset: str, ipc: int, overrides: dict[str, Any] | None = None):
    """The method's per-dataset/IPC defaults with ``overrides`` applied (unknown keys and meaningless values
    rejected with the same rules as ``--set`` and YAML: :mod:`ddkit.validate`)."""
    cls = METHODS.get(method)
    cfg = cls.default_config(dataset, ipc)
    fields = {f.name for f in dataclasses.fields(cfg)}
    for k, v in (overrides or {}).items():
        if k not in fields:
            run = RunConfig()
            apply_setting(run, f"method.{k}", v, type(cfg))  # raises with close matches
        setattr(cfg, k, v)
    check_method_config(cfg)
    return cfg


def distill(
    real: RealData,
    method: str = "dm",
    ipc: int = 10,
    *,
    iterations: int | None = None,
    seed: int = 0,
    device: str = "auto",
    out_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    callbacks: Sequence[Any] = (),
    checkpoint_every: int = 100,
    speed: str = "auto",
    **options: Any,
) -> SyntheticSet:
    """Distill ``real`` into ``ipc`` images per class with ``method``; ``options`` are method config fields.

    ``speed``: the speed layer's setting (:mod:`ddkit.accel`): "auto" (measured levers of the device: on CPU the
    patch-statistics first stage, compilation of long runs, cache-sized chunks; plain modules elsewhere) or
    "plain" (the official computation everywhere; the same result up to float rounding).

    With ``out_dir`` the run keeps checkpoints there under the run-folder rules (:mod:`ddkit.engine.runfolder`):
    the folder is locked while the run lasts, a folder holding another run needs ``resume=True`` (same settings,
    or more iterations) or ``overwrite=True``.
    """
    for key, value in (("ipc", ipc), ("iterations", iterations), ("seed", seed),
                       ("engine.checkpoint_every", checkpoint_every)):
        check_run_value(key, value)
    real.check_ipc(ipc)
    dev = resolve_device(device)
    cfg = method_config(method, real.name, ipc, options)
    if out_dir is None:
        return _distill(real, method, cfg, ipc, iterations, seed, dev, None, False, callbacks, checkpoint_every,
                        speed=speed)
    folder = RunFolder(out_dir)
    folder.check_start(resume=resume, overwrite=overwrite)
    with main_lock(folder):
        if distributed.is_main():
            folder.check_start(resume=resume, overwrite=overwrite)  # again, now that no other process can interfere
        return _distill(real, method, cfg, ipc, iterations, seed, dev, folder, resume, callbacks, checkpoint_every,
                        speed=speed)


class ClearRunFolder(Callback):
    """A new (not resumed) run removes the files of an earlier run in its folder when it starts, i.e. after the
    method's ``setup`` accepted the configuration: a rejected run leaves the folder as it was."""

    def __init__(self, folder: RunFolder) -> None:
        self.folder = folder

    def on_start(self, state: Any) -> None:
        self.folder.clear()


def _distill(real: RealData, method: str, cfg: Any, ipc: int, iterations: int | None, seed: int,
             dev: torch.device, folder: RunFolder | None, resume: bool, callbacks: Sequence[Any],
             checkpoint_every: int, data_options: dict[str, Any] | None = None,
             info: dict[str, Any] | None = None, speed: str = "auto") -> SyntheticSet:
    """The run itself; with a ``folder`` the caller holds its lock and has checked that it may be used."""
    iters = cfg.iterations if iterations is None else iterations
    distiller = create_distiller(method, cfg, device=dev, speed=speed)
    record = None
    if folder is not None:
        record = run_record(method=method, method_config=cfg, ipc=ipc, seed=seed, iterations=iters, real=real,
                            data_options=data_options, info={"device": str(dev), "speed": speed, **(info or {})})
        if resume:
            record = check_resume(folder.path, record)  # refuses other settings before any setup work
        else:
            callbacks = [ClearRunFolder(folder), *callbacks]
    syn = SyntheticSet.from_real(real, ipc, make_generator(seed, "init"), init=cfg.init,
                                 soft_labels=cfg.soft_labels, learn_labels=cfg.learn_labels)
    start = time.perf_counter()
    run_engine(distiller, real, syn, iterations=iters, seed=seed, callbacks=callbacks,
               checkpoint_dir=folder.path if folder is not None else None, checkpoint_every=checkpoint_every,
               resume=resume, run_record=record)
    syn.meta.update({"method": method, "seed": seed, "iterations": iters if not distiller.selects_only else 0,
                     "ipc": ipc, "config": dataclasses.asdict(cfg), "seconds": time.perf_counter() - start})
    if record is not None and record.get("extended_from"):
        syn.meta["extended_from"] = record["extended_from"]
    return syn.cpu()


class ConfigWriter(Callback):
    """Writes the resolved ``config.yaml`` when the run starts, i.e. after the method's ``setup`` has accepted
    the configuration (options such as ``compile`` or ``grad_mode`` are checked there), so that a run the method
    rejects leaves nothing in the output folder."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.text = text

    def on_start(self, state: Any) -> None:
        atomic_write_text(self.path, self.text)


def run_from_config(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False,
                    overwrite: bool = False) -> SyntheticSet:
    """What ``ddkit distill`` does: resolve, load, distill with checkpoints/logs/grids, save the set.

    The run folder's rules (:mod:`ddkit.engine.runfolder`) are checked before the data are loaded, and again
    under the folder's lock, which the run holds until its set is saved.
    """
    out = Path(out_dir)
    folder = RunFolder(out)
    check_run_config(cfg)
    check_loggers(cfg.engine.loggers)  # a missing extra fails here, naming it, before any work
    folder.check_start(resume=resume, overwrite=overwrite)
    real = load_dataset(cfg.dataset, cfg.data.root, zca=cfg.data.zca, zca_eps=cfg.data.zca_eps,
                        image_size=cfg.data.image_size)
    real.check_ipc(cfg.ipc)
    mcfg = method_config(cfg.method, real.name, cfg.ipc, cfg.method_config)
    if cfg.iterations is None:
        cfg.iterations = mcfg.iterations
    dev = resolve_device(cfg.device)
    logger = MetricsLogger(out / "metrics.jsonl")
    callbacks: list[Any] = [ConfigWriter(out / "config.yaml", yaml_dump(to_yaml_dict(cfg, mcfg))), logger,
                            GridSaver(out, cfg.engine.grid_every)]
    loggers = make_loggers(cfg.engine.loggers, out, to_yaml_dict(cfg, mcfg))
    callbacks += loggers
    if cfg.engine.progress:
        callbacks.insert(0, ProgressBar())
    if cfg.engine.eval_every > 0:
        protocol = EvalProtocol(runs=cfg.engine.eval_runs, epochs=cfg.engine.eval_epochs)
        callbacks.append(PeriodicEval(cfg.engine.eval_every, protocol, Fanout(logger, *loggers), device=str(dev)))
    data_options = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k != "root"}
    info = {"data.root": cfg.data.root}
    with main_lock(folder):
        if distributed.is_main():
            folder.check_start(resume=resume, overwrite=overwrite)
        syn = _distill(real, cfg.method, mcfg, cfg.ipc, cfg.iterations, cfg.seed, dev, folder, resume, callbacks,
                       cfg.engine.checkpoint_every, data_options, info, speed=cfg.speed)
        syn.meta["data"] = dataclasses.asdict(cfg.data)
        for key in ("resized", "resized_to"):  # an image folder's resize is part of what the set was made from
            if key in real.info:
                syn.meta["data"][key] = real.info[key]
        if distributed.is_main():  # under torchrun rank 0 alone writes the set (every rank holds the same one)
            syn.save(out)
    return syn


def main_lock(folder: RunFolder):
    """The run folder's lock, held by rank 0 alone under torchrun (the other ranks write nothing there)."""
    import contextlib

    return folder.lock() if distributed.is_main() else contextlib.nullcontext()


def load_real_for(syn: SyntheticSet, root: str | None = None) -> RealData:
    """The real dataset a synthetic set was distilled from, encoded with the set's own preprocessing.

    This is what makes ZCA sets evaluate correctly: the test images get exactly the stored whitening.
    """
    data = syn.meta.get("data", {}) or {}
    root = root or data.get("root")
    size = data.get("image_size")
    if size is None and syn.dataset == "imagefolder" and syn.images.shape[-1] == syn.images.shape[-2]:
        size = int(syn.images.shape[-1])  # a mixed-size folder was resized to this square size when distilled
    real = load_dataset(syn.dataset, root, image_size=size)
    check_set_matches(syn, real, where=str(root) if root else None, encoding=False)  # classes, names, shape
    return reencode(real, syn.preprocess)


def reencode(real: RealData, preprocess: Preprocess) -> RealData:
    """Re-express ``real`` in another preprocessing (e.g. the ZCA stored with a synthetic set)."""
    if preprocess.to_json() == real.preprocess.to_json() and not preprocess.uses_zca:
        return real
    train = preprocess.encode(real.preprocess.decode(real.train_images))
    test = preprocess.encode(real.preprocess.decode(real.test_images))
    return dataclasses.replace(real, train_images=train, test_images=test, preprocess=preprocess)


def real_from_tensors(train_images: Tensor, train_labels: Tensor, test_images: Tensor, test_labels: Tensor, *,
                      name: str = "custom", class_names: list[str] | None = None, zca: bool = False,
                      zca_eps: float = 0.1) -> RealData:
    """Wrap raw image tensors in [0,1] (``[N,C,H,W]``, or ``[N,H,W]`` for grey) as :class:`RealData`."""
    def prep(x: Tensor) -> Tensor:
        x = x.float()
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if x.dim() != 4:
            raise DataError(f"{name}: expected images [N,C,H,W] or [N,H,W], got shape {tuple(x.shape)}")
        return x / 255.0 if x.max() > 1.0 else x

    xtr, xte = prep(train_images), prep(test_images)
    ytr, yte = torch.as_tensor(train_labels).long(), torch.as_tensor(test_labels).long()
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise DataError(f"{name}: {len(xtr)} train images vs {len(ytr)} labels, {len(xte)} test images vs {len(yte)} labels")
    k = int(max(ytr.max(), yte.max())) + 1
    if zca:
        pre = Preprocess.fit_zca(xtr, eps=zca_eps)
    else:
        mean = xtr.mean(dim=(0, 2, 3)).tolist()
        std = xtr.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist()
        pre = Preprocess(mean=tuple(mean), std=tuple(std))
    return RealData(name, pre.encode(xtr), ytr, pre.encode(xte), yte, k, class_names or [str(c) for c in range(k)], pre)


def real_from_datasets(train: torch.utils.data.Dataset, test: torch.utils.data.Dataset, **kw: Any) -> RealData:
    """Wrap any map-style torch ``Dataset`` yielding ``(image_tensor_in_[0,1], label)`` pairs."""
    def stack(ds) -> tuple[Tensor, Tensor]:
        xs, ys = zip(*[ds[i] for i in range(len(ds))])
        return torch.stack([torch.as_tensor(x) for x in xs]), torch.as_tensor(ys)

    (xtr, ytr), (xte, yte) = stack(train), stack(test)
    return real_from_tensors(xtr, ytr, xte, yte, **kw)


def print_report(report, file=sys.stdout) -> None:
    print(report.to_markdown(), file=file)


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
