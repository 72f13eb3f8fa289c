"""Expert trajectories for trajectory matching (MTT, FTD, DDPP): training (``train.py``), the self-describing
store (``store.py``) and FTD's sharpness-aware optimiser (``gsam.py``)."""
from .gsam import GSAM
from .store import ExpertStore, StoreSpec
from .train import ExpertConfig, train_expert, train_experts

__all__ = ["ExpertConfig", "ExpertStore", "GSAM", "StoreSpec", "train_expert", "train_experts"]
