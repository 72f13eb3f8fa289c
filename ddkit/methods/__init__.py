"""Distillation methods.  Each module registers its Distiller in ``METHODS`` when imported here."""
from ..registry import METHODS
from .base import DistillConfig, Distiller
from . import coreset  # noqa: F401  (registers random, herding, kcenter)
from . import dm, cafe  # noqa: F401
from . import dc  # noqa: F401
from . import dd  # noqa: F401  (registers dd)
from . import frepo  # noqa: F401
from . import kip  # noqa: F401


def create_distiller(name: str, config=None, *, dataset: str | None = None, ipc: int | None = None, device="cpu") -> Distiller:
    """Build the named method with ``config`` or its per-dataset/IPC defaults."""
    cls = METHODS.get(name)
    if config is None:
        config = cls.default_config(dataset or "digits", ipc or 1)
    return cls(config, device=device)


def method_names() -> list[str]:
    return METHODS.names()


__all__ = ["DistillConfig", "Distiller", "create_distiller", "method_names", "METHODS"]
