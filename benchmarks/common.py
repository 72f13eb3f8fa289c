"""Shared helpers for the benchmark scripts: fresh-subprocess measurement, result files, markdown tables."""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
DEFAULT_DATA = os.environ.get("DDKIT_DATA", str(ROOT.parent.parent / "shared" / "data"))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_child(module_args: list[str], timeout: float | None = None) -> dict[str, Any]:
    """Run ``python -m benchmarks.X args`` in a fresh process (so peak memory is per setting); parse its last
    stdout line as JSON."""
    proc = subprocess.run([sys.executable, *module_args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed: {' '.join(module_args)}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load_results(name: str) -> dict[str, Any]:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def save_results(name: str, data: dict[str, Any]) -> None:
    from ddkit.io import atomic_write_json

    atomic_write_json(RESULTS / f"{name}.json", data)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def mean_std(xs: list[float]) -> str:
    if not xs:
        return "–"
    m = statistics.fmean(xs)
    if len(xs) == 1:
        return f"{m:.1f}"  # one model has no spread: "± 0.0" would claim one
    return f"{m:.1f} ± {statistics.pstdev(xs):.1f}"


#: Published ConvNet-3 accuracies at IPC 1 / 10 / 50 (anchors.md section 1b): DC README / DSA README Tab. 2,
#: DM WACV'23 Tab. 1, CAFE CVPR'22 Tab. 1 (CAFE+DSA rows from the same table).
PAPER_ROWS: dict[tuple[str, str], tuple[str, str, str]] = {
    ("dc", "mnist"): ("91.7±0.5", "97.4±0.2", "98.8±0.1"),
    ("dc", "fashion-mnist"): ("70.5±0.6", "82.3±0.4", "83.6±0.4"),
    ("dc", "cifar10"): ("28.3±0.5", "44.9±0.5", "53.9±0.5"),
    ("dsa", "mnist"): ("88.7±0.6", "97.8±0.1", "99.2±0.1"),
    ("dsa", "fashion-mnist"): ("70.6±0.6", "84.6±0.3", "88.7±0.2"),
    ("dsa", "cifar10"): ("28.8±0.7", "52.1±0.5", "60.6±0.5"),
    ("dm", "mnist"): ("89.7±0.6", "97.5±0.1", "98.6±0.1"),
    ("dm", "fashion-mnist"): ("70.7±0.6", "83.5±0.1", "88.1±0.6"),
    ("dm", "cifar10"): ("26.0±0.8", "48.9±0.6", "63.0±0.4"),
    ("cafe", "mnist"): ("90.8±0.5", "97.5±0.1", "98.9±0.2"),
    ("cafe", "fashion-mnist"): ("73.7±0.7", "83.0±0.3", "88.2±0.3"),
    ("cafe", "cifar10"): ("30.3±1.1", "46.3±0.6", "55.5±0.6"),
    ("cafe+dsa", "mnist"): ("93.1±0.3", "97.2±0.2", "98.6±0.2"),
    ("cafe+dsa", "fashion-mnist"): ("77.1±0.9", "83.0±0.4", "84.8±0.4"),
    ("cafe+dsa", "cifar10"): ("31.6±0.8", "50.9±0.5", "62.3±0.4"),
}


def interleaved_times(runs: dict[str, Callable[[], object]], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of every variant, timed round by round in alternating order (reversed in even rounds).

    Each variant is called ``warmup`` times first (compiles, allocator growth), untimed.  Alternating within one
    process puts every variant through the same machine state: this VM drifts by 10-20 % between processes.
    """
    for run in runs.values():
        for _ in range(warmup):
            run()
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 else names[::-1]):
            t0 = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def save_json(folder: Path, name: str, data: dict[str, Any]) -> Path:
    """Write ``folder/name.json`` atomically (one file per measurement)."""
    from ddkit.io import atomic_write_json

    folder.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(folder / f"{name}.json", data)


def allocator_as_run(variant: str) -> bool:
    """Set up the C allocator as the measured program would have it, and say whether memory is kept.

    ddkit's console entry point keeps freed memory in the process (``ddkit.accel.keep_freed_memory``, called by
    ``ddkit.cli:console_main``); the official scripts run with glibc's defaults.  So single-variant runs of ddkit
    (``fast``, ``ddkit``) keep it and the official formulation (``naive``, ``official``) does not; ``paired`` runs
    share one process and one setting (glibc's defaults, or ``--allocator keep`` for both), so their ratio is the
    formulations' alone.
    """
    from ddkit.accel import keep_freed_memory

    return keep_freed_memory() if variant in ("fast", "ddkit") else False


#: ``--compile`` of the method benchmarks -> the speed layer's compile override (``SpeedLayer(compile=...)``):
#: "auto" applies ddkit's rule (``ddkit.accel.compiled.compile_pays_off``, from the run's ``config.iterations``),
#: "on"/"off" force it, as the methods' former ``compile`` option did.
COMPILE_CHOICES: dict[str, bool | None] = {"auto": None, "on": True, "off": False}


def ddkit_speed(compile: str = "auto", device: str = "cpu"):
    """The speed layer ddkit's side of a benchmark runs with: ``speed=auto`` as ``ddkit distill`` ships it, with
    the compile rule applied (``compile="auto"``) or forced (``"on"``/``"off"``)."""
    from ddkit.accel import SpeedLayer

    return SpeedLayer("auto", device, compile=COMPILE_CHOICES[compile])


#: method-config fields that moved into the speed layer (issue 13): a benchmark override naming one is an error,
#: not a silently ignored attribute.
MOVED_TO_SPEED_LAYER = ("compile", "real_chunk", "inner_chunk", "channels_last", "grad_mode")


def apply_overrides(config: Any, overrides: dict[str, Any]) -> None:
    """Set each ``field=value`` of ``overrides`` on a method config; unknown fields exit with a one-line error."""
    for key, value in overrides.items():
        if key in MOVED_TO_SPEED_LAYER:
            raise SystemExit(f"config override {key!r}: this speed option moved into ddkit.accel's speed layer "
                             f"(issue 13); use --compile auto|on|off to force compilation")
        if not hasattr(config, key):
            raise SystemExit(f"config override {key!r}: {type(config).__name__} has no such field")
        setattr(config, key, value)


def metrics_recorder():
    """An engine callback that keeps every iteration's metrics (as floats) in ``.rows``, for a benchmark's report.

    Built on call so that importing this module does not import ddkit's engine.
    """
    from ddkit.engine.callbacks import Callback

    class MetricsRecorder(Callback):
        def __init__(self) -> None:
            self.rows: list[dict[str, float]] = []

        def on_iteration_end(self, state) -> None:
            self.rows.append({k: float(v) for k, v in state.metrics.items()})

    return MetricsRecorder()
