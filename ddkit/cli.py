"""``ddkit`` command line: list | distill | evaluate | experts | bench | show | export.

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
                   help="override a config key, e.g. method.lr_img=0.5, data.zca=true, engine.eval_every=100, "
                        "engine.loggers=tensorboard,wandb (extras ddkit[tensorboard], ddkit[wandb])")
    p.add_argument("--resume", action="store_true",
                   help="continue the checkpoint in --out (same settings; a larger --iterations extends the run)")
    p.add_argument("--overwrite", action="store_true", help="discard the run already in --out and start afresh")
    p.add_argument("--experts", metavar="DIR", help="expert store for mtt/ftd/ddpp (made by `ddkit experts`)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_experts(sub) -> None:
    p = sub.add_parser("experts", help="train expert trajectories (for --method mtt|ftd|ddpp --experts DIR)")
    p.add_argument("--dataset", required=True, help="dataset name (ddkit list datasets)")
    p.add_argument("--num-experts", type=int, required=True, help="experts the store should hold")
    p.add_argument("--epochs", type=int, help="epochs per expert (default 50, as buffer.py)")
    p.add_argument("--out", required=True, help="the store folder (created, resumed or extended)")
    p.add_argument("--data-root", help="folder with the dataset files (torchvision layout)")
    p.add_argument("--model", help="model name (default convnet)")
    p.add_argument("--optimizer", choices=["sgd", "gsam"], help="sgd (MTT) or gsam (FTD's flat experts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda", "auto"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="data.zca=true, data.zca_eps=..., expert.lr=..., expert.rho=..., expert.alpha=...")
    p.add_argument("--resume", action="store_true", help="continue an interrupted store (expert by expert)")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="train fresh models on a synthetic set and test them on real data")
    p.add_argument("path", nargs="?", help="a run folder or synset.safetensors")
    p.add_argument("--protocol", default="field",
                   help="evaluation recipe: field (default: SGD, 1000 epochs) or frepo (FRePo's eval.py: Adam, "
                        "squared error on centred labels, warm-up then cosine, steps by the number of images); "
                        "the flags below override the protocol's values")
    p.add_argument("--models", help="comma-separated model names (default convnet; frepo: convnet_nn)")
    p.add_argument("--runs", type=int, help="models per architecture (default 5)")
    p.add_argument("--epochs", type=int, help="training epochs (default 1000; replaces frepo's step budget)")
    p.add_argument("--steps", type=int, help="optimiser steps instead of epochs (frepo: by the number of images)")
    p.add_argument("--lr", type=float, help="fixed lr (default 0.01, or the set's learned lr; frepo 3e-4)")
    p.add_argument("--batch-size", type=int, help="batch size (default 256; frepo 500)")
    p.add_argument("--no-dsa", action="store_true", help="train without DSA augmentation")
    p.add_argument("--speed", default="auto", choices=["auto", "plain"],
                   help="the speed layer: auto (the device's measured levers) or plain (the official modules)")
    p.add_argument("--data-root")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    p.add_argument("--json", help="write the results as JSON to this file")
    p.add_argument("--log", "--eval-log", dest="log",  # --eval-log: torchrun takes --log for its --log-dir
                   help="append each finished run to this JSON-lines file (default: evaluations.jsonl in "
                        "the set's folder; --full logs only with --log)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted evaluation from its log")
    p.add_argument("--full", action="store_true", help="train on the whole real training set (upper bound)")
    p.add_argument("--dataset", help="with --full: the dataset")


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark suite and write its report (ddkit/bench)")
    p.add_argument("suite", help="a shipped suite (cpu-smoke, cpu-fmnist, gpu-paper, gpu-levers) or a YAML file")
    p.add_argument("--out", required=True, help="the suite's folder: cell records, run folders, report.md")
    p.add_argument("--data-root", help="folder with the dataset files, for cells that do not set data_root")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="device for cells that do not set one")
    p.add_argument("--only", help="comma-separated cell ids to run (the report still lists every cell)")
    p.add_argument("--retry-failed", action="store_true", help="run cells recorded as failed again")
    p.add_argument("--max-minutes", type=float,
                   help="stop cleanly after this long: no phase starts later, a running one is interrupted and "
                        "keeps its checkpoint (rerun the command to continue)")
    p.add_argument("--check", action="store_true", help="validate the suite (keys, names, values; not the data folders) and list its cells; "
                        "run nothing")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the records; run nothing")
    p.add_argument("--results-md", metavar="FILE",
                   help="also write the suite's table into FILE (e.g. benchmarks/RESULTS.md) between marker comments "
                        "named after the suite, replacing the previous one (appended when the markers are absent)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddkit", description="Dataset distillation toolkit")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list methods, datasets or models")
    p.add_argument("what", choices=["methods", "datasets", "models"])
    _add_distill(sub)
    _add_evaluate(sub)
    _add_experts(sub)
    _add_bench(sub)
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
        if not isinstance(options, dict):
            raise ConfigError(f"{args.config}: method_options must be a mapping of option: value, "
                              f"got {type(options).__name__}")
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
            apply_setting(cfg, name, getattr(args, name), method_cls)  # the same value rules as --set and YAML
    if args.data_root:
        cfg.data.root = args.data_root
    for key, val in cli_sets:
        if key != "method":
            apply_setting(cfg, key, val, method_cls)
    if getattr(args, "experts", None):
        import dataclasses

        if "experts" not in {f.name for f in dataclasses.fields(method_cls)}:
            raise ConfigError(f"--experts is for trajectory-matching methods (mtt, ftd, ddpp), not {cfg.method!r}")
        cfg.method_config["experts"] = args.experts
    if args.no_progress:
        cfg.engine.progress = False
    return cfg


def cmd_distill(args) -> int:
    from .api import run_from_config

    cfg = resolve_run_config(args)
    out = Path(args.out)
    syn = run_from_config(cfg, out, resume=args.resume, overwrite=args.overwrite)  # run-folder rules: runfolder.py
    from . import distributed

    if not distributed.is_main():
        return 0  # under torchrun rank 0 wrote the set
    print(f"wrote {out / 'synset.safetensors'} ({len(syn)} images, {cfg.method}, {cfg.dataset}, ipc {cfg.ipc}, "
          f"{cfg.iterations} iterations) and {out / 'grid.png'}")
    return 0


def cmd_evaluate(args) -> int:
    import json as _json

    from . import distributed
    from .api import load_real_for, resolve_device, write_json
    from .data import load_dataset
    from .evaluation import EvalProtocol, evaluate, evaluate_tensors
    from .evaluation.resultlog import ResultLog, data_identity, default_log_path, evaluation_key, run_logged
    from .io import check_writable, tensor_digest
    from .validate import check_protocol as check_protocol_values
    from .models import MODELS
    from .synthetic import SyntheticSet

    models = tuple(m.strip() for m in args.models.split(",") if m.strip()) if args.models else None
    for m in models or ():
        MODELS.get(m)  # unknown names fail before any work
    # a named protocol (evaluation/protocol.py PROTOCOLS); flags left unset keep its values
    protocol = EvalProtocol.named(args.protocol, models=models, runs=args.runs, epochs=args.epochs, steps=args.steps,
                                  lr=args.lr, batch_size=args.batch_size, speed=args.speed)
    if args.epochs is not None and args.steps is None:
        protocol.steps = None  # explicit --epochs replace a step budget (frepo's)
    if args.lr is not None:
        protocol.use_learned_lr = False
    if args.no_dsa:
        protocol.dsa = False
    device = resolve_device(args.device)
    check_protocol_values(protocol)  # --runs, --epochs, --lr, --batch-size, --models (validate.py)
    if args.json:
        check_writable(args.json, "--json")  # now, not after the whole evaluation
    if args.full and args.resume and not args.log:
        raise ConfigError("evaluate --full --resume needs the --log FILE of the interrupted evaluation")

    def on_row(row):
        print(f"  {row.model} run {row.run}: {row.accuracy:.2f} % ({row.seconds:.1f} s)", file=sys.stderr)

    def open_log(path, digest, real):
        if path is None:
            return None
        log = ResultLog(path, evaluation_key(set_digest=digest, protocol=protocol.to_json(), seed=args.seed,
                                             data=data_identity(real), device=device.type))
        # under torchrun rank 0 alone keeps the log; its errors (e.g. nothing to --resume) reach every rank
        distributed.run_on_main(lambda: log.start(resume=args.resume, describe={
            "set": str(args.path or "whole-dataset"), "models": list(protocol.models), "runs": protocol.runs,
            "seed": args.seed}) and None)
        return log if distributed.is_main() else None

    total = len(protocol.models) * protocol.runs

    if args.full:
        if not args.dataset:
            raise ConfigError("--full needs --dataset NAME")
        real = load_dataset(args.dataset, args.data_root)
        log = open_log(args.log, "whole-dataset:" + data_identity(real)["test_sha256"], real)
        report = run_logged(log, lambda done, row_done: evaluate_tensors(
            real.train_images, real.train_labels, real, protocol, seed=args.seed, method="whole-dataset", ipc=0,
            device=device, on_row=row_done, done=done), total=total, on_row=on_row)
    else:
        if not args.path:
            raise ConfigError("evaluate needs a PATH (a run folder or synset.safetensors), or --full --dataset NAME")
        syn = SyntheticSet.load(args.path)
        real = load_real_for(syn, args.data_root)
        log = open_log(args.log or default_log_path(args.path), tensor_digest(syn.tensors()), real)
        report = run_logged(log, lambda done, row_done: evaluate(
            syn, real, protocol, seed=args.seed, device=device, on_row=row_done, done=done), total=total, on_row=on_row)
    if not distributed.is_main():
        return 0  # rank 0 prints and writes the gathered report
    print(report.to_markdown())
    if args.json:
        result = report.to_json()
        write_json(args.json, result)
    _ = _json
    return 0


def cmd_experts(args) -> int:
    from .experts.command import run

    return run(args)


def cmd_bench(args) -> int:
    from .bench import Runner, Stopped, load_suite
    from .bench.report import write_report, write_results_section
    from .validate import Rule, check_number

    if args.max_minutes is not None:
        check_number("--max-minutes", args.max_minutes, Rule(low=0, low_exclusive=True))
    suite = load_suite(args.suite, data_root=args.data_root, device=args.device, check_data=not args.check)
    if args.check:
        for cell in suite.cells:
            its = "-" if cell.is_whole else "the method's default" if cell.iterations is None else cell.iterations
            print(f"{cell.id:40s} iterations {its}, eval {cell.eval or 'field defaults'}")
        print(f"{suite.name}: {len(suite.cells)} cells" + (" (a lever suite)" if suite.is_levers else "") + ", valid")
        return 0
    if suite.is_levers:
        from .bench.levers import run_levers, write_levers_report

        if args.results_md:
            raise ConfigError(f"--results-md: {suite.name} is a lever suite (its report is a timing table, not "
                              f"cells); give it a cell suite such as cpu-fmnist")

        if args.report_only:
            print(f"wrote {write_levers_report(suite, Path(args.out))}")
            return 0
        code = run_levers(suite, args.out, log=lambda line: print(line, file=sys.stderr, flush=True))
        print(f"wrote {Path(args.out) / 'report.md'}")
        return code
    if args.report_only:
        print(f"wrote {write_report(suite, args.out)}")
        if args.results_md:
            print(f"wrote {write_results_section(suite, args.out, args.results_md)}")
        return 0
    only = [c.strip() for c in args.only.split(",") if c.strip()] if args.only else None
    runner = Runner(suite, args.out, retry_failed=args.retry_failed, only=only, max_minutes=args.max_minutes)
    try:
        failed = runner.run()
    except Stopped as exc:
        print(f"ddkit bench: stopped ({exc}); the report in {Path(args.out) / 'report.md'} is partial; run the same "
              f"command again to continue", file=sys.stderr)
        if args.results_md:
            print(f"wrote {write_results_section(suite, args.out, args.results_md)} (partial)")
        return 0 if "max-minutes" in str(exc) else 130
    print(f"wrote {Path(args.out) / 'report.md'}" + (f" ({failed} failed cells)" if failed else ""))
    if args.results_md:
        print(f"wrote {write_results_section(suite, args.out, args.results_md)}")
    return 1 if failed else 0


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
    handlers = {"list": cmd_list, "distill": cmd_distill, "evaluate": cmd_evaluate, "experts": cmd_experts,
                "bench": cmd_bench, "show": cmd_show, "export": cmd_export}
    return run_command(args.command, lambda: in_session(lambda: handlers[args.command](args)))


def in_session(handler) -> int:
    """Run ``handler`` inside torchrun's process group when started by torchrun (``ddkit.distributed``; nothing
    is initialised otherwise)."""
    from . import distributed

    with distributed.session():
        return handler()


def console_main() -> int:
    """The ``ddkit`` console entry point: process settings first, then :func:`main`.

    Keeping freed memory in the process (:func:`ddkit.accel.keep_freed_memory`) is a process-wide change, so it
    happens here, where ddkit owns the process, and never in :func:`main`, which tests and users call in their own
    processes.  Long training loops reuse freed activations instead of re-faulting them (accel/allocator.py).
    """
    from .accel import keep_freed_memory

    keep_freed_memory()
    return main()


def run_command(command: str, handler) -> int:
    """The one top-level handler: user errors, file-system errors and Ctrl-C become one line each (no traceback);
    ddkit's warnings print as one ``warning:``/``note:`` line."""
    import warnings

    from .errors import DDKitWarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DDKitWarning):
            kind = "note" if category.__name__ == "RunNote" else "warning"
            print(f"ddkit {command}: {kind}: {message}", file=sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        original = warnings.showwarning
        warnings.simplefilter("always", DDKitWarning)
        warnings.showwarning = show
        try:
            return handler()
        except DDKitError as exc:
            kind = "" if exc.exit_code == 130 else "error: "  # Interrupted says "interrupted ..." itself
            print(f"ddkit {command}: {kind}{exc}", file=sys.stderr)
            return exc.exit_code
        except OSError as exc:  # a path the user gave that cannot be read or written
            where = f": {exc.filename}" if exc.filename else ""
            more = f" -> {exc.filename2}" if getattr(exc, "filename2", None) else ""
            print(f"ddkit {command}: error: {exc.strerror or type(exc).__name__}{where}{more}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            hint = " (checkpoints, if any, are intact; continue with --resume)" if command == "distill" else ""
            print(f"ddkit {command}: interrupted{hint}", file=sys.stderr)
            return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
