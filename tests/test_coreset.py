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
