"""``ddkit experts``: resolve the command line into an :class:`ExpertConfig` and train the missing experts.

``--set`` takes the data keys of ``ddkit distill`` (``data.zca``, ``data.zca_eps``, ``data.root``,
``data.image_size``), its ``speed`` key (``auto|plain``: the speed layer, as for ``distill`` and ``evaluate``) and
``expert.<field>`` for the training options (``expert.lr``, ``expert.batch_size``, ``expert.rho``,
``expert.alpha``, ``expert.dsa_strategy``, ...).
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any

from .. import distributed
from ..config import DataConfig, _type_hints, _unknown, coerce, parse_set
from .train import ExpertConfig, train_experts


def resolve(args: Any) -> tuple[ExpertConfig, DataConfig]:
    """Defaults < command-line flags < ``--set`` overrides (unknown keys and wrong types are rejected)."""
    config = ExpertConfig()
    data = DataConfig()
    for flag, name in (("model", "model"), ("epochs", "epochs"), ("optimizer", "optimizer")):
        value = getattr(args, flag, None)
        if value is not None:
            setattr(config, name, value)
    if getattr(args, "data_root", None):
        data.root = args.data_root
    known = [f"data.{f.name}" for f in dataclasses.fields(DataConfig)] + \
            [f"expert.{f.name}" for f in dataclasses.fields(ExpertConfig)] + ["speed"]
    for key, value in parse_set(getattr(args, "set", []) or []):
        if key not in known:
            raise _unknown(key, known, "experts")
        if key == "speed":  # distill's and evaluate's spelling of the one speed setting
            key = "expert.speed"
        section, name = key.split(".", 1)
        target = data if section == "data" else config
        setattr(target, name, coerce(value, _type_hints(type(target))[name], key))
    config.check()
    return config, data


def run(args: Any) -> int:
    """What ``ddkit experts`` does; returns the exit status."""
    from ..api import resolve_device
    from ..data import load_dataset

    config, data = resolve(args)
    real = load_dataset(args.dataset, data.root, zca=data.zca, zca_eps=data.zca_eps, image_size=data.image_size)
    device = resolve_device(getattr(args, "device", None) or "auto")

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    store = train_experts(real, config, args.out, args.num_experts, seed=args.seed, device=device,
                          resume=bool(args.resume), log=None if args.quiet else log)
    if not distributed.is_main():
        return 0  # under torchrun rank 0 reports the store
    accs = [store.info(i)["test_accuracy"] for i in store.experts()]
    mean = sum(accs) / len(accs)
    print(f"{args.out}: {len(accs)} experts ({config.model}, {real.name}, {config.epochs} epochs, {config.optimizer}); "
          f"final test accuracy {mean:.2f} % on average")
    return 0
