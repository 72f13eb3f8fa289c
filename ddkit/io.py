"""Atomic file writing and pickle-free (safetensors + JSON) state storage.

Every artifact is written to a temporary file in the destination folder and renamed into place, so an
interrupted run never leaves a half-written result.  Nested state (optimizer states, generator states) is
flattened into a tensor dict plus a JSON skeleton: nothing is ever unpickled.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from .errors import ArtifactError


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def flatten_state(obj: Any, prefix: str = "s") -> tuple[Any, dict[str, Tensor]]:
    """Split a nested structure into a JSON-able skeleton and a flat ``{key: tensor}`` dict."""
    tensors: dict[str, Tensor] = {}

    def walk(o: Any, key: str) -> Any:
        if isinstance(o, Tensor):
            tensors[key] = o.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(o, dict):
            return {"__dict__": [[walk(k, f"{key}.k{i}"), walk(v, f"{key}.{i}")] for i, (k, v) in enumerate(o.items())]}
        if isinstance(o, (list, tuple)):
            items = [walk(v, f"{key}.{i}") for i, v in enumerate(o)]
            return {"__tuple__": items} if isinstance(o, tuple) else items
        if o is None or isinstance(o, (bool, int, float, str)):
            return o
        raise TypeError(f"cannot store {type(o).__name__} at {key}")

    return walk(obj, prefix), tensors


def unflatten_state(skeleton: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            key = skeleton["__tensor__"]
            if key not in tensors:
                raise ArtifactError(f"checkpoint is missing tensor {key!r}")
            return tensors[key]
        if "__dict__" in skeleton:
            return {unflatten_state(k, tensors): unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
        if "__tuple__" in skeleton:
            return tuple(unflatten_state(v, tensors) for v in skeleton["__tuple__"])
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    return skeleton


def save_state(path: str | Path, state: Any, metadata: dict[str, Any] | None = None) -> Path:
    """Store a nested state atomically as one safetensors file (skeleton + metadata in its header)."""
    from safetensors.torch import save_file

    skeleton, tensors = flatten_state(state)
    header = {"ddkit_state": json.dumps(skeleton), "ddkit_meta": json.dumps(metadata or {})}
    if not tensors:
        tensors = {"__empty__": torch.zeros(1)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def read_safetensors(path: str | Path, what: str) -> tuple[dict[str, str], dict[str, Tensor]]:
    """Header metadata and tensors of a safetensors file; anything unreadable raises ArtifactError."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for corrupt headers
        raise ArtifactError(f"{path} is not {what}: not a readable safetensors file ({exc})") from None
    return header, tensors


def load_state(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """Load a state written by :func:`save_state`; anything else raises ArtifactError."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"no checkpoint file at {path}")
    header, tensors = read_safetensors(path, "a ddkit checkpoint")
    if "ddkit_state" not in header:
        raise ArtifactError(f"{path} is a safetensors file but not a ddkit checkpoint")
    skeleton = json.loads(header["ddkit_state"])
    return unflatten_state(skeleton, tensors), json.loads(header.get("ddkit_meta", "{}"))
