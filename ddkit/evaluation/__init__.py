"""Evaluation protocol, the one training loop, and reports."""
from .protocol import EvalProtocol, evaluate, evaluate_tensors, peak_rss_mib
from .report import Report, Row
from .train import accuracy, train_model

__all__ = ["EvalProtocol", "evaluate", "evaluate_tensors", "peak_rss_mib", "Report", "Row", "accuracy", "train_model"]
