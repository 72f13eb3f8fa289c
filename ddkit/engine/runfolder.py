"""A run folder as a trustworthy record: one process at a time, no silent reuse, resume only with the same settings.

A run folder (``ddkit distill --out DIR``) holds one run: its checkpoint, its log, its config and, once it has
finished, its synthetic set.  Three things keep that record true:

* **a lock file** (``ddkit.lock``, holding the pid, host and start time of the process) keeps a second process out
  while a run writes there; a lock whose process is gone (killed, machine rebooted) is recognised as stale;
* **a guard** refuses to start a new run in a folder that holds a finished or unfinished run unless the user asks
  to continue it (``--resume``) or to discard it (``--overwrite``);
* **a run record**: every checkpoint stores the full resolved settings of its run (method and every field of the
  method's config dataclass, dataset and preprocessing with a fingerprint of the training data, IPC, seed,
  iterations).  ``--resume`` compares the record with the settings given now and refuses any difference, naming
  each one; a longer iteration count is the one change it accepts, and it says so.

The comparison is generic: it walks the method's config dataclass, so methods added later are covered without
being listed here.  A field that only changes speed and not the result can opt out with
``dataclasses.field(..., metadata={"resume": "free"})``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import secrets
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

from ..errors import ConfigError, DDKitWarning, RunFolderError
from ..io import parse_header_json, read_header
from .checkpoint import CHECKPOINT_FILE, load_checkpoint

LOCK_FILE = "ddkit.lock"
SYNSET_FILE = "synset.safetensors"
EVAL_LOG_FILE = "evaluations.jsonl"
#: the files a run writes; a fresh or overwriting run removes exactly these (never other files in the folder)
RUN_FILES = (SYNSET_FILE, "synset.json", "config.yaml", "metrics.jsonl", "grid.png", CHECKPOINT_FILE, EVAL_LOG_FILE)
RUN_GLOBS = ("grid_it*.png",)

#: record keys that describe where or how fast a run was made, not what it made: stored, never compared
#: (``speed`` selects levers whose results agree up to float rounding; a checkpoint may continue on another device)
INFORMATIONAL = ("device", "speed", "data.root", "version", "extended_from")


class RunNote(DDKitWarning):
    """Information about a run folder the user should see (a resume that extends the run, a stale lock removed)."""


# --------------------------------------------------------------------------------------------------------------
# the run record
# --------------------------------------------------------------------------------------------------------------
def data_fingerprint(real: Any) -> dict[str, Any]:
    """What identifies the training data a run used: names, shapes, preprocessing and a hash of the tensors.

    The hash covers the training images as the methods see them (after normalisation or ZCA) and their labels,
    so another copy of the files, another split or another preprocessing is caught even under the same name.
    """
    import torch

    h = hashlib.sha256()
    for t in (real.train_images, real.train_labels):
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return {
        "data.name": real.name,
        "data.num_classes": int(real.num_classes),
        "data.class_names": list(real.class_names),
        "data.image_shape": list(real.image_shape),
        "data.train_size": int(real.train_images.shape[0]),
        "data.preprocess": real.preprocess.to_json(),
        "data.train_sha256": h.hexdigest(),
    }


def run_record(*, method: str, method_config: Any, ipc: int, seed: int, iterations: int, real: Any,
               data_options: dict[str, Any] | None = None, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The flat, JSON-able record of a run's resolved settings, keyed as ``--set`` names them.

    Every field of ``method_config`` (any dataclass) is recorded as ``method.<field>``; ``iterations`` is the run's
    count (the config's own ``iterations`` is only its default budget).  ``info`` entries (device, speed, data
    root, version) are stored for the reader but never compared.
    """
    from .. import __version__

    record: dict[str, Any] = {"method": method, "dataset": real.name, "ipc": int(ipc), "seed": int(seed),
                              "iterations": int(iterations)}
    for f in dataclasses.fields(method_config):
        if f.name == "iterations":
            continue
        key = "free." if f.metadata.get("resume") == "free" else "method."
        record[key + f.name] = getattr(method_config, f.name)
    for k, v in (data_options or {}).items():
        record[k if k.startswith("data.") else f"data.{k}"] = v
    record.update(data_fingerprint(real))
    record.update({"version": __version__, **(info or {})})
    # the record is compared with one read back from JSON: tuples become lists, paths strings
    return json.loads(json.dumps(record, default=str))


def _ignored(key: str) -> bool:
    return key in INFORMATIONAL or key.startswith("free.")


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def compare_records(saved: dict[str, Any], current: dict[str, Any], *, at_iteration: int) -> tuple[list[str], list[str]]:
    """Differences that forbid a resume (one message each) and notes about allowed changes."""
    diffs: list[str] = []
    notes: list[str] = []
    other_method = saved.get("method") != current.get("method")
    for key in sorted(set(saved) | set(current), key=lambda k: (k.count("."), k)):
        if _ignored(key) or key == "iterations":
            continue
        if other_method and key.startswith("method."):
            continue  # another method's options are not comparable field by field
        a, b = saved.get(key, "(absent)"), current.get(key, "(absent)")
        if a == b:
            continue
        if key == "data.train_sha256":
            diffs.append("the training images differ from the checkpoint's (another copy, split or preprocessing "
                         "of the data)")
        else:
            diffs.append(f"{key} {_show(a)} in the checkpoint, {_show(b)} now")
    if other_method:
        diffs.append("(the method's options are not compared across methods)")
    planned, wanted = int(saved.get("iterations", 0)), int(current.get("iterations", 0))
    if wanted < max(planned, at_iteration):
        diffs.append(f"iterations {planned} in the checkpoint (which is at iteration {at_iteration}), {wanted} now: "
                     f"--resume may only keep or extend the iteration count")
    elif wanted > planned:
        notes.append(f"extending the run from {planned} to {wanted} iterations (the one setting --resume may "
                     f"change; the set records it under 'extended_from')")
    return diffs, notes


def read_checkpoint_record(folder: str | Path) -> tuple[dict[str, Any] | None, int]:
    """The run record and iteration stored in a folder's checkpoint header (tensors are not read here)."""
    path = Path(folder) / CHECKPOINT_FILE
    if not path.is_file():
        raise ConfigError(f"--resume: no checkpoint in {folder}; start without --resume")
    header = read_header(path, "a ddkit checkpoint")
    if "ddkit_meta" not in header:
        raise RunFolderError(f"{path} is a safetensors file but not a ddkit checkpoint")
    meta = parse_header_json(header, "ddkit_meta", path, "ddkit checkpoint")
    if not isinstance(meta, dict):
        raise RunFolderError(f"{path} is not a valid ddkit checkpoint: its metadata is not a JSON object")
    record = meta.get("run")
    try:
        iteration = int(meta.get("iteration", 0))
    except (TypeError, ValueError):
        raise RunFolderError(f"{path} is not a valid ddkit checkpoint: bad iteration {meta.get('iteration')!r}") from None
    return (record if isinstance(record, dict) else None), iteration


def check_resume(folder: str | Path, current: dict[str, Any]) -> dict[str, Any]:
    """Refuse to resume the checkpoint in ``folder`` with settings other than its own; return the record to store.

    Every difference is named in one message.  A longer iteration count is accepted with a :class:`RunNote`, and
    the returned record lists the earlier counts under ``extended_from``.
    """
    saved, at = read_checkpoint_record(folder)
    if saved is None:
        raise RunFolderError(f"--resume: the checkpoint in {folder} holds no record of its run's settings (written by "
                             f"an older ddkit), so they cannot be checked; start again with --overwrite")
    diffs, notes = compare_records(saved, current, at_iteration=at)
    if diffs:
        raise RunFolderError(f"--resume refused: the checkpoint in {folder} was made with other settings: "
                             + "; ".join(diffs) + ". Resume with the checkpoint's settings (its config.yaml), or "
                             "start a new run with --overwrite or another --out")
    load_checkpoint(folder)  # its tensors against their checksum, before the run says anything about resuming
    for note in notes:
        warnings.warn(f"{folder}: {note}", RunNote, stacklevel=2)
    record = dict(current)
    history = list(saved.get("extended_from") or [])
    if int(current["iterations"]) > int(saved["iterations"]):
        history.append(int(saved["iterations"]))
    if history:
        record["extended_from"] = history
    return record


# --------------------------------------------------------------------------------------------------------------
# the folder: guard and lock
# --------------------------------------------------------------------------------------------------------------
class RunFolder:
    """One output folder of ``ddkit distill`` (or ``ddkit.distill(out_dir=...)``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_FILE

    def check_path(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"--out {self.path} exists and is not a folder; give a folder path for the run")

    def describe_set(self) -> str:
        """``'dm on digits, ipc 10, 150 iterations'`` from the folder's synset.json, as far as it can be read."""
        try:
            meta = json.loads((self.path / "synset.json").read_text())
            return (f"{meta.get('method', '?')} on {meta.get('dataset', '?')}, ipc {meta.get('ipc', '?')}, "
                    f"{meta.get('iterations', '?')} iterations")
        except (OSError, ValueError, AttributeError):
            return "a synthetic set"

    def check_start(self, *, resume: bool, overwrite: bool) -> None:
        """Refuse to start in a folder that holds another run, unless ``resume`` or ``overwrite`` says what to do."""
        self.check_path()
        if resume and overwrite:
            raise ConfigError("--resume continues the run in the folder and --overwrite discards it: give one of them")
        if resume:
            if not (self.path / CHECKPOINT_FILE).is_file():
                raise ConfigError(f"--resume: no checkpoint in {self.path}; start without --resume")
            return
        if overwrite:
            return
        if (self.path / SYNSET_FILE).exists():
            raise RunFolderError(
                f"{self.path} holds a finished run ({self.describe_set()}); pass --overwrite to replace it, --resume "
                f"with a larger --iterations to extend it, or choose another --out")
        if (self.path / CHECKPOINT_FILE).exists():
            try:
                _, at = read_checkpoint_record(self.path)
                where = f" (checkpoint at iteration {at})"
            except Exception:
                where = ""
            raise RunFolderError(f"{self.path} holds an unfinished run{where}; pass --resume to continue it, "
                                 f"--overwrite to discard it, or choose another --out")

    def clear(self) -> list[str]:
        """Remove the files an earlier run wrote here (only ddkit's own run files); returns their names."""
        removed = []
        paths = [self.path / n for n in RUN_FILES]
        for pattern in RUN_GLOBS:
            paths += sorted(self.path.glob(pattern))
        for p in paths:
            if p.is_file() or p.is_symlink():
                try:
                    p.unlink()
                except FileNotFoundError:
                    continue
                removed.append(p.name)
        return removed

    @contextlib.contextmanager
    def lock(self, command: str = "distill") -> Iterator[None]:
        """Hold ``ddkit.lock`` for the block: a second process gets a one-line refusal, a stale lock is replaced."""
        self.check_path()
        created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunFolderError(f"cannot create the run folder {self.path}: {exc.strerror or exc}") from None
        token = secrets.token_hex(8)
        self._acquire(token, command)
        try:
            yield
        finally:
            self._release(token)
            if created:  # a run rejected before writing anything leaves no empty folder behind
                with contextlib.suppress(OSError):
                    self.path.rmdir()

    # -- lock internals ---------------------------------------------------------------------------------------
    def _acquire(self, token: str, command: str) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(), "command": command,
                "process_start": _process_start(os.getpid()), "token": token}
        text = json.dumps(info) + "\n"
        for _ in range(5):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                self._handle_existing()
                continue
            except OSError as exc:
                raise RunFolderError(f"cannot create the lock file {self.lock_path}: {exc.strerror or exc}") from None
            try:
                os.write(fd, text.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            return
        raise RunFolderError(f"could not take the lock {self.lock_path} (another process keeps taking it)")

    def _handle_existing(self) -> None:
        """The lock exists: refuse if its holder runs (or cannot be checked), remove it if it is stale."""
        try:
            raw = self.lock_path.read_text()
            held = json.loads(raw) if raw.strip() else None
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, ValueError):
            held = None
        if not isinstance(held, dict):
            # being written this very moment by its holder, or damaged: give a writer a moment, then call it stale
            if _age(self.lock_path) < 2.0:
                time.sleep(0.2)
                return
            self._remove_stale("an unreadable lock file")
            return
        pid, host = held.get("pid"), held.get("host")
        since = f", {held.get('command', 'a run')} since {held.get('started', '?')}"
        if host != socket.gethostname():
            raise RunFolderError(
                f"{self.path} is locked by pid {pid} on host {host}{since}; ddkit cannot check a process on another "
                f"machine: if none runs there, delete {self.lock_path}")
        if _alive(pid, held.get("process_start")):
            raise RunFolderError(f"{self.path} is in use by another ddkit process (pid {pid}{since}); wait for it to "
                                 f"finish or choose another --out")
        self._remove_stale(f"a stale lock left by pid {pid} (no longer running)")

    def _remove_stale(self, what: str) -> None:
        aside = self.path / f".{LOCK_FILE}.{secrets.token_hex(6)}.stale"
        try:
            os.replace(self.lock_path, aside)  # atomic: of two processes removing it, one wins
        except FileNotFoundError:
            return
        os.unlink(aside)
        warnings.warn(f"{self.path}: removed {what}", RunNote, stacklevel=4)

    def _release(self, token: str) -> None:
        try:
            held = json.loads(self.lock_path.read_text())
        except (OSError, ValueError):
            return
        if isinstance(held, dict) and held.get("token") == token:
            with contextlib.suppress(FileNotFoundError):
                self.lock_path.unlink()


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux ``/proc``), which tells a reused pid from the lock's holder."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def _alive(pid: Any, process_start: str | None) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # a process of another user holds the pid
    if process_start is not None:
        now = _process_start(pid)
        if now is not None and now != process_start:
            return False  # the pid was reused by another process
    return True
