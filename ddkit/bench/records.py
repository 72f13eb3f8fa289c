"""What a suite run keeps on disk, cell by cell, so that a rerun skips finished cells and resumes the others.

Layout of ``ddkit bench SUITE --out DIR``::

    DIR/suite.yaml                  the suite as it was read (the record of what was asked)
    DIR/cells/<id>/cell.json        the cell's spec, status, and one record per phase and attempt
    DIR/cells/<id>/run/             the run folder ``ddkit distill`` writes (checkpoints: interrupted runs resume)
    DIR/cells/<id>/distill.yaml     the config the distill phase runs (``ddkit distill --config``)
    DIR/cells/<id>/evaluations.jsonl, eval.json   the evaluation log (resumable run by run) and its result
    DIR/cells/<id>/<phase>.log      the phase's output (its last error line is the cell's error)
    DIR/experts/<name>/, <name>.json   expert stores shared by trajectory-matching cells
    DIR/results.csv, results.json, report.md, plots/   the report (rewritten after every cell)

Records are JSON, written atomically (:func:`ddkit.io.atomic_write_json`), so a run killed at any moment leaves
every record either as it was or complete.
"""
from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ArtifactError, ConfigError
from ..io import atomic_write_json

PHASES = ("experts", "distill", "evaluate")
#: a phase's states: done and failed are final (failed ones rerun only with --retry-failed); interrupted resumes
DONE, FAILED, INTERRUPTED, RUNNING = "done", "failed", "interrupted", "running"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Attempt:
    """One child process of a phase: how long it ran, its peak resident memory, how it ended."""

    started: str
    wall_s: float
    max_rss_mib: float
    returncode: int
    resumed: bool


@dataclass
class Phase:
    status: str | None = None
    attempts: list[Attempt] = field(default_factory=list)
    error: str | None = None

    @property
    def wall_s(self) -> float:
        """Every attempt's wall time (work redone after an interruption included: what the cell really cost)."""
        return sum(a.wall_s for a in self.attempts)

    @property
    def max_rss_mib(self) -> float | None:
        return max((a.max_rss_mib for a in self.attempts), default=None)

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "error": self.error, "attempts": [a.__dict__ for a in self.attempts]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Phase":
        return cls(d.get("status"), [Attempt(**a) for a in d.get("attempts", [])], d.get("error"))


@dataclass
class Record:
    """A cell's (or an expert store's) record: its spec, fingerprint and phases."""

    path: Path
    spec: dict[str, Any]
    fingerprint: str
    phases: dict[str, Phase] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def phase(self, name: str) -> Phase:
        return self.phases.setdefault(name, Phase())

    def status(self, needed: tuple[str, ...]) -> str:
        """pending | running | interrupted | failed | done, over the phases the cell needs."""
        states = [self.phases[p].status if p in self.phases else None for p in needed]
        if FAILED in states:
            return FAILED
        if all(s == DONE for s in states):
            return DONE
        if RUNNING in states:
            return RUNNING
        if INTERRUPTED in states or DONE in states:
            return INTERRUPTED
        return "pending"

    def error(self) -> str | None:
        for name in PHASES:
            if name in self.phases and self.phases[name].status == FAILED:
                return f"{name}: {self.phases[name].error}"
        return None

    def save(self) -> None:
        atomic_write_json(self.path, {"spec": self.spec, "fingerprint": self.fingerprint, "updated": now(),
                                      "phases": {k: v.to_json() for k, v in self.phases.items()}, **self.extra})

    @classmethod
    def open(cls, path: Path, spec: dict[str, Any], fingerprint: str, what: str) -> "Record":
        """The record at ``path``, or a fresh one; a record made for another spec is refused (its results would
        silently stand for settings they were not made with)."""
        if not path.is_file():
            return cls(path, spec, fingerprint)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            phases = {k: Phase.from_json(v) for k, v in d.get("phases", {}).items()}
        except (ValueError, TypeError, AttributeError) as exc:
            raise ArtifactError(f"{path} is not a readable bench record ({type(exc).__name__}); remove the folder "
                                f"{path.parent} to run {what} afresh") from None
        if d.get("fingerprint") != fingerprint:
            old = d.get("spec", {})
            diffs = [f"{k}: {old.get(k)!r} then, {spec.get(k)!r} now" for k in sorted(set(old) | set(spec))
                     if old.get(k) != spec.get(k)]
            raise ConfigError(f"{what} in {path.parent} was run with other settings ({'; '.join(diffs[:4]) or 'spec'}"
                              f"); use another --out, or remove {path.parent} to run it afresh")
        extra = {k: v for k, v in d.items() if k not in ("spec", "fingerprint", "updated", "phases")}
        return cls(path, spec, fingerprint, phases, extra)
