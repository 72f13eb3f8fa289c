"""Pure functional building blocks: gradient-matching distances and per-class gradients (``torch.func``)."""
from .distances import DISTANCES, contributes, layer_distance, match_distance
from .pergrad import (
    batching_is_exact,
    class_labels,
    naive_per_class_grads,
    pad_classes,
    per_class_grads,
    per_class_grads_loop,
    split_parameters,
)

__all__ = ["DISTANCES", "contributes", "layer_distance", "match_distance", "batching_is_exact", "class_labels",
           "naive_per_class_grads", "pad_classes", "per_class_grads", "per_class_grads_loop", "split_parameters"]
