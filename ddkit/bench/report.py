"""The suite's report: ``results.csv`` / ``results.json`` (one row per cell and evaluation model), ``report.md``
with the plots and image grids, and the published numbers beside ours.

Built from the records alone (:mod:`ddkit.bench.records`), so it can be regenerated at any time
(``ddkit bench SUITE --out DIR --report-only``) and always says how complete it is: a suite with cells still
pending is marked *partial* at the top, and failed cells are listed with their errors.
"""
from __future__ import annotations

import csv
import io
import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any

from ..io import atomic_write_text
from .published import published
from .records import DONE, FAILED, Record
from .suite import Cell, Suite, protocol_of

COLUMNS = ("cell", "dataset", "method", "ipc", "status", "iterations", "iterations_done", "budget",
           "distill_s", "iteration_s", "distill_peak_rss_mib", "eval_model", "eval_runs", "eval_length",
           "acc_mean", "acc_std", "accs", "eval_s", "eval_peak_rss_mib", "published", "published_source", "error")


def _budget_text(cell: Cell) -> str:
    if cell.is_whole:
        return "whole training set"
    if cell.iterations == 0:
        return "selection (no iterations)"
    b = cell.budget
    if "seconds" in b:
        return f"{b['seconds']:g} s at {b['seconds_per_iteration']:g} s/it -> {cell.iterations} it"
    if cell.iterations is None:
        return "the method's full budget"
    return f"{cell.iterations} it"


def _eval_length(cell: Cell) -> str:
    p = protocol_of(cell)
    return f"{p.steps} steps" if p.steps is not None else f"{p.epochs} epochs"


def _metrics(run: Path) -> tuple[int | None, float | None]:
    """(iterations done, sum of per-iteration seconds) from the run folder's ``metrics.jsonl``."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None, None
    its, secs = 0, 0.0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "it" in rec and "seconds" in rec:
            its = max(its, int(rec["it"]))
            secs += float(rec["seconds"])
    return its, round(secs, 2)


def cell_rows(cell: Cell, out: Path) -> list[dict[str, Any]]:
    """The cell's rows (one per evaluation model; one row without accuracy while it has none)."""
    from .runner import Runner

    path = out / "cells" / cell.id / "cell.json"
    rec = Record.open(path, cell.spec(), cell.fingerprint(), f"cell {cell.id}") if path.is_file() else None
    status = rec.status(Runner.phases(cell)) if rec else "pending"
    distill = rec.phases.get("distill") if rec else None
    evaluate = rec.phases.get("evaluate") if rec else None
    its, it_s = _metrics(out / "cells" / cell.id / "run")
    pub = published(cell.dataset, cell.method, cell.ipc)
    protocol = protocol_of(cell)
    base = {
        "cell": cell.id, "dataset": cell.dataset, "method": cell.method, "ipc": cell.ipc, "status": status,
        "iterations": "" if cell.is_whole else (cell.iterations if cell.iterations is not None else "default"),
        "iterations_done": its if its is not None else "", "budget": _budget_text(cell),
        "distill_s": round(distill.wall_s, 1) if distill and distill.attempts else "",
        "iteration_s": it_s if it_s is not None else "",
        "distill_peak_rss_mib": round(distill.max_rss_mib, 0) if distill and distill.attempts else "",
        "eval_runs": protocol.runs, "eval_length": _eval_length(cell),
        "eval_s": round(evaluate.wall_s, 1) if evaluate and evaluate.attempts else "",
        "eval_peak_rss_mib": round(evaluate.max_rss_mib, 0) if evaluate and evaluate.attempts else "",
        "published": pub.text() if pub else "", "published_source": pub.source if pub else "",
        "error": (rec.error() or "") if rec else "",
    }
    results = {}
    result_file = out / "cells" / cell.id / "eval.json"
    if status == DONE and result_file.is_file():
        results = json.loads(result_file.read_text(encoding="utf-8")).get("results", {})
    if not results:
        return [{**base, "eval_model": ",".join(protocol.models), "acc_mean": "", "acc_std": "", "accs": ""}]
    return [{**base, "eval_model": model, "acc_mean": round(r["mean"], 2), "acc_std": round(r["std"], 2),
             "accs": " ".join(f"{a:.2f}" for a in r["accs"])} for model, r in results.items()]


def collect(suite: Suite, out: Path) -> list[dict[str, Any]]:
    return [row for cell in suite.cells for row in cell_rows(cell, out)]


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS))
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in COLUMNS})
    return buf.getvalue()


def _machine() -> str:
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {dev}")


def write_report(suite: Suite, out: str | Path) -> Path:
    """Write results.csv, results.json, plots and report.md into ``out``; returns the report's path."""
    out = Path(out)
    if suite.is_levers:
        from .levers import write_levers_report

        return write_levers_report(suite, out)
    rows = collect(suite, out)
    atomic_write_text(out / "results.csv", _csv(rows))
    atomic_write_text(out / "results.json", json.dumps({"suite": suite.name, "rows": rows}, indent=1) + "\n")
    from .plots import make_plots

    plots = make_plots(rows, out / "plots")
    grids = copy_grids(suite, out, rows)
    text = render(suite, rows, plots, grids)
    atomic_write_text(out / "report.md", text)
    return out / "report.md"


def copy_grids(suite: Suite, out: Path, rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """One image grid per (dataset, method): the finished cell with the largest IPC (its run's ``grid.png``, as
    ``ddkit show`` writes it)."""
    best: dict[tuple[str, str], Cell] = {}
    done = {r["cell"] for r in rows if r["status"] == DONE}
    for cell in suite.cells:
        if cell.is_whole or cell.id not in done:
            continue
        key = (cell.dataset, cell.method)
        if key not in best or cell.ipc > best[key].ipc:
            best[key] = cell
    grids = []
    for (dataset, method), cell in best.items():
        src = out / "cells" / cell.id / "run" / "grid.png"
        if not src.is_file():
            from ..synthetic import SyntheticSet, save_grid

            set_file = src.parent / "synset.safetensors"
            if not set_file.is_file():
                continue
            save_grid(SyntheticSet.load(set_file), src)
        dst = out / "plots" / f"grid_{cell.id}.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        grids.append((f"{method}, {dataset}, IPC {cell.ipc}", f"plots/{dst.name}"))
    return grids


def _fmt(value: Any, digits: int = 1) -> str:
    if value == "" or value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The comparison table (one line per cell and evaluation model), shared by ``report.md`` and the section
    ``--results-md`` writes into a results file."""
    lines = ["| dataset | method | IPC | budget | distill s | it s | peak MiB | eval | accuracy % | published % | "
             "status |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = f"{r['acc_mean']:.2f} ± {r['acc_std']:.2f}" if r["acc_mean"] != "" else "–"
        model = "" if r["eval_model"] == "convnet" else f"{r['eval_model']}, "
        ev = f"{model}{r['eval_runs']} x {r['eval_length']}"
        ipc = "all" if r["method"] == "whole-data" else r["ipc"]
        pub = f"{r['published']} ({r['published_source']})" if r["published"] else "–"
        lines.append(f"| {r['dataset']} | {r['method']} | {ipc} | {r['budget']} | {_fmt(r['distill_s'])} | "
                     f"{_fmt(r['iteration_s'])} | {_fmt(r['distill_peak_rss_mib'], 0)} | {ev} | {acc} | {pub} | "
                     f"{r['status']} |")
    return lines


def _markers(suite: Suite) -> tuple[str, str]:
    return (f"<!-- ddkit bench {suite.name}: begin (generated by `ddkit bench --results-md`; edits inside are "
            f"overwritten) -->", f"<!-- ddkit bench {suite.name}: end -->")


def write_results_section(suite: Suite, out: str | Path, target: str | Path) -> Path:
    """Put the suite's table into a hand-written results file (e.g. ``benchmarks/RESULTS.md``) between two marker
    comments named after the suite, so the figures quoted there are the generated ones and a rerun replaces them
    in place; the rest of the file is left as it is.  Without the markers the section is appended.  Links point
    to ``report.md`` and its plots relative to the target file.  Written atomically."""
    out, target = Path(out), Path(target)
    rows = collect(suite, out)
    begin, end = _markers(suite)
    rel = Path(os.path.relpath(out, target.parent)).as_posix()  # links work from the target file
    counts = _status_counts(rows)
    finished, total = counts.get(DONE, 0), sum(counts.values())
    status = (f"All {total} cells finished." if finished == total else
              f"**Partial: {finished} of {total} cells finished.**")
    command = f"ddkit bench {suite.name} --out {Path(os.path.relpath(out)).as_posix()} --results-md " \
              f"{Path(os.path.relpath(target)).as_posix()}"  # as run from the current folder, not from the target's
    body = [begin, "", f"{status} Generated by `{command}` from the cell records in `{rel}/cells/`; the whole report "
            f"with the suite's description, "
            f"cell notes, plots and image grids: [{rel}/report.md]({rel}/report.md) "
            f"([accuracy vs IPC]({rel}/plots/accuracy_vs_ipc.png), "
            f"[accuracy vs time]({rel}/plots/accuracy_vs_time.png), [peak memory]({rel}/plots/peak_memory.png)). "
            f"Machine: {_machine()}.", ""] + table_lines(rows) + ["", end]
    text = target.read_text() if target.is_file() else ""
    if begin in text and end in text and text.index(begin) < text.index(end):
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        new = head + "\n".join(body) + tail
    else:
        new = text + ("\n" if text and not text.endswith("\n") else "") + "\n" + "\n".join(body) + "\n"
    atomic_write_text(target, new)
    return target


def _status_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """How many cells are in each state (a cell has one row per evaluation model, counted once)."""
    cells = {r["cell"]: r["status"] for r in rows}
    return {s: sum(1 for v in cells.values() if v == s) for s in set(cells.values())}


def render(suite: Suite, rows: list[dict[str, Any]], plots: list[tuple[str, str]],
           grids: list[tuple[str, str]]) -> str:
    counts = _status_counts(rows)
    total = sum(counts.values())
    finished = counts.get(DONE, 0)
    partial = finished < total
    lines = [f"# Benchmark report: `{suite.name}`", ""]
    if partial:
        states = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        lines += [f"**Partial report: {finished} of {total} cells finished** ({states}). Rerun "
                  f"`ddkit bench {suite.name} --out DIR` to continue; finished cells are skipped, interrupted ones "
                  f"resume from their checkpoints.", ""]
    else:
        lines += [f"All {total} cells finished.", ""]
    if suite.description:
        lines += [suite.description.strip(), ""]
    lines += [f"Generated by `ddkit bench` from `{suite.source}`. Machine: {_machine()}.", "",
              "Columns: *budget* is the distillation budget (a time budget becomes an iteration count through the "
              "method's measured seconds per iteration); *distill s* is the wall time of the `ddkit distill` "
              "process(es), start-up and data loading included, summed over attempts; *it s* the sum of the "
              "engine's per-iteration times of the final run; *peak MiB* the child process's peak resident memory; "
              "accuracy is mean ± population std over the evaluation runs (ConvNet-3 unless the model says "
              "otherwise, the final model, full test split); *published* is the paper's number with its source "
              "(V: checked against the source, V*: through a citing document, R: recalled, not re-checked).",
              ""] + table_lines(rows)
    failed = [r for r in rows if r["status"] == FAILED]
    if failed:
        lines += ["", "## Failed cells", ""]
        for r in failed:
            lines.append(f"- `{r['cell']}`: {r['error']}")
    notes = [(c.id, c.note) for c in suite.cells if c.note]
    if notes:
        lines += ["", "## Cell notes", ""] + [f"- `{cid}`: {note}" for cid, note in notes]
    if plots:
        lines += ["", "## Plots", ""]
        for title, path in plots:
            lines += [f"### {title}", "", f"![{title}]({path})", ""]
    if grids:
        lines += ["", "## Image grids (one per method: its largest finished IPC; one row per class)", ""]
        for title, path in grids:
            lines += [f"**{title}**", "", f"![{title}]({path})", ""]
    lines += ["", "Raw figures: [results.csv](results.csv), [results.json](results.json); per-cell records, logs and "
              "run folders under `cells/`."]
    return "\n".join(lines) + "\n"
