"""Callbacks: logging, progress, periodic evaluation and image grids live here, not inside methods."""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io import atomic_write_text


@dataclass
class RunState:
    """A read-only view of the run that callbacks receive."""

    iteration: int
    iterations: int
    start_iteration: int
    metrics: dict[str, float]
    syn: Any
    real: Any
    seed: int
    elapsed: float
    method: str
    out_dir: Path | None = None
    history: list[dict[str, float]] = field(default_factory=list)


class Callback:
    #: under torchrun callbacks run on rank 0 alone, except those that take part in collective work themselves
    #: (periodic evaluation deals its runs over the ranks); they must leave writing to rank 0
    all_ranks: bool = False

    def on_start(self, state: RunState) -> None: ...

    def on_iteration_end(self, state: RunState) -> None: ...

    def on_end(self, state: RunState) -> None: ...


class ProgressBar(Callback):
    """A tqdm bar with iteration, it/s, loss and ETA (to stderr, so stdout stays for tables)."""

    def __init__(self, disable: bool | None = None) -> None:
        self.disable = disable
        self.bar = None

    def on_start(self, state: RunState) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=state.iterations, initial=state.start_iteration, desc=state.method, unit="it",
                        file=sys.stderr, disable=self.disable, dynamic_ncols=True)

    def on_iteration_end(self, state: RunState) -> None:
        if self.bar is not None:
            shown = {k: v for k, v in state.metrics.items() if k in ("loss", "acc")}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
            self.bar.update(1)

    def on_end(self, state: RunState) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricsLogger(Callback):
    """Appends one JSON line per iteration (and per evaluation) to ``metrics.jsonl``.

    On resume the file is cut back to the checkpoint's iteration so the log matches an uninterrupted run.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_start(self, state: RunState) -> None:
        kept = []
        if state.start_iteration > 0 and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("it", 0) <= state.start_iteration:
                        kept.append(line)
                except json.JSONDecodeError:
                    break
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self.file = open(self.path, "a", encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record, sort_keys=True) + "\n")
        self.file.flush()

    def on_iteration_end(self, state: RunState) -> None:
        self.log({"it": state.iteration, **state.metrics})

    def on_end(self, state: RunState) -> None:
        self.file.close()


class PeriodicEval(Callback):
    """Evaluates the current synthetic set every ``every`` iterations (its own random stream: never perturbs
    distillation) and records ``eval_acc``/``eval_std`` in the metrics.

    Under torchrun it runs on every rank, which share the evaluation runs (``ddkit.evaluation`` deals them over
    the ranks and gathers the rows); rank 0 alone logs and prints.
    """

    all_ranks = True

    def __init__(self, every: int, protocol, logger: MetricsLogger | None = None, device: str = "cpu") -> None:
        self.every = every
        self.protocol = protocol
        self.logger = logger
        self.device = device
        self.results: list[dict[str, Any]] = []

    def on_iteration_end(self, state: RunState) -> None:
        if self.every <= 0 or state.iteration % self.every != 0 or state.iteration == state.iterations:
            return
        self.run(state)

    def on_end(self, state: RunState) -> None:
        if self.every > 0 and state.iterations > state.start_iteration:
            self.run(state)

    def run(self, state: RunState) -> None:
        from .. import distributed
        from ..evaluation import evaluate

        start = time.perf_counter()
        report = evaluate(state.syn, state.real, self.protocol, seed=state.seed, device=self.device)
        if not distributed.is_main():
            return
        for model, s in report.summary().items():
            record = {"it": state.iteration, "eval_model": model, "eval_acc": s["mean"], "eval_std": s["std"],
                      "eval_seconds": time.perf_counter() - start}
            self.results.append(record)
            if self.logger is not None:
                self.logger.log(record)
            print(f"[eval it {state.iteration}] {model}: {s['mean']:.2f} ± {s['std']:.2f} %", file=sys.stderr)


class GridSaver(Callback):
    """Writes ``grid.png`` (and ``grid_itN.png`` every ``every`` iterations)."""

    def __init__(self, out_dir: str | Path, every: int = 0) -> None:
        self.out_dir = Path(out_dir)
        self.every = every

    def on_iteration_end(self, state: RunState) -> None:
        if self.every > 0 and state.iteration % self.every == 0:
            from ..synthetic import save_grid

            save_grid(state.syn, self.out_dir / f"grid_it{state.iteration}.png")

    def on_end(self, state: RunState) -> None:
        from ..synthetic import save_grid

        save_grid(state.syn, self.out_dir / "grid.png")


def is_finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
