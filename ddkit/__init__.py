"""ddkit: dataset distillation on one shared core.

Public API::

    import ddkit
    real = ddkit.load_dataset("digits")
    syn = ddkit.distill(real, method="dm", ipc=10, iterations=200)
    print(ddkit.evaluate(syn, real, ddkit.EvalProtocol(runs=3, epochs=300)).to_markdown())
"""
__version__ = "0.1.0"

from .api import distill, load_real_for, real_from_datasets, real_from_tensors  # noqa: E402
from .data import load_dataset  # noqa: E402
from .errors import DDKitError  # noqa: E402
from .evaluation import EvalProtocol, Report, evaluate  # noqa: E402
from .methods import create_distiller  # noqa: E402
from .models import create_model  # noqa: E402
from .synthetic import SyntheticSet  # noqa: E402

__all__ = ["__version__", "distill", "load_dataset", "create_model", "create_distiller", "SyntheticSet", "evaluate",
           "EvalProtocol", "Report", "DDKitError", "real_from_tensors", "real_from_datasets", "load_real_for"]
