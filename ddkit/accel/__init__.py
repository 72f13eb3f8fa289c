"""Speed levers for a device (patch-statistics stages, compilation, chunk policies, the allocator) behind one
setting, ``speed: auto|plain``.  Methods ask :class:`SpeedLayer` for networks and forwards; models and method files
stay plain PyTorch.  See :mod:`ddkit.accel.layer`."""
from .allocator import keep_freed_memory
from .layer import SPEED_MODES, Embedder, SpeedLayer, check_speed

__all__ = ["SPEED_MODES", "SpeedLayer", "Embedder", "check_speed", "keep_freed_memory"]
