"""Does a synthetic set belong to the real data it is about to be evaluated on?

A set trained on 2 classes and tested on a 10-class folder reads as a plausible 10 % accuracy; a 10-class set on a
2-class folder ends in an index error deep inside training.  Both are refused here, before any training, with a
message naming what differs: the dataset, the class count, the class names, the image shape or the encoding.
"""
from __future__ import annotations

from typing import Any

from ..errors import DataError


def _preprocess_differs(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    if bool(a.get("zca")) != bool(b.get("zca")):
        return f"ZCA whitening {'on' if a.get('zca') else 'off'} for the set, {'on' if b.get('zca') else 'off'} for the data"
    for key in ("mean", "std"):
        x, y = list(a.get(key) or []), list(b.get(key) or [])
        if len(x) != len(y) or any(abs(float(p) - float(q)) > 1e-6 * max(1.0, abs(float(p))) for p, q in zip(x, y)):
            return f"normalisation {key} {x} for the set, {y} for the data"
    return None


def check_set_matches(syn: Any, real: Any, where: str | None = None, *, encoding: bool = True) -> None:
    """Raise :class:`DataError` unless ``syn`` was made from data like ``real`` (same classes, shape, encoding).

    ``where`` (e.g. the data root) is named in the message so the user sees which data did not fit;
    ``encoding=False`` skips the normalisation/ZCA comparison (for data about to be re-encoded as the set).
    """
    source = f"{real.name!r}" + (f" from {where}" if where else "")
    problems = []
    if syn.dataset != real.name:
        problems.append(f"the set was distilled from {syn.dataset!r}")
    if syn.num_classes != real.num_classes:
        problems.append(f"the set has {syn.num_classes} classes, the data {real.num_classes}")
    elif list(syn.class_names) != list(real.class_names):
        diff = [f"{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(syn.class_names, real.class_names)) if a != b]
        problems.append("the class names differ (" + ", ".join(diff[:3]) + (", ..." if len(diff) > 3 else "") + ")")
    if tuple(syn.images.shape[1:]) != tuple(real.image_shape):
        problems.append(f"the set's images are {tuple(syn.images.shape[1:])}, the data's {tuple(real.image_shape)}")
    if not problems and encoding:
        differs = _preprocess_differs(syn.preprocess.to_json(), real.preprocess.to_json())
        if differs:
            problems.append(f"they are encoded differently ({differs}; ddkit.load_real_for or ddkit.api.reencode "
                            f"gives the data the set's encoding)")
    if problems:
        raise DataError(f"the synthetic set does not match the data {source}: " + "; ".join(problems))
