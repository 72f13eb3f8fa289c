"""``ddkit bench``: run a suite's cells, each phase in a fresh ``ddkit`` child process, and keep the records.

Each phase is the public command a user would type, so a cell's run folder is exactly what ``ddkit distill``
writes and its accuracy exactly what ``ddkit evaluate`` reports:

* ``experts``: ``ddkit experts ... --out DIR/experts/NAME`` once per store the suite's trajectory cells name;
* ``distill``: ``ddkit distill --config cells/<id>/distill.yaml --out cells/<id>/run`` (``--resume`` when the
  folder holds a checkpoint: an interrupted cell continues from it, it does not restart);
* ``evaluate``: ``ddkit evaluate cells/<id>/run --log cells/<id>/evaluations.jsonl --json ...`` (``--resume`` when
  the log holds an earlier session: finished runs are not trained again); the whole-data row is
  ``ddkit evaluate --full``.

A fresh process per phase gives each its own peak resident memory (``os.wait4``'s ``ru_maxrss`` of that child,
not of the bench) and keeps one cell's crash, memory or compiled graphs out of the next.  A failing phase is
recorded with the last error line of its output and the suite goes on; a rerun skips finished cells (and failed
ones, unless ``--retry-failed``).  ``--max-minutes`` stops the suite cleanly: no phase starts after the deadline,
and a running one is interrupted (SIGINT) so it keeps its checkpoint or its finished evaluation runs; SIGTERM
(e.g. from ``timeout``) is handled the same way.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ..io import atomic_write_text
from .records import DONE, FAILED, INTERRUPTED, RUNNING, Attempt, Record, now
from .suite import Cell, ExpertSpec, Suite, protocol_of

#: checkpoint about this often (seconds of distillation) when the budget states a cost per iteration, so an
#: interrupted cell loses at most this much work
CHECKPOINT_SECONDS = 30.0


class Stopped(Exception):
    """The suite was asked to stop (deadline, SIGTERM or Ctrl-C); records are consistent."""


class Runner:
    def __init__(self, suite: Suite, out: str | Path, *, retry_failed: bool = False, only: list[str] | None = None,
                 max_minutes: float | None = None, log: Callable[[str], None] | None = None,
                 python: str = sys.executable, report: bool = True) -> None:
        self.suite = suite
        self.out = Path(out).resolve()
        self.retry_failed = retry_failed
        self.only = only
        self.deadline = time.monotonic() + 60.0 * max_minutes if max_minutes else None
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.python = python
        self.write_report = report
        self._stop_reason: str | None = None

    # ------------------------------------------------------------------ records
    def cell_dir(self, cell: Cell) -> Path:
        return self.out / "cells" / cell.id

    def record(self, cell: Cell) -> Record:
        return Record.open(self.cell_dir(cell) / "cell.json", cell.spec(), cell.fingerprint(), f"cell {cell.id}")

    def expert_record(self, spec: ExpertSpec) -> Record:
        import dataclasses

        d = dataclasses.asdict(spec)
        d.pop("data_root")
        d.pop("device")
        return Record.open(self.out / "experts" / f"{spec.name}.json", d, spec.fingerprint(), f"experts {spec.name}")

    def selected(self) -> list[Cell]:
        if not self.only:
            return list(self.suite.cells)
        from ..errors import ConfigError

        ids = [c.id for c in self.suite.cells]
        unknown = [o for o in self.only if o not in ids]
        if unknown:
            import difflib

            close = difflib.get_close_matches(unknown[0], ids, n=3, cutoff=0.5)
            raise ConfigError(f"--only: no cell {unknown[0]!r} in {self.suite.name}"
                              + (f"; did you mean {', '.join(map(repr, close))}?" if close else "")
                              + f" (cells: {', '.join(ids)})")
        return [c for c in self.suite.cells if c.id in self.only]

    # ------------------------------------------------------------------ the suite
    def run(self) -> int:
        """Run every selected cell not yet finished; returns the number of cells that failed (so far)."""
        cells = self.selected()
        for cell in cells:
            self.record(cell)  # refuse changed specs before anything runs
        for spec in self.suite.experts.values():
            self.expert_record(spec)
        self.out.mkdir(parents=True, exist_ok=True)
        from .suite import suite_text

        atomic_write_text(self.out / "suite.yaml", suite_text(self.suite.source.replace(" (shipped)", ""))[0])
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM,)}
        signal.signal(signal.SIGTERM, self._on_term)
        try:
            for i, cell in enumerate(cells):
                rec = self.record(cell)
                status = rec.status(self.phases(cell))
                if status == DONE or (status == FAILED and not self.retry_failed):
                    self.log(f"[{i + 1}/{len(cells)}] {cell.id}: {status}, skipped")
                    continue
                self._check_time()
                self.log(f"[{i + 1}/{len(cells)}] {cell.id}: {'resuming' if status == INTERRUPTED else 'starting'}")
                self.run_cell(cell, rec)
                status = rec.status(self.phases(cell))
                self.log(f"[{i + 1}/{len(cells)}] {cell.id}: {status}" + (f" ({rec.error()})" if status == FAILED else ""))
                self.report()
        except (Stopped, KeyboardInterrupt) as exc:
            self.log(f"bench stopped: {exc or 'interrupted'}; rerun the same command to continue")
            self.report()
            raise Stopped(str(exc) or "interrupted") from None
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        self.report()
        return sum(self.record(c).status(self.phases(c)) == FAILED for c in cells)

    def report(self) -> None:
        if self.write_report:
            from .report import write_report

            write_report(self.suite, self.out)

    @staticmethod
    def phases(cell: Cell) -> tuple[str, ...]:
        if cell.is_whole:
            return ("evaluate",)
        return (("experts",) if cell.experts else ()) + ("distill", "evaluate")

    def _on_term(self, signum, frame) -> None:  # noqa: ARG002
        self._stop_reason = "SIGTERM"
        raise Stopped("terminated (SIGTERM)")

    def _check_time(self) -> None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise Stopped("--max-minutes reached")

    # ------------------------------------------------------------------ one cell
    def run_cell(self, cell: Cell, rec: Record) -> None:
        if cell.experts:
            spec = self.suite.experts[cell.experts]
            if not self.run_experts(spec):
                phase = rec.phase("experts")
                phase.status, phase.error = FAILED, self.expert_record(spec).error() or "expert training failed"
                rec.save()
                return
            rec.phase("experts").status = DONE
            rec.save()
        if not cell.is_whole and rec.phase("distill").status != DONE:
            if not self.run_phase(rec, "distill", self.distill_command(cell)):
                return
        if rec.phase("evaluate").status != DONE:
            self.run_phase(rec, "evaluate", self.evaluate_command(cell))

    def run_experts(self, spec: ExpertSpec) -> bool:
        rec = self.expert_record(spec)
        phase = rec.phase("experts")
        if phase.status == DONE:
            return True
        if phase.status == FAILED and not self.retry_failed:
            return False
        store = self.out / "experts" / spec.name
        cmd = ["experts", "--dataset", spec.dataset, "--num-experts", str(spec.num_experts), "--epochs",
               str(spec.epochs), "--out", str(store), "--model", spec.model, "--optimizer", spec.optimizer,
               "--seed", str(spec.seed), "--device", spec.device, "--quiet"]
        if spec.data_root:
            cmd += ["--data-root", str(spec.data_root)]
        for key, value in spec.set.items():
            cmd += ["--set", f"{key}={_text(value)}"]
        if store.exists():
            cmd.append("--resume")
        self.log(f"  experts {spec.name}: {spec.num_experts} x {spec.epochs} epochs on {spec.dataset}")
        return self.run_phase(rec, "experts", cmd, log_name=self.out / "experts" / f"{spec.name}.log")

    def distill_command(self, cell: Cell) -> list[str]:
        """``ddkit distill --config`` with the cell's settings; ``--resume`` from a checkpoint, ``--overwrite``
        for a folder an interrupted first attempt left without one."""
        from ..engine.checkpoint import CHECKPOINT_FILE
        from ..engine.runfolder import RUN_FILES

        folder = self.cell_dir(cell)
        run = folder / "run"
        atomic_write_text(folder / "distill.yaml", _yaml(self.distill_config(cell)))
        cmd = ["distill", "--config", str(folder / "distill.yaml"), "--out", str(run)]
        if (run / CHECKPOINT_FILE).is_file():
            cmd.append("--resume")
        elif any((run / name).exists() for name in RUN_FILES):
            cmd.append("--overwrite")
        return cmd

    def distill_config(self, cell: Cell) -> dict[str, Any]:
        options = {k: (v.replace("{out}", str(self.out)) if isinstance(v, str) else v) for k, v in cell.options.items()}
        if cell.experts:
            options["experts"] = str(self.out / "experts" / cell.experts)
        cfg: dict[str, Any] = {"method": cell.method, "dataset": cell.dataset, "ipc": cell.ipc, "seed": cell.seed,
                               "device": cell.device, "speed": cell.speed}
        if cell.iterations is not None:
            cfg["iterations"] = cell.iterations
        data: dict[str, Any] = {"root": str(cell.data_root)} if cell.data_root and _needs_root(cell.dataset) else {}
        engine: dict[str, Any] = {"progress": False}
        per = cell.budget.get("seconds_per_iteration")
        if per:
            engine["checkpoint_every"] = max(1, int(CHECKPOINT_SECONDS // float(per)))
        for key, value in cell.set.items():
            section, _, name = key.partition(".")
            target = {"data": data, "engine": engine}.get(section) if name else None
            if target is None:
                cfg[key] = value
            else:
                target[name] = value
        cfg["data"], cfg["engine"], cfg["method_options"] = data, engine, options
        return cfg

    def evaluate_command(self, cell: Cell) -> list[str]:
        folder = self.cell_dir(cell)
        protocol = protocol_of(cell)
        log = folder / "evaluations.jsonl"
        cmd = ["evaluate"]
        if cell.is_whole:
            cmd += ["--full", "--dataset", cell.dataset]
            if cell.data_root and _needs_root(cell.dataset):
                cmd += ["--data-root", str(cell.data_root)]
        else:
            cmd.append(str(folder / "run"))
        ev = cell.eval
        cmd += ["--protocol", str(ev.get("protocol", "field")), "--models", ",".join(protocol.models),
                "--runs", str(protocol.runs), "--seed", str(cell.seed), "--device", cell.device,
                "--speed", cell.speed, "--log", str(log), "--json", str(folder / "eval.json")]
        for key, flag in (("epochs", "--epochs"), ("steps", "--steps"), ("lr", "--lr"), ("batch_size", "--batch-size")):
            if ev.get(key) is not None:
                cmd += [flag, str(ev[key])]
        if ev.get("dsa") is False:
            cmd.append("--no-dsa")
        if _has_session(log):
            cmd.append("--resume")
        return cmd

    # ------------------------------------------------------------------ one child process
    def run_phase(self, rec: Record, name: str, args: list[str], log_name: Path | None = None) -> bool:
        """Run ``ddkit ARGS`` as a child, record the attempt; True when it succeeded."""
        self._check_time()
        phase = rec.phase(name)
        resumed = "--resume" in args
        phase.status = RUNNING
        rec.save()
        logfile = log_name or rec.path.parent / f"{name}.log"
        logfile.parent.mkdir(parents=True, exist_ok=True)
        started = now()
        t0 = time.monotonic()
        with open(logfile, "a", encoding="utf-8") as fh:
            fh.write(f"\n### {started} ddkit {' '.join(args)}\n")
            fh.flush()
            proc = subprocess.Popen([self.python, "-m", "ddkit", *args], stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, preexec_fn=_interruptible)
            try:
                returncode, rss = self._wait(proc)
            except BaseException:
                self._end_child(proc)
                returncode, rss = proc.returncode if proc.returncode is not None else 130, 0.0
                phase.attempts.append(Attempt(started, time.monotonic() - t0, rss, returncode, resumed))
                phase.status, phase.error = INTERRUPTED, "interrupted by the bench (rerun to resume)"
                rec.save()
                raise
        phase.attempts.append(Attempt(started, round(time.monotonic() - t0, 3), round(rss, 1), returncode, resumed))
        if returncode == 0:
            phase.status, phase.error = DONE, None
        elif returncode in (130, -signal.SIGINT, -signal.SIGTERM) or self._stop_reason:
            phase.status, phase.error = INTERRUPTED, "interrupted (rerun to resume)"
        else:
            phase.status, phase.error = FAILED, last_error(logfile, returncode)
        rec.save()
        if phase.status == INTERRUPTED:
            raise Stopped(self._stop_reason or "a phase was interrupted")
        return returncode == 0

    def _wait(self, proc: subprocess.Popen) -> tuple[int, float]:
        """Wait for the child (its own rusage: ``os.wait4``); at the deadline interrupt it with SIGINT."""
        interrupted = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                return proc.returncode, usage.ru_maxrss / 1024.0  # Linux: KiB
            if not interrupted and self.deadline is not None and time.monotonic() >= self.deadline:
                self.log("  --max-minutes reached: interrupting the running phase (it keeps its checkpoint)")
                self._stop_reason = "--max-minutes reached"
                proc.send_signal(signal.SIGINT)
                interrupted = True
            time.sleep(0.2)

    @staticmethod
    def _end_child(proc: subprocess.Popen, grace: float = 30.0) -> None:
        """Interrupt the child (SIGINT: it keeps what it finished) and reap it; kill it after ``grace`` seconds."""
        if proc.returncode is not None:
            return
        try:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        except (ProcessLookupError, ChildProcessError):
            pass


def _interruptible() -> None:
    """In the child before exec: SIGINT back to its default, so Python turns it into KeyboardInterrupt.

    A bench started with ``nohup ... &`` (or from any shell without job control) ignores SIGINT, and an ignored
    signal stays ignored across exec: the child would then never stop at --max-minutes and keep its checkpoint.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _needs_root(dataset: str) -> bool:
    from ..data.datasets import get_dataset_spec

    return get_dataset_spec(dataset).needs_root


def _has_session(log: Path) -> bool:
    """Whether an evaluation log holds a begun session (then ``--resume`` continues it)."""
    if not log.is_file():
        return False
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if "begin" in json.loads(line):
                return True
        except (ValueError, TypeError):
            continue
    return False


def last_error(logfile: Path, returncode: int) -> str:
    """The child's one-line ddkit error, else the last line of a traceback, else its exit status."""
    try:
        lines = [ln.strip() for ln in logfile.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    starts = [i for i, ln in enumerate(lines) if ln.startswith("### ")]
    lines = lines[starts[-1] + 1:] if starts else lines  # this attempt's output only
    for ln in reversed(lines):
        if ln.startswith("ddkit ") and "error:" in ln:
            return ln[:500]
    tail = lines[-1] if lines else ""
    return (f"exit status {returncode}" + (f": {tail}" if tail else ""))[:500]


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def run_suite(suite: Suite, out: str | Path, **kw: Any) -> int:
    """Run ``suite`` into ``out`` (see :class:`Runner`); returns the number of failed cells."""
    return Runner(suite, out, **kw).run()
