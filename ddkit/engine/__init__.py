"""The one distillation loop, its callbacks, checkpoints and random streams."""
from .callbacks import Callback, GridSaver, MetricsLogger, PeriodicEval, ProgressBar, RunState
from .loggers import TensorBoardLogger, WandbLogger
from .loop import distill
from .seeding import derive_seed, make_generator, seeded_global

__all__ = ["Callback", "GridSaver", "MetricsLogger", "PeriodicEval", "ProgressBar", "RunState", "TensorBoardLogger",
           "WandbLogger", "distill",
           "derive_seed", "make_generator", "seeded_global"]
