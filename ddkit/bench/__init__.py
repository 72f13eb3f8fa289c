"""``ddkit bench``: benchmark suites that run the toolkit's methods through its public commands and write the
comparison report (results.csv / results.json, report.md with plots and image grids, published numbers beside).

    from ddkit.bench import load_suite, run_suite
    suite = load_suite("cpu-smoke")                # or a YAML file: ddkit/bench/suite.py documents the shape
    failed = run_suite(suite, "out/bench-smoke")   # skips finished cells, resumes interrupted ones

Modules: ``suite`` (reading and validating suites), ``runner`` (a child process per phase, records),
``records`` (what is kept per cell), ``report`` and ``plots`` (the report), ``published`` (the papers' numbers as
data), ``levers`` (the speed layer's levers timed on CUDA).
"""
from .runner import Runner, Stopped, run_suite
from .suite import Cell, Suite, load_suite, shipped_suites

__all__ = ["Cell", "Runner", "Stopped", "Suite", "load_suite", "run_suite", "shipped_suites"]
