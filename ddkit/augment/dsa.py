"""Differentiable siamese augmentation (DSA): strategy parsing, parameter sampling, application.

Sampling is separated from application (after kornia) so that siamese augmentation needs no RNG tricks::

    p = aug.sample(1, generator)          # one set of values, leading dim 1
    aug.apply(x_real, p); aug.apply(x_syn, p)   # same op family, same values, any batch sizes

The official ``DiffAugment`` gets the same effect by reseeding the *global* torch RNG before every draw; here all
randomness comes from the caller's ``torch.Generator`` and the global RNG is never touched.

Semantics follow ``ParamDiffAug``/``DiffAugment`` of VICO-UoE/DatasetCondensation (anchors §2.14), with one
representational difference: crop and cutout positions are stored as uniform fractions in ``[0, 1)`` and turned
into whole pixels at ``apply`` time, because ``sample`` does not know the image size.  ``floor(u * k)`` with
``u ~ U[0, 1)`` is uniform on ``0..k-1``, the same distribution as the official ``torch.randint``.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping

import torch
from torch import Tensor

from ..errors import ConfigError, UnknownNameError
from . import ops

__all__ = ["DSA", "DSAParams", "DEFAULT_STRATEGY", "FAMILY_NAMES", "parse_strategy"]

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
"""The official DSA strategy string (DC/DSA/DM/MTT all use it)."""

_IDENTITY_STRATEGIES = frozenset({"", "none"})

Params = dict[str, Tensor]


@dataclass(frozen=True)
class DSAParams:
    """Magnitudes of the DSA ops; defaults are the official ``ParamDiffAug`` values (also DD-Ranking's)."""

    ratio_scale: float = 1.2  # per-axis scale factor ~ U(1/r, r)
    ratio_rotate: float = 15.0  # angle ~ U(-r, r) degrees
    ratio_crop_pad: float = 0.125  # shift ~ U{-s..s}, s = int(size * r + 0.5) pixels
    ratio_cutout: float = 0.5  # square side = int(size * r + 0.5) pixels
    prob_flip: float = 0.5
    brightness: float = 1.0  # offset ~ (U(0,1) - 0.5) * b
    saturation: float = 2.0  # factor ~ U(0,1) * s
    contrast: float = 0.5  # factor ~ U(0,1) + c

    def __post_init__(self) -> None:
        """Reject values that would silently produce nonsense (e.g. a probability above 1)."""
        checks = {
            "ratio_scale": self.ratio_scale >= 1.0,
            "ratio_rotate": self.ratio_rotate >= 0.0,
            "ratio_crop_pad": 0.0 <= self.ratio_crop_pad <= 1.0,
            "ratio_cutout": 0.0 <= self.ratio_cutout <= 1.0,
            "prob_flip": 0.0 <= self.prob_flip <= 1.0,
            "brightness": self.brightness >= 0.0,
            "saturation": self.saturation >= 0.0,
            "contrast": self.contrast >= 0.0,
        }
        expected = {
            "ratio_scale": ">= 1",
            "ratio_crop_pad": "in [0, 1]",
            "ratio_cutout": "in [0, 1]",
            "prob_flip": "in [0, 1]",
        }
        for name, ok in checks.items():
            value = getattr(self, name)
            if not ok or not math.isfinite(value):
                raise ConfigError(f"DSAParams.{name}={value!r}: expected a finite value {expected.get(name, '>= 0')}")


# --------------------------------------------------------------------------------------------------- sampling


def _rand(generator: torch.Generator, *shape: int) -> Tensor:
    """Uniform [0, 1) draws from ``generator`` only (on the generator's device; never the global RNG)."""
    return torch.rand(shape, generator=generator, device=generator.device)


def _sample_color(n: int, g: torch.Generator, hp: DSAParams) -> Params:
    """Three independent draws, in the official order brightness, saturation, contrast."""
    return {
        "brightness": (_rand(g, n) - 0.5) * hp.brightness,
        "saturation": _rand(g, n) * hp.saturation,
        "contrast": _rand(g, n) + hp.contrast,
    }


def _sample_crop(n: int, g: torch.Generator, hp: DSAParams) -> Params:
    """(dy, dx) as fractions; pixel shifts depend on the image size, known only at apply time."""
    return {"crop": _rand(g, n, 2)}


def _sample_cutout(n: int, g: torch.Generator, hp: DSAParams) -> Params:
    """(cy, cx) centre as fractions, turned into pixels at apply time."""
    return {"cutout": _rand(g, n, 2)}


def _sample_flip(n: int, g: torch.Generator, hp: DSAParams) -> Params:
    return {"flip": _rand(g, n) < hp.prob_flip}


def _sample_scale(n: int, g: torch.Generator, hp: DSAParams) -> Params:
    """(sx, sy) ~ U(1/r, r) each, drawn x first as in the official code."""
    low, high = 1.0 / hp.ratio_scale, hp.ratio_scale
    sx = _rand(g, n) * (high - low) + low
    sy = _rand(g, n) * (high - low) + low
    return {"scale": torch.stack([sx, sy], dim=1)}


def _sample_rotate(n: int, g: torch.Generator, hp: DSAParams) -> Params:
    """Angle in radians ~ U(-r, r) degrees."""
    return {"rotate": (_rand(g, n) - 0.5) * 2.0 * math.radians(hp.ratio_rotate)}


# ------------------------------------------------------------------------------------------------ application


def _pixel_index(fraction: Tensor, counts: tuple[int, int], device: torch.device) -> Tensor:
    """Map fractions ``[N, 2]`` in [0, 1) to integers uniform on ``0..count-1`` per column."""
    k = torch.tensor(counts, device=device, dtype=torch.float32)
    index = torch.floor(fraction.to(device=device, dtype=torch.float32) * k).long()
    return torch.minimum(index, (k - 1).long())  # float rounding can hit k for u just below 1


def _apply_color(x: Tensor, p: Mapping[str, Tensor], hp: DSAParams) -> Tensor:
    x = ops.brightness(x, p["brightness"])
    x = ops.saturation(x, p["saturation"])
    return ops.contrast(x, p["contrast"])


def _apply_crop(x: Tensor, p: Mapping[str, Tensor], hp: DSAParams) -> Tensor:
    """Official: shift ~ randint(-s, s) with s = int(size * ratio + 0.5), per axis."""
    h, w = x.shape[-2:]
    sh, sw = int(h * hp.ratio_crop_pad + 0.5), int(w * hp.ratio_crop_pad + 0.5)
    shift = _pixel_index(p["crop"], (2 * sh + 1, 2 * sw + 1), x.device)
    shift = shift - torch.tensor([sh, sw], device=x.device)
    return ops.translate(x, shift)


def _apply_cutout(x: Tensor, p: Mapping[str, Tensor], hp: DSAParams) -> Tensor:
    """Official: centre ~ randint(0, size + 1 - side % 2), side = int(size * ratio + 0.5)."""
    h, w = x.shape[-2:]
    side = (int(h * hp.ratio_cutout + 0.5), int(w * hp.ratio_cutout + 0.5))
    centre = _pixel_index(p["cutout"], (h + 1 - side[0] % 2, w + 1 - side[1] % 2), x.device)
    return ops.cutout(x, centre, side)


def _apply_flip(x: Tensor, p: Mapping[str, Tensor], hp: DSAParams) -> Tensor:
    return ops.flip(x, p["flip"])


def _apply_scale(x: Tensor, p: Mapping[str, Tensor], hp: DSAParams) -> Tensor:
    return ops.scale(x, p["scale"])


def _apply_rotate(x: Tensor, p: Mapping[str, Tensor], hp: DSAParams) -> Tensor:
    return ops.rotate(x, p["rotate"])


@dataclass(frozen=True)
class _Family:
    """One token of a strategy string: its parameter keys, how to draw them, how to apply them."""

    keys: tuple[str, ...]
    sample: Callable[[int, torch.Generator, DSAParams], Params]
    apply: Callable[[Tensor, Mapping[str, Tensor], DSAParams], Tensor]


_FAMILIES: Mapping[str, _Family] = MappingProxyType(
    {
        "color": _Family(("brightness", "saturation", "contrast"), _sample_color, _apply_color),
        "crop": _Family(("crop",), _sample_crop, _apply_crop),
        "cutout": _Family(("cutout",), _sample_cutout, _apply_cutout),
        "flip": _Family(("flip",), _sample_flip, _apply_flip),
        "scale": _Family(("scale",), _sample_scale, _apply_scale),
        "rotate": _Family(("rotate",), _sample_rotate, _apply_rotate),
    }
)

FAMILY_NAMES: tuple[str, ...] = tuple(_FAMILIES)
"""All op families; in mode 'S' the params' ``family`` entry indexes this tuple, so params are self-describing."""


def parse_strategy(strategy: str | None) -> tuple[str, ...]:
    """Split an official strategy string (``"color_crop_..."``) into validated family names.

    ``None``, ``""`` and ``"none"`` (any case) mean no augmentation and give ``()``.  Repeated families are
    rejected: the official mode 'M' would apply them twice with fresh values, which one params dict keyed by
    family cannot express, and no published configuration uses it.
    """
    if strategy is None:
        return ()
    text = strategy.strip().lower()
    if text in _IDENTITY_STRATEGIES:
        return ()
    tokens = tuple(text.split("_"))
    for token in tokens:
        if token not in _FAMILIES:
            close = difflib.get_close_matches(token, FAMILY_NAMES, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise UnknownNameError(
                f"unknown augmentation {token!r} in DSA strategy {strategy!r}{hint} "
                f"(available: {', '.join(FAMILY_NAMES)}; separate them with '_')"
            )
    repeated = sorted({t for t in tokens if tokens.count(t) > 1})
    if repeated:
        raise ConfigError(f"DSA strategy {strategy!r} repeats {', '.join(map(repr, repeated))}; list each op once")
    return tokens


def _check_mode(mode: str) -> str:
    upper = str(mode).upper()
    if upper not in ("S", "M"):
        raise ConfigError(f"DSA mode {mode!r}: expected 'S' (one op family per call) or 'M' (all in sequence)")
    return upper


# ----------------------------------------------------------------------------------------------------- the class


class DSA:
    """Differentiable siamese augmentation with the official DSA semantics and explicit generators.

    ``mode='S'`` (the official default ``aug_mode``) applies one op family per call, drawn uniformly from the
    strategy at ``sample`` time and stored in the params under ``"family"``, so a real and a synthetic batch
    augmented with the same params get the same family and values.  ``mode='M'`` applies every family in
    strategy order.
    """

    def __init__(
        self,
        strategy: str | None = DEFAULT_STRATEGY,
        params: DSAParams | None = None,
        mode: str = "S",
    ) -> None:
        self.strategy = "" if strategy is None else strategy
        self.families: tuple[str, ...] = parse_strategy(strategy)
        self.params = DSAParams() if params is None else params
        self.mode = _check_mode(mode)

    @classmethod
    def from_strategy(cls, strategy: str | None, params: DSAParams | None = None, mode: str = "S") -> "DSA":
        """Build from a config value; ``None``, ``""`` and ``"none"`` give the identity augmentation."""
        return cls(strategy, params=params, mode=mode)

    @property
    def is_identity(self) -> bool:
        """True when the strategy names no op, so callers can skip augmentation entirely."""
        return not self.families

    def sample(self, n: int, generator: torch.Generator, device: torch.device | str | None = None) -> Params:
        """Draw parameters for ``n`` images (``n=1``: one shared set, broadcast by :meth:`apply`).

        Values are drawn on the generator's device and moved to ``device``.  The ``"family"`` entry (mode 'S')
        stays a CPU scalar: it only selects code to run, and reading it from an accelerator would synchronise.
        """
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"DSA.sample needs a torch.Generator, got {type(generator).__name__}")
        if int(n) < 1:
            raise ValueError(f"DSA.sample: n must be >= 1, got {n}")
        n = int(n)
        if self.is_identity:
            return {}
        out: Params = {}
        chosen = self.families
        if self.mode == "S":
            pick = int(torch.randint(len(self.families), (1,), generator=generator, device=generator.device))
            chosen = (self.families[pick],)
            out["family"] = torch.tensor(FAMILY_NAMES.index(chosen[0]))
        for name in chosen:
            drawn = _FAMILIES[name].sample(n, generator, self.params)
            out.update({k: v if device is None else v.to(device) for k, v in drawn.items()})
        return out

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        """Augment ``x`` (``[N, C, H, W]``) with sampled ``params``; differentiable in ``x``.

        Params with leading dimension 1 are shared by the whole batch, whatever its size (the siamese case).
        """
        if self.is_identity:
            return x
        if x.dim() != 4:
            raise ValueError(f"DSA.apply expects images [N, C, H, W], got shape {tuple(x.shape)}")
        for name in self._families_to_apply(params):
            family = _FAMILIES[name]
            self._check_params(name, family.keys, params, x.shape[0])
            x = family.apply(x, params, self.params)
        return x

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Per-sample augmentation (what evaluation training uses): ``apply(x, sample(len(x)))``."""
        if self.is_identity:
            return x
        return self.apply(x, self.sample(x.shape[0], generator, device=x.device))

    def _families_to_apply(self, params: Mapping[str, Tensor]) -> tuple[str, ...]:
        """Mode 'S': the family recorded at sample time; mode 'M': the whole strategy."""
        if self.mode == "M":
            return self.families
        if "family" not in params:
            raise ConfigError("DSA mode 'S' params lack 'family'; obtain params from DSA.sample with mode 'S'")
        return (FAMILY_NAMES[int(params["family"])],)

    @staticmethod
    def _check_params(name: str, keys: tuple[str, ...], params: Mapping[str, Tensor], batch: int) -> None:
        """Fail with a clear message on missing params or a batch size that cannot broadcast."""
        for key in keys:
            if key not in params:
                raise ConfigError(f"DSA params lack {key!r} needed by {name!r}; sample them with the same DSA")
            size = params[key].shape[0]
            if size not in (1, batch):
                raise ValueError(f"DSA params {key!r} have leading dim {size}; expected 1 or the batch size {batch}")

    def __repr__(self) -> str:
        return f"DSA(strategy={self.strategy!r}, mode={self.mode!r}, params={self.params!r})"
