"""A self-describing store of expert trajectories (what MTT, FTD and DDPP match).

The official MTT code saves ``replay_buffer_{n}.pt``: pickled lists of lists of tensors, ten experts per file,
positional (no parameter names), with the settings encoded in the folder name (``CIFAR10_NO_ZCA/ConvNet``); a
buffer trained with other settings is used silently.  Here a store is a folder:

- ``store.safetensors``: the settings that make two trajectories comparable, as JSON in the header (dataset and
  its shape, model and options, preprocessing, optimiser, augmentation, epochs, seed, parameter names and shapes),
  plus the preprocessing tensors (the fitted ZCA), written once when the store is created; ``store.json`` is the
  same JSON for people;
- ``expert_00000.safetensors``, ...: one shard per expert, tensors ``e{epoch}/{parameter name}`` for epochs
  ``0..E`` (0 = the initialisation, ``e`` = after ``e`` epochs), the expert's seed and per-epoch test accuracy in
  the header.

Every file is written atomically (``ddkit.io.atomic_write``), so a shard exists only when its expert finished: the
experts of a store are exactly its shard files, and an interrupted run resumes expert by expert.  Nothing is
unpickled; methods read one epoch of one expert at a time (``load``), never the whole store.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..data.preprocess import Preprocess
from ..errors import ArtifactError, ConfigError
from ..io import atomic_write, atomic_write_json, read_safetensors

FORMAT = "ddkit.experts/1"
STORE_FILE = "store.safetensors"
STORE_JSON = "store.json"
_SHARD = re.compile(r"^expert_(\d{5,})\.safetensors$")


def shard_name(index: int) -> str:
    return f"expert_{index:05d}.safetensors"


@dataclass
class StoreSpec:
    """Everything that makes the trajectories of two runs interchangeable (the store's identity)."""

    dataset: str
    image_shape: list[int]
    num_classes: int
    num_train: int
    model: str
    model_options: dict[str, Any]
    preprocess: dict[str, Any]
    optimizer: dict[str, Any]  # name, lr, momentum, weight_decay, batch_size (+ rho, alpha, adaptive for gsam)
    augmentation: str  # the DSA strategy ("none" when off)
    epochs: int
    seed: int
    param_shapes: dict[str, list[int]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, meta: dict[str, Any]) -> "StoreSpec":
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in meta.items() if k in names})

    def differences(self, other: "StoreSpec") -> list[str]:
        """Human-readable list of the fields that differ (``name: ours vs theirs``)."""
        a, b = asdict(self), asdict(other)
        return [f"{k}: {a[k]!r} vs {b[k]!r}" for k in a if a[k] != b[k]]


class ExpertStore:
    """A folder of expert trajectories; open one with :meth:`open`, create one with :meth:`create`."""

    def __init__(self, root: Path, spec: StoreSpec, preprocess_tensors: dict[str, Tensor]) -> None:
        self.root = Path(root)
        self.spec = spec
        self.preprocess_tensors = preprocess_tensors

    # ------------------------------------------------------------------ creation / opening
    @staticmethod
    def exists(root: str | Path) -> bool:
        return (Path(root) / STORE_FILE).is_file()

    @classmethod
    def create(cls, root: str | Path, spec: StoreSpec, preprocess: Preprocess) -> "ExpertStore":
        """Write the store's identity file (atomically); refuses to overwrite an existing store."""
        from safetensors.torch import save_file

        root = Path(root)
        if cls.exists(root):
            raise ArtifactError(f"{root} already holds an expert store; open it instead of creating one")
        tensors = {k: v.contiguous() for k, v in preprocess.tensors().items()} or {"__empty__": torch.zeros(1)}
        meta = spec.to_json()
        atomic_write(root / STORE_FILE, lambda tmp: save_file(tensors, tmp, metadata={"ddkit": json.dumps(meta)}))
        atomic_write_json(root / STORE_JSON, meta)
        return cls(root, spec, {k: v for k, v in tensors.items() if k != "__empty__"})

    @classmethod
    def open(cls, root: str | Path) -> "ExpertStore":
        """Open an existing store; anything that is not one raises :class:`ArtifactError` saying what is wrong."""
        root = Path(root)
        path = root / STORE_FILE
        if not root.is_dir():
            raise ArtifactError(f"no expert store at {root} (no such folder); create one with `ddkit experts --out {root}`")
        if not path.is_file():
            raise ArtifactError(f"{root} is not an expert store (no {STORE_FILE}); create one with `ddkit experts`")
        header, tensors = read_safetensors(path, "an expert store")
        try:
            meta = json.loads(header["ddkit"])
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
            spec = StoreSpec.from_json(meta)
        except (KeyError, ValueError, TypeError) as exc:
            raise ArtifactError(f"{path} is not a valid ddkit expert store ({exc})") from None
        return cls(root, spec, {k: v for k, v in tensors.items() if k != "__empty__"})

    # ------------------------------------------------------------------ contents
    def preprocess(self) -> Preprocess:
        return Preprocess.from_saved(self.spec.preprocess, self.preprocess_tensors)

    def experts(self) -> list[int]:
        """Indices of the finished experts (their shard files), sorted."""
        found = []
        for p in self.root.iterdir():
            m = _SHARD.match(p.name)
            if m:
                found.append(int(m.group(1)))
        return sorted(found)

    def __len__(self) -> int:
        return len(self.experts())

    @property
    def epochs(self) -> int:
        return int(self.spec.epochs)

    def _shard(self, expert: int) -> Path:
        path = self.root / shard_name(expert)
        if not path.is_file():
            raise ArtifactError(f"expert {expert} is not in the store {self.root} (finished experts: {self.experts()})")
        return path

    def info(self, expert: int) -> dict[str, Any]:
        """The expert's header: seed, per-epoch test accuracy, seconds."""
        from safetensors import safe_open

        path = self._shard(expert)
        try:
            with safe_open(str(path), framework="pt") as f:
                return json.loads((f.metadata() or {})["ddkit_expert"])
        except Exception as exc:
            raise ArtifactError(f"{path} is not a readable expert shard ({exc})") from None

    def load(self, expert: int, epoch: int, device: str | torch.device = "cpu") -> dict[str, Tensor]:
        """The parameters of ``expert`` after ``epoch`` epochs (0 = initialisation), by name."""
        from safetensors import safe_open

        if not 0 <= epoch <= self.epochs:
            raise ConfigError(f"epoch {epoch} is outside the store's trajectories (0..{self.epochs})")
        path = self._shard(expert)
        prefix = f"e{epoch}/"
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        except Exception as exc:
            raise ArtifactError(f"{path} is not a readable expert shard ({exc})") from None

    def write_expert(self, expert: int, trajectory: list[dict[str, Tensor]], info: dict[str, Any]) -> Path:
        """Store one finished trajectory (``epochs + 1`` parameter dicts) atomically."""
        from safetensors.torch import save_file

        if len(trajectory) != self.epochs + 1:
            raise ValueError(f"expected {self.epochs + 1} snapshots (epochs 0..{self.epochs}), got {len(trajectory)}")
        tensors = {f"e{e}/{k}": v.detach().cpu().contiguous() for e, snap in enumerate(trajectory) for k, v in snap.items()}
        header = {"ddkit_expert": json.dumps({"expert": expert, **info})}
        return atomic_write(self.root / shard_name(expert), lambda tmp: save_file(tensors, tmp, metadata=header))

    # ------------------------------------------------------------------ compatibility
    def check_compatible(self, *, dataset: str, image_shape, num_classes: int, preprocess: Preprocess,
                         model: str, model_options: dict[str, Any] | None = None,
                         param_shapes: dict[str, list[int]] | None = None, epochs_needed: int = 0,
                         min_experts: int = 1) -> None:
        """Refuse a store whose trajectories cannot be matched by this run; the message names what differs.

        ``epochs_needed`` is the last epoch the run reads (``max_start_epoch - 1 + expert_epochs``).
        """
        diffs = []
        if self.spec.dataset != dataset:
            diffs.append(f"dataset {self.spec.dataset!r} (this run: {dataset!r})")
        if list(self.spec.image_shape) != list(image_shape):
            diffs.append(f"image shape {list(self.spec.image_shape)} (this run: {list(image_shape)})")
        if int(self.spec.num_classes) != int(num_classes):
            diffs.append(f"{self.spec.num_classes} classes (this run: {num_classes})")
        if self.spec.model != model or dict(self.spec.model_options) != dict(model_options or {}):
            diffs.append(f"model {_model_text(self.spec.model, self.spec.model_options)} "
                         f"(this run: {_model_text(model, model_options)})")
        why = preprocess_difference(self.preprocess(), preprocess)
        if why:
            diffs.append(f"preprocessing: {why}")
        if param_shapes is not None and dict(self.spec.param_shapes) != {k: list(v) for k, v in param_shapes.items()}:
            diffs.append("parameter names/shapes of the network")
        if diffs:
            raise ConfigError(f"expert store {self.root} does not match this run: it was trained with "
                              + "; ".join(diffs))
        if epochs_needed > self.epochs:
            raise ConfigError(f"expert store {self.root} is too short: its trajectories have {self.epochs} epochs, "
                              f"this run reads up to epoch {epochs_needed} (max_start_epoch - 1 + expert_epochs); "
                              f"lower method.max_start_epoch / method.expert_epochs or train longer experts")
        n = len(self)
        if n < min_experts:
            raise ArtifactError(f"expert store {self.root} has {n} finished experts; at least {min_experts} needed "
                                f"(run `ddkit experts --out {self.root} ...` to train them)")


def preprocess_difference(a: Preprocess, b: Preprocess) -> str:
    """Why two preprocessings differ ("" when they are the same transform)."""
    if a.uses_zca != b.uses_zca:
        return f"{'ZCA' if a.uses_zca else 'mean/std normalisation'} (this run: " \
               f"{'ZCA' if b.uses_zca else 'mean/std normalisation'}; set data.zca accordingly)"
    if not a.uses_zca:
        if not (_close(a.mean, b.mean) and _close(a.std, b.std)):
            return f"mean/std {list(a.mean)}/{list(a.std)} (this run: {list(b.mean)}/{list(b.std)})"
        return ""
    if abs(a.zca_eps - b.zca_eps) > 1e-12:
        return f"ZCA eps {a.zca_eps} (this run: {b.zca_eps})"
    if a.zca_matrix.shape != b.zca_matrix.shape or not torch.allclose(a.zca_matrix.float().cpu(),
                                                                       b.zca_matrix.float().cpu(), atol=1e-4, rtol=1e-3):
        return "a different fitted ZCA whitening (another training split?)"
    return ""


def _model_text(name: str, options: dict[str, Any] | None) -> str:
    return repr(name) + (f" with {dict(options)}" if options else "")


def _close(x, y, tol: float = 1e-6) -> bool:
    return len(x) == len(y) and all(abs(float(u) - float(v)) <= tol * max(1.0, abs(float(u))) for u, v in zip(x, y))
