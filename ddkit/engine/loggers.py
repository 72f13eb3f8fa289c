"""Optional loggers: watch a long run in TensorBoard or Weights & Biases (``--set engine.loggers=tensorboard,wandb``).

``metrics.jsonl`` stays the record of a run (resume cuts it back, ``ddkit bench`` reads it); these loggers only
mirror the same numbers into the tools users already watch.  They are engine callbacks like the others, so
under torchrun they run on rank 0 alone, and their packages are extras, never requirements:
``pip install 'ddkit[tensorboard]'`` or ``'ddkit[wandb]'``.  Asking for a logger whose package is missing fails in
one line naming the extra, before any work starts.

- ``tensorboard``: scalars under ``OUT/tensorboard`` (``tensorboard --logdir OUT``), through PyTorch's own
  ``SummaryWriter``.  A resumed run passes ``purge_step`` so TensorBoard drops the events a crashed run wrote
  after its checkpoint, as ``metrics.jsonl`` is cut back (a fresh or ``--overwrite`` run purges from step 1).
- ``wandb``: one W&B run in *offline* mode (files under ``OUT/wandb``; upload later with ``wandb sync``) unless
  ``WANDB_MODE`` says otherwise; the resolved run configuration is its config.  A resumed run starts a new W&B
  run whose steps continue from the checkpoint.

Every iteration's numeric metrics are logged at step = iteration; periodic evaluations as ``eval_acc/<model>``
(and ``eval_std``, ``eval_seconds``) at their iteration.
"""
from __future__ import annotations

import importlib
import math
import os
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, Mapping

from ..errors import ConfigError
from .callbacks import Callback, RunState

#: logger name -> (module that must import, extra that installs it)
AVAILABLE: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "ddkit[tensorboard]"),
    "wandb": ("wandb", "ddkit[wandb]"),
}


def parse_loggers(text: str | Iterable[str] | None) -> list[str]:
    """``"tensorboard,wandb"`` (or a list) -> names, each once, in order; unknown names are refused."""
    items = text.split(",") if isinstance(text, str) else list(text or [])
    names: list[str] = []
    for item in items:
        name = str(item).strip().lower()
        if not name or name in names:
            continue
        if name not in AVAILABLE:
            raise ConfigError(f"engine.loggers: unknown logger {name!r}; expected a comma-separated list of "
                              f"{', '.join(AVAILABLE)} (or nothing: metrics.jsonl is always written)")
        names.append(name)
    return names


def require(name: str) -> ModuleType:
    """Import the package logger ``name`` needs, or fail in one line naming the extra to install."""
    module, extra = AVAILABLE[name]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"engine.loggers={name} needs the {module} package, which is not installed: "
                          f"pip install '{extra}'") from None


def check_loggers(text: str | Iterable[str] | None) -> list[str]:
    """Parse ``engine.loggers`` and import each logger's package: what a run checks before it starts work."""
    names = parse_loggers(text)
    for name in names:
        require(name)
    return names


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a ``metrics.jsonl`` record as tags; an evaluation record's tags name its model."""
    model = record.get("eval_model")
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "it" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            continue
        out[f"{key}/{model}" if model is not None and key.startswith("eval_") else key] = float(value)
    return out


class ScalarLogger(Callback):
    """Forwards every iteration's metrics, and every record given to :meth:`log` (periodic evaluation), to
    :meth:`write`."""

    def on_iteration_end(self, state: RunState) -> None:
        self.log({"it": state.iteration, **state.metrics})

    def log(self, record: Mapping[str, Any]) -> None:
        values = scalars(record)
        if values:
            self.write(int(record["it"]), values)

    def write(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError


class TensorBoardLogger(ScalarLogger):
    """Scalars into a TensorBoard log folder (``writer_factory``: ``SummaryWriter``'s signature; tests pass a fake)."""

    def __init__(self, log_dir: str | Path, writer_factory: Callable[..., Any] | None = None) -> None:
        self.log_dir = Path(log_dir)
        if writer_factory is None:
            require("tensorboard")
            from torch.utils.tensorboard import SummaryWriter

            writer_factory = SummaryWriter
        self.factory = writer_factory
        self.writer: Any = None

    def on_start(self, state: RunState) -> None:
        # events at or after purge_step that an earlier (crashed or overwritten) run left are hidden by TensorBoard
        self.writer = self.factory(log_dir=str(self.log_dir), purge_step=state.start_iteration + 1)

    def write(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def on_end(self, state: RunState) -> None:
        self.writer.flush()
        self.writer.close()


class WandbLogger(ScalarLogger):
    """One Weights & Biases run, offline unless ``WANDB_MODE`` (or ``mode``) says otherwise."""

    def __init__(self, out_dir: str | Path, *, config: Mapping[str, Any] | None = None, project: str = "ddkit",
                 name: str | None = None, mode: str | None = None, module: ModuleType | None = None) -> None:
        self.wandb = module if module is not None else require("wandb")
        self.out_dir = Path(out_dir)
        self.config = dict(config or {})
        self.project = project
        self.name = name or self.out_dir.name
        self.mode = mode or os.environ.get("WANDB_MODE") or "offline"
        self.run: Any = None

    def on_start(self, state: RunState) -> None:
        self.run = self.wandb.init(project=self.project, name=self.name, dir=str(self.out_dir), mode=self.mode,
                                   config={**self.config, "start_iteration": state.start_iteration})

    def write(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def on_end(self, state: RunState) -> None:
        self.run.finish()


class Fanout:
    """Several record sinks as one (``PeriodicEval`` writes its records to ``metrics.jsonl`` and the loggers)."""

    def __init__(self, *sinks: Any) -> None:
        self.sinks = [s for s in sinks if s is not None]

    def log(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(record)


def make_loggers(text: str | Iterable[str] | None, out_dir: str | Path,
                 config: Mapping[str, Any] | None = None) -> list[ScalarLogger]:
    """The loggers ``engine.loggers`` names, writing under the run folder ``out_dir``."""
    out = Path(out_dir)
    made: list[ScalarLogger] = []
    for name in parse_loggers(text):
        made.append(TensorBoardLogger(out / "tensorboard") if name == "tensorboard" else WandbLogger(out, config=config))
    return made
