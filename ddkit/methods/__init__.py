"""Distillation methods.  Each module registers its Distiller in ``METHODS`` when imported here."""
from ..accel import SpeedLayer
from ..registry import METHODS
from .base import DistillConfig, Distiller
from . import coreset  # noqa: F401  (registers random, herding, kcenter)
from . import dm, cafe  # noqa: F401
from . import dc  # noqa: F401
from . import mtt, ftd, ddpp  # noqa: F401  (trajectory matching)
from . import dd  # noqa: F401  (registers dd)
from . import frepo  # noqa: F401
from . import kip  # noqa: F401


def create_distiller(name: str, config=None, *, dataset: str | None = None, ipc: int | None = None, device="cpu",
                     speed: str = "auto") -> Distiller:
    """Build the named method with ``config`` or its per-dataset/IPC defaults, on ``device`` with the speed layer's
    setting ``speed`` ("auto" | "plain"; methods use it from ``setup`` on)."""
    cls = METHODS.get(name)
    if config is None:
        config = cls.default_config(dataset or "digits", ipc or 1)
    distiller = cls(config, device=device)
    distiller.speed = SpeedLayer(speed, distiller.device)
    return distiller


def method_names() -> list[str]:
    return METHODS.names()


__all__ = ["DistillConfig", "Distiller", "create_distiller", "method_names", "METHODS"]
