"""Evaluation results appended run by run, so an interrupted evaluation keeps what it finished.

Each trained model's row is appended to a JSON-lines log (``evaluations.jsonl`` beside the set, or ``--log``) the
moment it is known, flushed to the disk.  Lines belong to a *session* (one ``ddkit evaluate`` invocation) and carry
a *key* that identifies what was evaluated: the set's tensors (checksum), the protocol (without the list of models
and the number of runs, which only choose rows), the seed, the test data and the device type.  ``--resume``
continues the latest session with the same key: rows it already holds are not trained again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets
from pathlib import Path
from typing import Any

from ..errors import ArtifactError, ConfigError
from ..io import append_line
from .report import Row

LOG_FILE = "evaluations.jsonl"


def evaluation_key(*, set_digest: str, protocol: dict[str, Any], seed: int, data: dict[str, Any], device: str) -> str:
    """A short hash of what determines a row's accuracy (besides the model name and the run index)."""
    proto = {k: v for k, v in protocol.items() if k not in ("models", "runs")}
    text = json.dumps({"set": set_digest, "protocol": proto, "seed": seed, "data": data, "device": device},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class ResultLog:
    """One evaluation session in a JSON-lines log."""

    def __init__(self, path: str | Path, key: str) -> None:
        self.path = Path(path)
        self.key = key
        self.session: str | None = None
        self.rows: list[Row] = []

    def _lines(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line torn by a crash mid-write: skip it
            if isinstance(rec, dict):
                out.append(rec)
        return out

    def start(self, *, resume: bool, describe: dict[str, Any] | None = None) -> list[Row]:
        """Begin a new session, or with ``resume`` continue the latest one with this key; returns the rows done."""
        done: dict[tuple[str, int], Row] = {}
        if resume:
            lines = [r for r in self._lines() if r.get("key") == self.key]
            sessions = [r["session"] for r in lines if "begin" in r]
            if not sessions:
                raise ConfigError(f"evaluate --resume: {self.path} holds no earlier evaluation of this set with these "
                                  f"settings (protocol, seed, data, device); run without --resume")
            self.session = sessions[-1]
            fields = {f.name for f in dataclasses.fields(Row)}
            for r in lines:
                if r.get("session") == self.session and isinstance(r.get("row"), dict):
                    try:
                        row = Row(**{k: v for k, v in r["row"].items() if k in fields})
                    except TypeError:
                        continue
                    done[(row.model, int(row.run))] = row
        else:
            self.session = secrets.token_hex(6)
            try:
                append_line(self.path, json.dumps({"session": self.session, "key": self.key, "begin": describe or {}}))
            except ArtifactError as exc:  # e.g. a set in a read-only folder: the log can live elsewhere
                raise ArtifactError(f"{exc}; pass --log FILE to keep the evaluation log elsewhere") from None
        self.rows = list(done.values())
        return self.rows

    def add(self, row: Row) -> None:
        """Append one finished run (called as soon as its accuracy is known)."""
        if self.session is None:
            raise RuntimeError("ResultLog.start() must run before add()")
        append_line(self.path, json.dumps({"session": self.session, "key": self.key, "row": dataclasses.asdict(row)}))
        self.rows.append(row)


def default_log_path(set_path: str | Path) -> Path:
    """``evaluations.jsonl`` in the run folder (or beside the ``.safetensors`` file) of the evaluated set."""
    p = Path(set_path)
    return (p if p.is_dir() else p.parent) / LOG_FILE


def data_identity(real: Any) -> dict[str, Any]:
    """The test data's identity for the log key: name, size and a hash of the test images and labels."""
    import torch

    h = hashlib.sha256()
    for t in (real.test_images, real.test_labels):
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"dataset": real.name, "test_size": int(real.test_labels.shape[0]), "test_sha256": h.hexdigest()}


def run_logged(log: ResultLog | None, evaluate: Any, *, total: int, on_row: Any = None) -> Any:
    """Call ``evaluate(done_rows, on_row)``, appending each new row to ``log``; Ctrl-C becomes an
    :class:`~ddkit.errors.Interrupted` that says what was kept and how to continue."""
    from ..errors import Interrupted

    def row_done(row: Row) -> None:
        if log is not None:
            log.add(row)
        if on_row is not None:
            on_row(row)

    try:
        return evaluate(list(log.rows) if log is not None else [], row_done)
    except KeyboardInterrupt:
        if log is None:
            raise Interrupted("interrupted; no finished run was kept (pass --log FILE to keep them run by run)") from None
        raise Interrupted(f"interrupted after {len(log.rows)} of {total} runs; the finished runs are kept in "
                          f"{log.path}: run the same command with --resume to continue") from None
