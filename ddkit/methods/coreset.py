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

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..data.realdata import RealData
from ..errors import ArtifactError
from ..io import load_state, save_state
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
    #: optional safetensors file caching the embeddings: reused when its metadata matches (dataset, training
    #: set size, feature settings, seed), else computed and written atomically.  Herding and k-center at several
    #: IPCs then train the feature network once instead of once per IPC.
    embedding_cache: str = ""


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
        if not cfg.embedding_cache:
            return self.compute_embeddings(real, generator)
        key = self.embedding_key(real, generator)
        cached = read_embedding_cache(Path(cfg.embedding_cache), key)
        if cached is not None:
            return cached
        feats = self.compute_embeddings(real, generator)
        save_state(cfg.embedding_cache, {"embeddings": feats}, metadata={"embedding_key": key})
        return feats

    def embedding_key(self, real: RealData, generator: torch.Generator) -> dict:
        """What the embeddings depend on; a cache file is reused only when all of it matches."""
        cfg: CoresetConfig = self.config  # type: ignore[assignment]
        return {"dataset": real.name, "train_images": int(real.train_images.shape[0]),
                "feature_model": cfg.feature_model, "feature_epochs": cfg.feature_epochs,
                "feature_lr": cfg.feature_lr, "feature_batch": cfg.feature_batch,
                # the feature network's initialisation and batch order come from the generator's current state
                "generator_state": hashlib.sha256(generator.get_state().numpy().tobytes()).hexdigest()[:16]}

    def compute_embeddings(self, real: RealData, generator: torch.Generator) -> Tensor:
        cfg: CoresetConfig = self.config  # type: ignore[assignment]
        if cfg.feature_model == "pixels":
            return real.train_images.reshape(real.train_images.shape[0], -1).float().cpu()
        net = self.new_network(real, generator, model=cfg.feature_model)
        if cfg.feature_epochs > 0:
            images = real.train_images
            pixel_steps = cfg.feature_epochs * images.shape[0] * images.shape[-1] * images.shape[-2]
            compiled = self.speed.compiles(pixel_steps, images.dtype)
            train_model(net, images, real.train_labels, epochs=cfg.feature_epochs, lr=cfg.feature_lr,
                        generator=generator, batch_size=cfg.feature_batch, decay_at_half=False,
                        forward=self.speed.train_forward(net, tuple(images.shape), compiled))
        return self._features(net, real.train_images)


def read_embedding_cache(path: Path, key: dict) -> Tensor | None:
    """The cached embeddings if ``path`` holds embeddings computed under ``key``; ``None`` if absent or stale.

    A file that exists but is not a ddkit embedding cache raises :class:`ArtifactError` (never overwritten
    silently: it may be something else the user keeps there)."""
    if not path.is_file():
        return None
    state, meta = load_state(path)
    if not isinstance(state, dict) or "embeddings" not in state or "embedding_key" not in meta:
        raise ArtifactError(f"{path} is a ddkit checkpoint but not an embedding cache")
    return state["embeddings"] if meta["embedding_key"] == key else None


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
