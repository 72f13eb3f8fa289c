"""SyntheticSet: the distilled images, their labels, learnable extras and everything needed to decode them.

A synthetic set is self-describing: the safetensors header carries the JSON metadata (method, dataset, ipc,
preprocessing, resolved config, seed, iterations, version, metrics), so ``ddkit evaluate synset.safetensors``
needs nothing else.  Loading never unpickles anything.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .data.preprocess import Preprocess
from .data.realdata import RealData
from .errors import ArtifactError, ConfigError, DivergenceError
from .io import CHECKSUM_KEY, atomic_write, atomic_write_json, atomic_write_text, read_safetensors, tensor_digest

FORMAT = "ddkit.synset/1"
SYNSET_FILE = "synset.safetensors"
META_FILE = "synset.json"


def package_version() -> str:
    from . import __version__

    return __version__


class SyntheticSet(nn.Module):
    """Learnable images ``[N,C,H,W]`` in model space with hard ``[N]`` or soft ``[N,K]`` labels.

    ``extras`` holds further learnable tensors, e.g. MTT's learned step size under the key ``"lr"``.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        num_classes: int,
        preprocess: Preprocess,
        dataset: str,
        class_names: list[str] | None = None,
        learn_labels: bool = False,
        extras: dict[str, Tensor] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.images = nn.Parameter(images.detach().clone().float())
        labels = labels.detach().clone()
        if labels.is_floating_point() or learn_labels:
            self.labels = nn.Parameter(labels.float(), requires_grad=learn_labels)
        else:
            self.register_buffer("labels", labels.long())
        self.extras = nn.ParameterDict({k: nn.Parameter(v.detach().clone().float()) for k, v in (extras or {}).items()})
        self.num_classes = int(num_classes)
        self.preprocess = preprocess
        self.dataset = dataset
        self.class_names = list(class_names or [str(c) for c in range(num_classes)])
        self.meta: dict[str, Any] = dict(meta or {})

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_real(
        cls,
        real: RealData,
        ipc: int,
        generator: torch.Generator,
        init: str = "real",
        soft_labels: bool = False,
        learn_labels: bool = False,
    ) -> "SyntheticSet":
        """``ipc`` images per class initialised from random real images (``init='real'``) or N(0,1) noise."""
        real.check_ipc(ipc)
        if init not in ("real", "noise"):
            raise ConfigError(f"init must be 'real' or 'noise', got {init!r}")
        images = []
        for c in range(real.num_classes):
            if init == "real":
                images.append(real.sample_class(c, ipc, generator).cpu())
            else:
                images.append(torch.randn((ipc, *real.image_shape), generator=generator))
        hard = torch.arange(real.num_classes).repeat_interleave(ipc)
        labels: Tensor = hard
        if soft_labels:
            labels = torch.nn.functional.one_hot(hard, real.num_classes).float()
        return cls(
            torch.cat(images),
            labels,
            real.num_classes,
            real.preprocess,
            real.name,
            real.class_names,
            learn_labels=learn_labels,
            meta={"ipc": ipc, "init": init},
        )

    # ------------------------------------------------------------------ views
    @property
    def ipc(self) -> int:
        return int(self.meta.get("ipc", len(self) // max(self.num_classes, 1)))

    @property
    def is_soft(self) -> bool:
        return self.labels.is_floating_point()

    @property
    def learned_lr(self) -> float | None:
        if "lr" in self.extras:
            return float(self.extras["lr"].detach().reshape(-1)[0])
        return None

    def hard_labels(self) -> Tensor:
        return self.labels.detach().argmax(1) if self.is_soft else self.labels.detach()

    def class_slice(self, c: int) -> Tensor:
        """Indices of the images whose (hard) label is ``c``."""
        return torch.nonzero(self.hard_labels() == c).flatten()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def nonfinite(self) -> list[str]:
        """Names of the learnable tensors holding NaN or Inf (``images``, ``labels``, ``extras.lr``); empty if none."""
        named = [("images", self.images), ("labels", self.labels)] + [(f"extras.{k}", v) for k, v in self.extras.items()]
        return [name for name, t in named if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all())]

    def decoded(self) -> Tensor:
        """Images as displayable [0,1] pixels."""
        return self.preprocess.decode(self.images.detach().cpu())

    # ------------------------------------------------------------------ persistence
    def metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": package_version(),
            "dataset": self.dataset,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "image_shape": list(self.images.shape[1:]),
            "soft_labels": self.is_soft,
            "learn_labels": bool(isinstance(self.labels, nn.Parameter) and self.labels.requires_grad),
            "extras": sorted(self.extras.keys()),
            "preprocess": self.preprocess.to_json(),
            **{k: v for k, v in self.meta.items()},
        }

    def tensors(self) -> dict[str, Tensor]:
        out = {"images": self.images.detach().cpu().contiguous(), "labels": self.labels.detach().cpu().contiguous()}
        for k, v in self.extras.items():
            out[f"extras.{k}"] = v.detach().cpu().contiguous()
        out.update(self.preprocess.tensors())
        return out

    def save(self, out_dir: str | Path) -> Path:
        """Write ``out_dir/synset.safetensors`` (metadata in its header) and ``out_dir/synset.json``, atomically."""
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        bad = self.nonfinite()
        if bad:
            raise DivergenceError(f"refusing to save a synthetic set whose {', '.join(bad)} hold NaN/Inf values "
                                  f"(to {out_dir}); nothing was written")
        meta = self.metadata()
        tensors = self.tensors()
        header = {"ddkit": json.dumps(meta), CHECKSUM_KEY: tensor_digest(tensors)}
        path = atomic_write(out_dir / SYNSET_FILE, lambda tmp: save_file(tensors, tmp, metadata=header))
        atomic_write_json(out_dir / META_FILE, meta)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "SyntheticSet":
        """Load from a run folder or a ``.safetensors`` file; anything that is not a ddkit set raises ArtifactError."""
        path = Path(path)
        if path.is_dir():
            path = path / SYNSET_FILE
        if not path.is_file():
            raise ArtifactError(f"no synthetic set at {path} (expected a run folder or a {SYNSET_FILE} file)")
        header, tensors = read_safetensors(path, "a ddkit synthetic set")
        if "ddkit" not in header:
            raise ArtifactError(f"{path} is a safetensors file but not a ddkit synthetic set (no 'ddkit' metadata)")
        try:
            meta = json.loads(header["ddkit"])
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}")
            preprocess = Preprocess.from_saved(meta["preprocess"], tensors)
            extras = {k[len("extras."):]: v for k, v in tensors.items() if k.startswith("extras.")}
            known = {"format", "version", "dataset", "num_classes", "class_names", "image_shape", "soft_labels",
                     "learn_labels", "extras", "preprocess"}
            syn = cls(
                tensors["images"],
                tensors["labels"],
                meta["num_classes"],
                preprocess,
                meta["dataset"],
                meta.get("class_names"),
                learn_labels=bool(meta.get("learn_labels", False)),
                extras=extras,
                meta={k: v for k, v in meta.items() if k not in known},
            )
        except (KeyError, ValueError, TypeError, AttributeError, RuntimeError) as exc:
            raise ArtifactError(f"{path} is not a valid ddkit synthetic set ({exc})") from None
        if syn.nonfinite():
            raise ArtifactError(f"{path} holds NaN/Inf values in {', '.join(syn.nonfinite())}; it is not a usable set")
        hard = syn.hard_labels()
        if (syn.images.dim() != 4 or len(syn.labels) != len(syn) or len(syn.class_names) != syn.num_classes
                or (len(hard) and (int(hard.min()) < 0 or int(hard.max()) >= syn.num_classes))):
            raise ArtifactError(f"{path} is not a valid ddkit synthetic set: its images {list(syn.images.shape)}, "
                                f"labels and {syn.num_classes} classes do not agree")
        return syn.to(device)

    # ------------------------------------------------------------------ export
    def export(self, out_dir: str | Path) -> Path:
        """One PNG per image plus ``labels.csv`` (file, label index, class name[, soft label vector])."""
        from PIL import Image

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        pixels = self.decoded()
        hard = self.hard_labels().cpu()
        rows = []
        for i in range(len(self)):
            name = f"{i:05d}_c{int(hard[i])}.png"
            img = to_pil(pixels[i])
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            data = buf.getvalue()
            atomic_write(out_dir / name, lambda tmp, d=data: Path(tmp).write_bytes(d))
            row = [name, int(hard[i]), self.class_names[int(hard[i])]]
            if self.is_soft:
                row.append(" ".join(f"{v:.6g}" for v in self.labels[i].detach().cpu().tolist()))
            rows.append(row)
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(["file", "label", "class_name"] + (["soft_label"] if self.is_soft else []))
        writer.writerows(rows)
        atomic_write_text(out_dir / "labels.csv", text.getvalue())
        _ = Image  # Pillow is required for export
        return out_dir


def to_pil(pixels: Tensor):
    """A [C,H,W] tensor in [0,1] as a PIL image (grey or RGB)."""
    from PIL import Image

    arr = (pixels.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    if arr.shape[2] == 1:
        return Image.fromarray(arr[:, :, 0], mode="L")
    return Image.fromarray(arr[:, :, :3], mode="RGB")


def image_grid(pixels: Tensor, nrow: int, pad: int = 1, upscale: int | None = None) -> Tensor:
    """Tile [N,C,H,W] pixels into one [C,H',W'] image, ``nrow`` images per row (a class per row)."""
    n, c, h, w = pixels.shape
    if upscale is None:
        upscale = max(1, 32 // max(h, w))
    if upscale > 1:
        pixels = pixels.repeat_interleave(upscale, 2).repeat_interleave(upscale, 3)
        h, w = h * upscale, w * upscale
    ncol = nrow
    rows = (n + ncol - 1) // ncol
    grid = torch.ones(c, rows * (h + pad) + pad, ncol * (w + pad) + pad)
    for i in range(n):
        r, k = divmod(i, ncol)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) : pad + k * (w + pad) + w] = pixels[i]
    return grid


def save_grid(syn: SyntheticSet, path: str | Path, max_per_class: int = 10) -> Path:
    """Write a PNG grid with one row per class (at most ``max_per_class`` images each)."""
    hard = syn.hard_labels().cpu()
    pixels = syn.decoded()
    chosen = []
    for c in range(syn.num_classes):
        ix = torch.nonzero(hard == c).flatten()[:max_per_class]
        chosen.append(ix)
    per_row = max(1, max(len(ix) for ix in chosen))
    tiles = []
    for ix in chosen:
        row = pixels[ix]
        if len(ix) < per_row:
            row = torch.cat([row, torch.ones(per_row - len(ix), *pixels.shape[1:])])
        tiles.append(row)
    grid = image_grid(torch.cat(tiles), per_row)
    img = to_pil(grid)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    data = buf.getvalue()
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
