"""The data layer: dataset specs, raw-format readers, preprocessing and the typed :class:`RealData`."""
from .datasets import DatasetSpec, RawSplits, get_dataset_spec, load_dataset
from .preprocess import Preprocess
from .realdata import RealData

__all__ = ["DatasetSpec", "RawSplits", "RealData", "Preprocess", "get_dataset_spec", "load_dataset"]
