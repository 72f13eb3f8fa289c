"""Atomic file writing and pickle-free (safetensors + JSON) state storage.

Every artifact is written to a temporary file in the destination folder and renamed into place, so an
interrupted run never leaves a half-written result.  The temporary file is created with mode 0666 and the
process umask applies, as for any file a program creates (``mkstemp`` would force 0600 on every artifact).
Nested state (optimizer states, generator states) is flattened into a tensor dict plus a JSON skeleton:
nothing is ever unpickled.  Every state file carries a SHA-256 of its tensors, checked when it is read, so
flipped bytes in a checkpoint are reported instead of silently resumed from.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from .errors import ArtifactError

#: header key of the tensors' checksum in every safetensors file ddkit writes
CHECKSUM_KEY = "ddkit_sha256"


def _os_reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path`` (mode from the umask).

    A failure of the file system (no such folder, not writable, a folder in the way, disk full) raises
    :class:`ArtifactError` naming ``path``; nothing is left behind.
    """
    path = Path(path)
    if path.is_dir():
        raise ArtifactError(f"cannot write {path}: it is a folder (expected a file path)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArtifactError(f"cannot create the folder {path.parent} for {path.name}: {_os_reason(exc)}") from None
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # writers that replace the file (safetensors) would otherwise leave 0600
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise ArtifactError(f"cannot write {path}: {_os_reason(exc)}") from None
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return path


def _umask() -> int:
    """The process umask, read without changing it where Linux reports it (os.umask can only set and return)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(name: str) -> None:
    """Flush the written bytes to the disk before the rename makes them the artifact."""
    fd = os.open(name, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(name: str) -> None:
    try:
        os.unlink(name)
    except OSError:
        pass


def atomic_write_text(path: str | Path, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def append_line(path: str | Path, line: str) -> None:
    """Append one line to a log and flush it to the disk (one ``write`` with O_APPEND: lines never interleave).

    Used for results that must survive an interruption one by one (evaluation runs)."""
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise ArtifactError(f"cannot append to {path}: {_os_reason(exc)}") from None


def tensor_digest(tensors: dict[str, Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order (independent of file layout)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
    """Store a nested state atomically as one safetensors file (skeleton, metadata, checksum in its header)."""
    from safetensors.torch import save_file

    skeleton, tensors = flatten_state(state)
    if not tensors:
        tensors = {"__empty__": torch.zeros(1)}
    header = {"ddkit_state": json.dumps(skeleton), "ddkit_meta": json.dumps(metadata or {}),
              CHECKSUM_KEY: tensor_digest(tensors)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def read_header(path: str | Path, what: str) -> dict[str, str]:
    """The header metadata of a safetensors file without reading its tensors (cheap checks before a resume)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as exc:  # safetensors raises several types for corrupt headers
        raise ArtifactError(f"{path} is not {what}: not a readable safetensors file ({exc})") from None


def read_safetensors(path: str | Path, what: str) -> tuple[dict[str, str], dict[str, Tensor]]:
    """Header metadata and tensors of a safetensors file; anything unreadable raises ArtifactError.

    When the header carries a checksum (every file ddkit writes does), the tensors are verified against it.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for corrupt headers
        raise ArtifactError(f"{path} is not {what}: not a readable safetensors file ({exc})") from None
    expected = header.get(CHECKSUM_KEY)
    if expected is not None and tensor_digest(tensors) != expected:
        raise ArtifactError(f"{path} is corrupt: its tensors do not match the checksum stored when it was written "
                            f"(the file was changed or damaged after ddkit wrote it)")
    return header, tensors


def parse_header_json(header: dict[str, str], key: str, path: str | Path, what: str) -> Any:
    """``json.loads`` of one header entry; a damaged entry raises ArtifactError naming the file."""
    try:
        return json.loads(header[key])
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{path} is not a valid {what}: its {key!r} header entry is not valid JSON "
                            f"({type(exc).__name__})") from None


def load_state(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """Load a state written by :func:`save_state`; anything else raises ArtifactError."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"no checkpoint file at {path}")
    header, tensors = read_safetensors(path, "a ddkit checkpoint")
    if "ddkit_state" not in header:
        raise ArtifactError(f"{path} is a safetensors file but not a ddkit checkpoint")
    skeleton = parse_header_json(header, "ddkit_state", path, "ddkit checkpoint")
    meta = parse_header_json(header, "ddkit_meta", path, "ddkit checkpoint") if "ddkit_meta" in header else {}
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path} is not a valid ddkit checkpoint: its metadata is not a JSON object")
    try:
        state = unflatten_state(skeleton, tensors)
    except (TypeError, ValueError) as exc:  # valid JSON of the wrong shape
        raise ArtifactError(f"{path} is not a valid ddkit checkpoint: its state skeleton is malformed ({exc})") from None
    return state, meta


def check_writable(path: str | Path, option: str) -> Path:
    """Fail early, with the option's name, when ``path`` cannot become a file (before hours of work, not after)."""
    p = Path(path)
    if p.is_dir():
        raise ArtifactError(f"{option} {p} is a folder; give a file path")
    parent = p.parent
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise ArtifactError(f"{option} {p}: {parent} {what}")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ArtifactError(f"{option} {p}: not writable (permission denied)")
    return p
