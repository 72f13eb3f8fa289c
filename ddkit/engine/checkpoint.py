"""Checkpoints for exact resume: synthetic tensors, method state, random stream state, iteration."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import ArtifactError
from ..io import load_state, save_state

CHECKPOINT_FILE = "checkpoint.safetensors"


def save_checkpoint(out_dir: str | Path, *, iteration: int, syn, distiller, generator: torch.Generator,
                    extra: dict[str, Any] | None = None) -> Path:
    """Atomically write everything needed to continue exactly after ``iteration``."""
    state = {
        "iteration": iteration,
        "syn": {k: v for k, v in syn.state_dict().items()},
        "distiller": distiller.state_dict(),
        "generator": generator.get_state(),
        "extra": extra or {},
    }
    meta = {"method": distiller.name, "iteration": iteration, "dataset": syn.dataset}
    return save_state(Path(out_dir) / CHECKPOINT_FILE, state, meta)


def load_checkpoint(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise ArtifactError(f"--resume: no checkpoint in {out_dir} (expected {CHECKPOINT_FILE})")
    state, _ = load_state(path)
    return state


def restore(state: dict[str, Any], *, syn, distiller, generator: torch.Generator) -> int:
    """Apply a loaded checkpoint; returns the iteration it was taken after."""
    with torch.no_grad():
        syn.load_state_dict(state["syn"])
    distiller.load_state_dict(state["distiller"])
    generator.set_state(state["generator"])
    return int(state["iteration"])
