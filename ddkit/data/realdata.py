"""RealData: the typed output of ``load_dataset`` that every later stage consumes."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import ConfigError, DataError
from .preprocess import Preprocess


@dataclass
class RealData:
    """A labelled train/test split already in model space (normalised or ZCA-whitened).

    Images are float32 ``[N, C, H, W]``; labels are int64 ``[N]`` in ``0..num_classes-1``.
    """

    name: str
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    num_classes: int
    class_names: list[str]
    preprocess: Preprocess
    info: dict = field(default_factory=dict)  # e.g. where it was read from, split seed

    def __post_init__(self) -> None:
        self._class_index: list[Tensor] | None = None
        if self.num_classes < 2:
            raise DataError(f"{self.name!r} has {self.num_classes} class; distillation and evaluation need at least 2 "
                            f"classes (a classifier of one class learns nothing)")
        if len(self.class_names) != self.num_classes:
            raise DataError(f"{self.name!r}: {len(self.class_names)} class names for {self.num_classes} classes")

    @property
    def channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train_images.shape[2]), int(self.train_images.shape[3])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.image_size)

    def class_indices(self) -> list[Tensor]:
        """Indices of the training images of each class (cached)."""
        if self._class_index is None:
            labels = self.train_labels.cpu()
            self._class_index = [torch.nonzero(labels == c).flatten() for c in range(self.num_classes)]
        return self._class_index

    def class_counts(self) -> list[int]:
        return [int(ix.numel()) for ix in self.class_indices()]

    def check_ipc(self, ipc: int) -> None:
        """Raise a clear error when a class has fewer training images than requested per class."""
        if ipc < 1:
            raise ConfigError(f"ipc must be >= 1, got {ipc}")
        counts = self.class_counts()
        smallest = min(counts)
        if ipc > smallest:
            c = counts.index(smallest)
            raise ConfigError(
                f"ipc={ipc} is larger than the smallest class of {self.name!r} "
                f"(class {c} {self.class_names[c]!r} has {smallest} training images); use ipc <= {smallest}"
            )

    def sample_class(self, c: int, n: int, generator: torch.Generator) -> Tensor:
        """``n`` random training images of class ``c`` (without replacement when possible)."""
        ix = self.class_indices()[c]
        if n >= ix.numel():
            perm = torch.randperm(ix.numel(), generator=generator)
        else:
            perm = torch.randperm(ix.numel(), generator=generator)[:n]
        return self.train_images[ix[perm]]

    def to(self, device: torch.device | str) -> "RealData":
        """Move the image tensors to ``device`` (preprocessing tensors stay where they are)."""
        moved = RealData(
            name=self.name,
            train_images=self.train_images.to(device),
            train_labels=self.train_labels.to(device),
            test_images=self.test_images.to(device),
            test_labels=self.test_labels.to(device),
            num_classes=self.num_classes,
            class_names=self.class_names,
            preprocess=self.preprocess,
            info=self.info,
        )
        return moved
