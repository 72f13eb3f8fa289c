"""The model zoo: the architectures of the dataset-distillation literature behind one factory.

    net = create_model("convnet", channels=1, num_classes=10, image_size=(28, 28))

Every model is a :class:`FeatureNet`: ``forward(x)`` gives logits, ``features(x)`` the pre-logit embedding,
``feature_maps(x)`` every stage's output (the embedding last), ``classifier`` the final ``nn.Linear`` and
``uses_batchnorm`` says whether outputs depend on the rest of the batch.  Models hold no state besides their
parameters and buffers, so they work under ``torch.func.functional_call``.

Importing this package registers the models in :data:`ddkit.registry.MODELS`.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..registry import MODELS
from . import alexnet, convnet, lenet, mlp, resnet, vgg  # noqa: F401  (each module registers its models)
from .base import FeatureNet

__all__ = ["FeatureNet", "create_model", "describe_model", "model_names"]


def create_model(
    name: str, *, channels: int, num_classes: int, image_size: Sequence[int] | int, **overrides: Any
) -> nn.Module:
    """Build a freshly initialised model (default PyTorch init; seed the generator yourself beforehand).

    ``overrides`` are constructor options (e.g. ``width=64``, ``norm="batchnorm"`` for ``convnet``); an
    unknown option raises :class:`ConfigError` listing the accepted ones, and an unknown ``name`` raises
    :class:`~ddkit.errors.UnknownNameError` suggesting close names.
    """
    factory = MODELS.get(name)
    _check_overrides(name, factory, overrides)
    return factory(channels=channels, num_classes=num_classes, image_size=image_size, **overrides)


def model_names() -> list[str]:
    """All registered model names, sorted."""
    return MODELS.names()


def describe_model(name: str) -> str:
    """One line for ``ddkit list models``: the architecture's summary plus the options a variant fixes."""
    factory = MODELS.get(name)
    options: dict[str, Any] = {}
    while isinstance(factory, functools.partial):
        options = {**factory.keywords, **options}
        factory = factory.func
    doc = inspect.getdoc(factory) or getattr(factory, "__name__", str(factory))
    line = doc.strip().splitlines()[0]
    if options:
        line += " [" + ", ".join(f"{k}={v!r}" for k, v in options.items()) + "]"
    return line


def _check_overrides(name: str, factory: Any, overrides: dict[str, Any]) -> None:
    """Reject misspelt options with a useful message instead of a bare ``TypeError`` from ``__init__``."""
    if not overrides:
        return
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a factory without an introspectable signature: let it decide
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    fixed = {"channels", "num_classes", "image_size"}
    accepted = [p for p in params if p not in fixed]
    unknown = [k for k in overrides if k not in accepted]
    if unknown:
        raise ConfigError(
            f"model {name!r} has no option {', '.join(map(repr, unknown))}; "
            f"accepted: {', '.join(accepted) or '(none)'}"
        )
