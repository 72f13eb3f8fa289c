"""Shared helpers for the benchmark scripts: fresh-subprocess measurement, result files, markdown tables."""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
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
    s = statistics.pstdev(xs) if len(xs) > 1 else 0.0
    return f"{m:.1f} ± {s:.1f}"
