"""Per-dataset normalisation and optional regularised ZCA whitening.

The transform that maps raw pixels in [0, 1] to the model's input space is stored with every synthetic set, so
that evaluation applies it identically to the real test images and display can undo it (MTT issue #11: ZCA sets
evaluate at chance when the test set is not whitened the same way).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

# MTT/FTD/DATM use kornia.enhance.ZCAWhitening(eps=0.1) fitted on the training split after ToTensor() only
# (anchors.md §2.15); FRePo uses zca_reg=0.1 as well.
DEFAULT_ZCA_EPS = 0.1


@dataclass
class Preprocess:
    """Raw [0,1] pixels <-> model space.  Either mean/std normalisation or ZCA whitening (as in MTT)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    zca_matrix: Tensor | None = None  # [D, D]
    zca_mean: Tensor | None = None  # [1, D]
    zca_inverse: Tensor | None = None  # [D, D]
    zca_eps: float = DEFAULT_ZCA_EPS

    @property
    def uses_zca(self) -> bool:
        return self.zca_matrix is not None

    @classmethod
    def fit_zca(cls, raw_train: Tensor, eps: float = DEFAULT_ZCA_EPS, mean=None, std=None) -> "Preprocess":
        """Fit regularised ZCA on raw [0,1] training images (kornia's estimator, eps added to eigenvalues)."""
        from kornia.enhance import zca_mean

        flat = raw_train.reshape(raw_train.shape[0], -1).double()
        transform, mu, inverse = zca_mean(flat, dim=0, eps=eps, return_inverse=True)
        c = raw_train.shape[1]
        return cls(
            mean=tuple(mean or [0.0] * c),
            std=tuple(std or [1.0] * c),
            zca_matrix=transform.float(),
            zca_mean=mu.reshape(1, -1).float(),
            zca_inverse=inverse.float(),
            zca_eps=eps,
        )

    def _channel_stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).reshape(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).reshape(shape)
        return mean, std

    def encode(self, raw: Tensor, chunk: int = 8192) -> Tensor:
        """Map raw [0,1] images ``[N,C,H,W]`` to model space."""
        if self.uses_zca:
            out = torch.empty_like(raw, dtype=torch.float32)
            m = self.zca_matrix.to(raw.device)
            mu = self.zca_mean.to(raw.device)
            for i in range(0, raw.shape[0], chunk):
                block = raw[i : i + chunk].reshape(raw[i : i + chunk].shape[0], -1).float()
                out[i : i + chunk] = ((block - mu) @ m).reshape(block.shape[0], *raw.shape[1:])
            return out
        mean, std = self._channel_stats(raw.float())
        return (raw.float() - mean) / std

    def decode(self, x: Tensor) -> Tensor:
        """Map model-space images back to displayable [0,1] pixels (clamped)."""
        x = x.detach().float()
        if self.uses_zca:
            flat = x.reshape(x.shape[0], -1) @ self.zca_inverse.to(x.device) + self.zca_mean.to(x.device)
            raw = flat.reshape(x.shape)
        else:
            mean, std = self._channel_stats(x)
            raw = x * std + mean
        return raw.clamp(0.0, 1.0)

    # --- serialisation (safetensors tensors + JSON scalars; never pickle) ---
    def to_json(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "zca": self.uses_zca, "zca_eps": self.zca_eps}

    def tensors(self) -> dict[str, Tensor]:
        if not self.uses_zca:
            return {}
        return {
            "preprocess.zca_matrix": self.zca_matrix.contiguous(),
            "preprocess.zca_mean": self.zca_mean.contiguous(),
            "preprocess.zca_inverse": self.zca_inverse.contiguous(),
        }

    @classmethod
    def from_saved(cls, meta: dict[str, Any], tensors: dict[str, Tensor]) -> "Preprocess":
        zca = bool(meta.get("zca", False))
        return cls(
            mean=tuple(meta["mean"]),
            std=tuple(meta["std"]),
            zca_matrix=tensors.get("preprocess.zca_matrix") if zca else None,
            zca_mean=tensors.get("preprocess.zca_mean") if zca else None,
            zca_inverse=tensors.get("preprocess.zca_inverse") if zca else None,
            zca_eps=float(meta.get("zca_eps", DEFAULT_ZCA_EPS)),
        )
