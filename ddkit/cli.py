"""``ddkit`` command line: list | distill | evaluate | show | export.

Every user error (:class:`~ddkit.errors.DDKitError`) is printed as one line and exits with status 2; no
traceback, nothing half-written (all files are written atomically).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .errors import ConfigError, DDKitError


def _add_distill(sub) -> None:
    p = sub.add_parser("distill", help="distill a dataset into a synthetic set")
    p.add_argument("--method", help="method name (ddkit list methods)")
    p.add_argument("--dataset", help="dataset name (ddkit list datasets)")
    p.add_argument("--ipc", type=int, help="images per class")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--data-root", help="folder with the dataset files (torchvision layout)")
    p.add_argument("--iterations", type=int, help="number of outer iterations (default: the method's budget)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=["cpu", "cuda", "auto"])
    p.add_argument("--config", help="a YAML config (e.g. a previous run's config.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. method.lr_img=0.5, data.zca=true, engine.eval_every=100")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="train fresh models on a synthetic set and test them on real data")
    p.add_argument("path", nargs="?", help="a run folder or synset.safetensors")
    p.add_argument("--models", default="convnet", help="comma-separated model names")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--epochs", type=int, default=1000)
    p.add_argument("--lr", type=float, help="fixed lr (default 0.01, or the set's learned lr)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-dsa", action="store_true", help="train without DSA augmentation")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile the training forward (auto: long CPU evaluations only)")
    p.add_argument("--data-root")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    p.add_argument("--json", help="write the results as JSON to this file")
    p.add_argument("--full", action="store_true", help="train on the whole real training set (upper bound)")
    p.add_argument("--dataset", help="with --full: the dataset")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddkit", description="Dataset distillation toolkit")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list methods, datasets or models")
    p.add_argument("what", choices=["methods", "datasets", "models"])
    _add_distill(sub)
    _add_evaluate(sub)
    p = sub.add_parser("show", help="write an image grid of a synthetic set")
    p.add_argument("path")
    p.add_argument("--out", required=True)
    p = sub.add_parser("export", help="write one PNG per image plus labels.csv")
    p.add_argument("path")
    p.add_argument("--out", required=True)
    return parser


def cmd_list(args) -> int:
    if args.what == "methods":
        from .methods import METHODS

        for name in METHODS.names():
            doc = (METHODS.get(name).__doc__ or "").strip().splitlines()[0]
            print(f"{name:10s} {doc}")
    elif args.what == "datasets":
        from .registry import DATASETS
        from . import data  # noqa: F401  (registers datasets)

        for name in DATASETS.names():
            print(f"{name:14s} {DATASETS.get(name).description}")
    else:
        from .models import describe_model, model_names

        for name in model_names():
            print(f"{name:16s} {describe_model(name)}")
    return 0


def resolve_run_config(args):
    """Defaults < YAML file (--config) < command-line flags < --set overrides."""
    from .config import RunConfig, apply_setting, flatten_yaml, load_yaml, parse_set
    from .methods import METHODS

    cfg = RunConfig()
    yaml_pairs: list = []
    if args.config:
        data = load_yaml(args.config)
        options = data.pop("method_options", {}) or {}
        yaml_pairs = flatten_yaml(data) + [(f"method.{k}", v) for k, v in options.items()]
    cli_sets = parse_set(args.set)
    yaml_method = dict(yaml_pairs).get("method")
    cfg.method = str(args.method or dict(cli_sets).get("method") or yaml_method or cfg.method)
    method_cls = METHODS.get(cfg.method).Config
    for key, val in yaml_pairs:
        if key == "method" or (key.startswith("method.") and yaml_method and yaml_method != cfg.method):
            continue  # options recorded for another method do not apply
        apply_setting(cfg, key, val, method_cls)
    for name in ("dataset", "ipc", "seed", "iterations", "device"):
        if getattr(args, name, None) is not None:
            setattr(cfg, name, getattr(args, name))
    if args.data_root:
        cfg.data.root = args.data_root
    for key, val in cli_sets:
        if key != "method":
            apply_setting(cfg, key, val, method_cls)
    if args.no_progress:
        cfg.engine.progress = False
    return cfg


def cmd_distill(args) -> int:
    from .api import run_from_config

    cfg = resolve_run_config(args)
    out = Path(args.out)
    if (out / "checkpoint.safetensors").exists() and not args.resume and (out / "synset.safetensors").exists() is False:
        raise ConfigError(f"{out} holds an unfinished run; pass --resume to continue it or choose another --out")
    syn = run_from_config(cfg, out, resume=args.resume)
    print(f"wrote {out / 'synset.safetensors'} ({len(syn)} images, {cfg.method}, {cfg.dataset}, ipc {cfg.ipc}, "
          f"{cfg.iterations} iterations) and {out / 'grid.png'}")
    return 0


def cmd_evaluate(args) -> int:
    import json as _json

    from .api import load_real_for, resolve_device, write_json
    from .data import load_dataset
    from .evaluation import EvalProtocol, evaluate, evaluate_tensors
    from .models import MODELS
    from .synthetic import SyntheticSet

    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    for m in models:
        MODELS.get(m)  # unknown names fail before any work
    protocol = EvalProtocol(models=models, runs=args.runs, epochs=args.epochs, lr=args.lr or 0.01,
                            use_learned_lr=args.lr is None, batch_size=args.batch_size, dsa=not args.no_dsa,
                            compile=args.compile)
    device = resolve_device(args.device)

    def on_row(row):
        print(f"  {row.model} run {row.run}: {row.accuracy:.2f} % ({row.seconds:.1f} s)", file=sys.stderr)

    if args.full:
        if not args.dataset:
            raise ConfigError("--full needs --dataset NAME")
        real = load_dataset(args.dataset, args.data_root)
        report = evaluate_tensors(real.train_images, real.train_labels, real, protocol, seed=args.seed,
                                  method="whole-dataset", ipc=0, device=device, on_row=on_row)
    else:
        if not args.path:
            raise ConfigError("evaluate needs a PATH (a run folder or synset.safetensors), or --full --dataset NAME")
        syn = SyntheticSet.load(args.path)
        real = load_real_for(syn, args.data_root)
        report = evaluate(syn, real, protocol, seed=args.seed, device=device, on_row=on_row)
    print(report.to_markdown())
    if args.json:
        result = report.to_json()
        write_json(args.json, result)
    _ = _json
    return 0


def cmd_show(args) -> int:
    from .synthetic import SyntheticSet, save_grid

    save_grid(SyntheticSet.load(args.path), args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_export(args) -> int:
    from .synthetic import SyntheticSet

    out = SyntheticSet.load(args.path).export(args.out)
    print(f"wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"list": cmd_list, "distill": cmd_distill, "evaluate": cmd_evaluate, "show": cmd_show,
                "export": cmd_export}
    if args.command in ("distill", "evaluate"):
        from .engine.allocator import keep_freed_memory

        keep_freed_memory()  # long training loops: reuse freed activations instead of re-faulting them (allocator.py)
    try:
        return handlers[args.command](args)
    except DDKitError as exc:
        print(f"ddkit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ddkit {args.command}: interrupted (checkpoints, if any, are intact; use --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
