"""Coreset baselines: the baseline rows of every paper table (DC paper Tab. 1).

- ``random``: class-balanced random real images.
- ``herding``: per class, greedily add the image that keeps the mean of the selected embeddings closest to the
  class mean (Welling 2009; used as a baseline by DC, Tab. 1).
- ``kcenter``: per class, greedy k-center (farthest-point) selection on embeddings (Sener & Savarese 2018).

Herding and k-center need an embedding.  As in the DC paper's baselines they use the features of a ConvNet; the
network is trained on the real training set for ``feature_epochs`` epochs first (0 = a random network,
``feature_model='pixels'`` = raw pixels).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..data.realdata import RealData
from ..evaluation.train import train_model
from ..registry import METHODS
from ..synthetic import SyntheticSet
from .base import DistillConfig, Distiller


@dataclass
class CoresetConfig(DistillConfig):
    iterations: int = 0
    feature_model: str = "convnet"  # a registered model name, or 'pixels'
    feature_epochs: int = 1  # epochs of training on the real set before embedding (0 = random network)
    feature_lr: float = 0.01
    feature_batch: int = 256


class RandomCoreset(Distiller):
    """Class-balanced random real images (the 'Random' row of DC/DM Tab. 1)."""

    name = "random"
    Config = CoresetConfig
    selects_only = True

    def setup(self, real: RealData, syn: SyntheticSet, generator: torch.Generator) -> None:
        chosen = []
        for c in range(real.num_classes):
            ix = real.class_indices()[c]
            chosen.append(ix[self.select(c, real, syn.ipc, generator)])
        self.write(real, syn, torch.cat(chosen))

    def select(self, c: int, real: RealData, ipc: int, generator: torch.Generator) -> Tensor:
        n = real.class_indices()[c].numel()
        return torch.randperm(n, generator=generator)[:ipc]

    @staticmethod
    def write(real: RealData, syn: SyntheticSet, index: Tensor) -> None:
        with torch.no_grad():
            syn.images.copy_(real.train_images[index.to(real.train_images.device)].to(syn.images.device))
        syn.meta["selected_indices"] = [int(i) for i in index.tolist()]

    def step(self, it, real, syn, generator):  # pragma: no cover - never called (selects_only)
        return {"loss": 0.0}


class EmbeddingCoreset(RandomCoreset):
    """Shared pieces of herding and k-center: the embedding of every training image."""

    def setup(self, real: RealData, syn: SyntheticSet, generator: torch.Generator) -> None:
        self.embeddings = self.embed(real, generator)
        super().setup(real, syn, generator)

    @torch.no_grad()
    def _features(self, net, images: Tensor, batch: int = 2048) -> Tensor:
        net.eval()
        return torch.cat([net.features(images[i : i + batch].to(self.device)).float().cpu()
                          for i in range(0, images.shape[0], batch)])

    def embed(self, real: RealData, generator: torch.Generator) -> Tensor:
        cfg: CoresetConfig = self.config  # type: ignore[assignment]
        if cfg.feature_model == "pixels":
            return real.train_images.reshape(real.train_images.shape[0], -1).float().cpu()
        net = self.new_network(real, generator, model=cfg.feature_model)
        if cfg.feature_epochs > 0:
            train_model(net, real.train_images, real.train_labels, epochs=cfg.feature_epochs, lr=cfg.feature_lr,
                        generator=generator, batch_size=cfg.feature_batch, decay_at_half=False)
        return self._features(net, real.train_images)


class Herding(EmbeddingCoreset):
    """Greedy herding: each pick minimises ||class mean - mean(selected)|| (DC Tab. 1 'Herding')."""

    name = "herding"

    def select(self, c: int, real: RealData, ipc: int, generator: torch.Generator) -> Tensor:
        feats = self.embeddings[real.class_indices()[c]].double()
        mu = feats.mean(0)
        chosen: list[int] = []
        running = torch.zeros_like(mu)
        available = torch.ones(feats.shape[0], dtype=torch.bool)
        for k in range(ipc):
            candidate_means = (running.unsqueeze(0) + feats) / (k + 1)
            dist = (candidate_means - mu).norm(dim=1)
            dist[~available] = float("inf")
            best = int(dist.argmin())
            chosen.append(best)
            available[best] = False
            running += feats[best]
        return torch.tensor(chosen, dtype=torch.long)


class KCenter(EmbeddingCoreset):
    """Greedy k-center: start at the image nearest the class mean, then repeatedly add the farthest image."""

    name = "kcenter"

    def select(self, c: int, real: RealData, ipc: int, generator: torch.Generator) -> Tensor:
        feats = self.embeddings[real.class_indices()[c]].double()
        first = int((feats - feats.mean(0)).norm(dim=1).argmin())
        chosen = [first]
        min_dist = (feats - feats[first]).norm(dim=1)
        for _ in range(ipc - 1):
            nxt = int(min_dist.argmax())
            chosen.append(nxt)
            min_dist = torch.minimum(min_dist, (feats - feats[nxt]).norm(dim=1))
        return torch.tensor(chosen, dtype=torch.long)


METHODS.register("random", obj=RandomCoreset)
METHODS.register("herding", obj=Herding)
METHODS.register("kcenter", obj=KCenter)
