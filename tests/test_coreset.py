"""Coreset baselines select real images of the right class by their definitions."""
import pytest
import torch

from ddkit.api import distill


@pytest.mark.parametrize("method", ["random", "herding", "kcenter"])
def test_selects_distinct_real_images_of_each_class(method, digits):
    syn = distill(digits, method, ipc=3, seed=0, device="cpu", feature_epochs=0)
    idx = torch.tensor(syn.meta["selected_indices"])
    assert len(set(idx.tolist())) == 30
    assert torch.equal(digits.train_labels[idx], syn.hard_labels())
    assert torch.equal(digits.train_images[idx], syn.images.detach())


def test_herding_matches_class_mean_better_than_random(digits):
    herd = distill(digits, "herding", ipc=5, seed=0, device="cpu", feature_model="pixels")
    rand = distill(digits, "random", ipc=5, seed=0, device="cpu")

    def gap(syn):
        total = 0.0
        for c in range(10):
            mu = digits.train_images[digits.class_indices()[c]].flatten(1).mean(0)
            total += float((syn.images[syn.class_slice(c)].detach().flatten(1).mean(0) - mu).norm())
        return total

    assert gap(herd) < 0.6 * gap(rand)


def test_kcenter_covers_better_than_random(digits):
    kc = distill(digits, "kcenter", ipc=5, seed=0, device="cpu", feature_model="pixels")
    rand = distill(digits, "random", ipc=5, seed=0, device="cpu")

    def radius(syn):
        worst = 0.0
        for c in range(10):
            pool = digits.train_images[digits.class_indices()[c]].flatten(1)
            centers = syn.images[syn.class_slice(c)].detach().flatten(1)
            worst = max(worst, float(torch.cdist(pool, centers).min(1).values.max()))
        return worst

    assert radius(kc) < radius(rand)


def test_embedding_cache_is_reused_and_keyed(digits, tmp_path):
    """Herding at two IPCs trains the feature network once; changed feature settings recompute."""
    from ddkit.engine import make_generator
    from ddkit.errors import ArtifactError
    from ddkit.methods.coreset import CoresetConfig, Herding

    cache = tmp_path / "emb.safetensors"
    calls = []

    class Counting(Herding):
        def compute_embeddings(self, real, generator):
            calls.append(1)
            return super().compute_embeddings(real, generator)

    def embed(**kw):
        d = Counting(CoresetConfig(feature_epochs=0, embedding_cache=str(cache), **kw))
        return d.embed(digits, make_generator(0, "distill"))

    first = embed()
    again = embed()
    assert len(calls) == 1 and torch.equal(first, again) and cache.is_file()
    embed(feature_model="pixels")
    assert len(calls) == 2
    cache.write_bytes(b"not safetensors")
    with pytest.raises(ArtifactError):
        embed()
