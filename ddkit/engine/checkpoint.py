"""Checkpoints for exact resume: synthetic tensors, method state, random stream state, iteration, run record.

A checkpoint's header carries the iteration, the method and, when the run has one, its *run record*: the full
resolved settings (see :mod:`ddkit.engine.runfolder`), so a resume can be checked against what made the
checkpoint before any work starts.  Its tensors carry a SHA-256 (``ddkit.io``), verified when it is loaded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import ArtifactError
from ..io import load_state, save_state

CHECKPOINT_FILE = "checkpoint.safetensors"


def save_checkpoint(out_dir: str | Path, *, iteration: int, syn, distiller, generator: torch.Generator,
                    extra: dict[str, Any] | None = None, run_record: dict[str, Any] | None = None) -> Path:
    """Atomically write everything needed to continue exactly after ``iteration``."""
    state = {
        "iteration": iteration,
        "syn": {k: v for k, v in syn.state_dict().items()},
        "distiller": distiller.state_dict(),
        "generator": generator.get_state(),
        "extra": extra or {},
    }
    meta: dict[str, Any] = {"method": distiller.name, "iteration": iteration, "dataset": syn.dataset}
    if run_record is not None:
        meta["run"] = run_record
    return save_state(Path(out_dir) / CHECKPOINT_FILE, state, meta)


def load_checkpoint(out_dir: str | Path) -> dict[str, Any]:
    """The checkpoint's state, its tensors verified against the stored checksum."""
    path = Path(out_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise ArtifactError(f"--resume: no checkpoint in {out_dir} (expected {CHECKPOINT_FILE})")
    state, _ = load_state(path)
    if not isinstance(state, dict) or not {"iteration", "syn", "distiller", "generator"} <= set(state):
        raise ArtifactError(f"{path} is not a valid ddkit checkpoint: it lacks the syn/distiller/generator state")
    return state


def restore(state: dict[str, Any], *, syn, distiller, generator: torch.Generator) -> int:
    """Apply a loaded checkpoint; returns the iteration it was taken after.

    A checkpoint whose tensors do not fit this run (another IPC, model or method state) raises ArtifactError
    instead of a size-mismatch traceback; the run record normally refuses such a resume earlier.
    """
    path = "the checkpoint"
    try:
        with torch.no_grad():
            syn.load_state_dict(state["syn"])
        distiller.load_state_dict(state["distiller"])
        generator.set_state(state["generator"])
        return int(state["iteration"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"{path} does not fit this run ({first}); resume with the settings it was made with") from None
