"""Expert trajectories: the store, its resume and extension, its compatibility checks, GSAM, the CLI.

Tiny settings throughout (an MLP on the bundled digits, 1-2 epochs): what is tested is the bookkeeping, not the
experts' quality (tests/test_mtt.py trains ConvNet experts that MTT learns from).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddkit.engine import make_generator, seeded_global
from ddkit.errors import ArtifactError, ConfigError
from ddkit.evaluation.train import train_model
from ddkit.experts import GSAM, ExpertConfig, ExpertStore, train_experts
from ddkit.experts.store import shard_name
from ddkit.experts.train import store_spec
from ddkit.methods.common import resolve_dsa
from ddkit.models import create_model

TINY = ExpertConfig(model="mlp", epochs=2, lr=0.05, test_every_epoch=False)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def tiny_store(digits, tmp_path_factory):
    root = tmp_path_factory.mktemp("experts") / "store"
    store = train_experts(digits, TINY, root, 2, seed=3)
    return store


def test_store_describes_itself_and_loads_by_epoch(digits, tiny_store):
    store = ExpertStore.open(tiny_store.root)  # a fresh handle reads everything back from disk
    assert store.experts() == [0, 1]
    spec = store.spec
    assert (spec.dataset, spec.model, spec.epochs, spec.seed) == ("digits", "mlp", 2, 3)
    assert spec.optimizer == {"name": "sgd", "lr": 0.05, "momentum": 0.0, "weight_decay": 0.0, "batch_size": 256}
    assert spec.augmentation == "color_crop_cutout_scale_rotate"  # digits: the DSA strategy without flip
    assert spec.preprocess == digits.preprocess.to_json()
    # epoch 0 is the initialisation drawn from the expert's own stream
    with seeded_global(make_generator(3, "expert", 1)):
        net = create_model("mlp", channels=1, num_classes=10, image_size=(8, 8))
    assert _equal(store.load(1, 0), {k: p.detach() for k, p in net.named_parameters()})
    assert set(store.load(0, 2)) == set(spec.param_shapes)
    assert not torch.equal(store.load(0, 0)["classifier.weight"], store.load(0, 2)["classifier.weight"])
    info = store.info(0)
    assert info["seed"] == 3 and 0.0 <= info["test_accuracy"] <= 100.0
    with pytest.raises(ConfigError, match="outside"):
        store.load(0, 3)
    with pytest.raises(ArtifactError, match="expert 7 is not in the store"):
        store.load(7, 0)


def test_expert_is_train_model_with_the_official_settings(digits, tmp_path):
    """Epoch 1 of expert 0 equals train_model on the real images: SGD lr 0.05 (the test's), no momentum,
    batch 256, DSA on every batch, the expert's own stream for init, order and augmentation (``speed=plain``:
    the plain module's passes, so the same bits)."""
    store = train_experts(digits, dataclasses.replace(TINY, epochs=1, speed="plain"), tmp_path / "plain", 1, seed=3)
    gen = make_generator(3, "expert", 0)
    with seeded_global(gen):
        net = create_model("mlp", channels=1, num_classes=10, image_size=(8, 8))
    train_model(net, digits.train_images, digits.train_labels, epochs=1, lr=0.05, generator=gen, momentum=0.0,
                weight_decay=0.0, batch_size=256, decay_at_half=False, augment=resolve_dsa(None, "digits"))
    assert _equal(store.load(0, 1), {k: p.detach() for k, p in net.named_parameters()})


@pytest.mark.parametrize("optimizer", ["sgd", "gsam"])
def test_speed_layer_gives_the_plain_trajectory(digits, tmp_path, monkeypatch, optimizer):
    """``speed=auto`` (CPU levers: the patch-statistics first stage, chunked passes) trains the expert that
    ``speed=plain`` trains, up to float rounding, and the store records the same parameter names."""
    from ddkit.accel import SpeedLayer, patchnorm

    prepared = []
    real_prepare = SpeedLayer.prepare

    def spy(self, net):
        out = real_prepare(self, net)
        prepared.append((self.mode, patchnorm.installed(out)))
        return out

    monkeypatch.setattr(SpeedLayer, "prepare", spy)
    cfg = ExpertConfig(model="convnet_w32", epochs=2, lr=0.05, test_every_epoch=False, optimizer=optimizer)
    plain = train_experts(digits, dataclasses.replace(cfg, speed="plain"), tmp_path / "plain", 1, seed=5)
    auto = train_experts(digits, cfg, tmp_path / "auto", 1, seed=5)
    assert ("plain", False) in prepared and ("auto", True) in prepared  # the levers really were on
    assert auto.spec == plain.spec  # the speed setting is not part of the store's identity
    for epoch in range(3):
        a, b = auto.load(0, epoch), plain.load(0, epoch)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert not _equal(auto.load(0, 2), auto.load(0, 0))  # it trained


def test_interrupted_run_resumes_expert_by_expert_and_more_experts_extend(digits, tiny_store, tmp_path):
    root = tmp_path / "store"
    train_experts(digits, TINY, root, 2, seed=3)
    (root / shard_name(1)).unlink()  # expert 1 never finished
    first = (root / shard_name(0)).read_bytes()
    store = train_experts(digits, TINY, root, 3, seed=3, resume=True)
    assert store.experts() == [0, 1, 2]
    assert (root / shard_name(0)).read_bytes() == first  # untouched
    for e in (0, 1):  # identical to the uninterrupted store's experts
        assert all(_equal(store.load(e, k), tiny_store.load(e, k)) for k in range(3))
    with pytest.raises(ConfigError, match="no expert store"):
        train_experts(digits, TINY, tmp_path / "nothing", 1, seed=3, resume=True)


def test_other_settings_are_refused_naming_what_differs(digits, tiny_store):
    other = dataclasses.replace(TINY, lr=0.02)
    with pytest.raises(ConfigError, match=r"optimizer: .*'lr': 0.05.*'lr': 0.02"):
        train_experts(digits, other, tiny_store.root, 3, seed=3)
    with pytest.raises(ConfigError, match="seed: 3 vs 4"):
        train_experts(digits, TINY, tiny_store.root, 3, seed=4)
    assert tiny_store.experts() == [0, 1]


def test_check_compatible_names_the_difference(digits, tiny_store, tiny_real):
    shapes = tiny_store.spec.param_shapes
    ok = dict(dataset="digits", image_shape=(1, 8, 8), num_classes=10, preprocess=digits.preprocess, model="mlp",
              param_shapes=shapes, epochs_needed=2)
    tiny_store.check_compatible(**ok)
    with pytest.raises(ConfigError, match="dataset 'digits' \\(this run: 'tiny'\\)"):
        tiny_store.check_compatible(**{**ok, "dataset": "tiny", "num_classes": 3})
    with pytest.raises(ConfigError, match="model 'mlp'.*this run: 'convnet'"):
        tiny_store.check_compatible(**{**ok, "model": "convnet", "param_shapes": None})
    from ddkit.data import load_dataset

    zca = load_dataset("digits", zca=True).preprocess
    with pytest.raises(ConfigError, match="preprocessing: mean/std normalisation \\(this run: ZCA"):
        tiny_store.check_compatible(**{**ok, "preprocess": zca})
    with pytest.raises(ConfigError, match="too short: its trajectories have 2 epochs, this run reads up to epoch 3"):
        tiny_store.check_compatible(**{**ok, "epochs_needed": 3})
    with pytest.raises(ArtifactError, match="not an expert store"):
        ExpertStore.open(tiny_store.root.parent)


def test_store_spec_records_gsam_settings(digits):
    spec = store_spec(digits, ExpertConfig(model="mlp", optimizer="gsam"), seed=0)
    assert spec.optimizer["name"] == "gsam" and spec.optimizer["rho"] == 0.01 and spec.optimizer["alpha"] == 1.0
    assert spec.optimizer["adaptive"] is True
    with pytest.raises(ConfigError, match="unknown expert optimizer 'adam'"):
        ExpertConfig(optimizer="adam").check()


# ---------------------------------------------------------------------------------------------------------- GSAM
def _toy():
    torch.manual_seed(0)
    net = nn.Linear(5, 3).double()
    x = torch.randn(16, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    return net, x, y


def _grad(net, x, y):
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()
    return [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("adaptive", [False, True])
def test_gsam_step_is_the_surrogate_gap_update(adaptive):
    net, x, y = _toy()
    w = [p.detach().clone() for p in net.parameters()]
    rho, alpha, lr = 0.05, 0.4, 0.1
    g = _grad(net, x, y)
    # by hand: ascend, gradient there, subtract alpha x the part of g orthogonal to h, step from w
    scaled = [wi.abs() * gi for wi, gi in zip(w, g)] if adaptive else g
    norm = torch.sqrt(sum((s ** 2).sum() for s in scaled))
    e = [gi * rho / norm * (wi ** 2 if adaptive else 1.0) for wi, gi in zip(w, g)]
    with torch.no_grad():
        for p, ei in zip(net.parameters(), e):
            p.add_(ei)
    h = _grad(net, x, y)
    coef = sum((gi * hi).sum() for gi, hi in zip(g, h)) / sum((hi * hi).sum() for hi in h)
    expected = [wi - lr * (hi - alpha * (gi - coef * hi)) for wi, gi, hi in zip(w, g, h)]
    with torch.no_grad():
        for p, wi in zip(net.parameters(), w):
            p.copy_(wi)

    opt = GSAM(net.parameters(), lr, rho=rho, alpha=alpha, adaptive=adaptive)
    _grad(net, x, y)
    opt.set_closure(lambda: F.cross_entropy(net(x), y))
    opt.step()
    for p, ex in zip(net.parameters(), expected):
        torch.testing.assert_close(p.detach(), ex, rtol=1e-10, atol=1e-12)


def test_gsam_with_rho_zero_is_sgd():
    net, x, y = _toy()
    ref = nn.Linear(5, 3).double()
    ref.load_state_dict(net.state_dict())
    opt = GSAM(net.parameters(), 0.1, momentum=0.9, weight_decay=5e-4, rho=0.0, alpha=0.7)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(3):
        _grad(net, x, y)
        opt.step(lambda: F.cross_entropy(net(x), y))
        _grad(ref, x, y)
        sgd.step()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="closure"):
        _grad(net, x, y)
        opt.step()


def test_gsam_experts_train_and_differ_from_sgd(digits, tmp_path, tiny_store):
    cfg = dataclasses.replace(TINY, optimizer="gsam", epochs=1)
    store = train_experts(digits, cfg, tmp_path / "gsam", 1, seed=3)
    assert store.spec.optimizer["name"] == "gsam"
    assert _equal(store.load(0, 0), tiny_store.load(0, 0))  # same stream, same initialisation
    assert not _equal(store.load(0, 1), tiny_store.load(0, 1))


# ----------------------------------------------------------------------------------------------------------- CLI
def test_cli_experts(tmp_path, capsys):
    from ddkit.cli import main

    out = tmp_path / "cli_store"
    args = ["experts", "--dataset", "digits", "--num-experts", "1", "--epochs", "1", "--out", str(out), "--model",
            "mlp", "--quiet", "--device", "cpu", "--set", "expert.test_every_epoch=false", "--set", "expert.lr=0.05"]
    assert main(args) == 0
    assert "1 experts (mlp, digits, 1 epochs, sgd)" in capsys.readouterr().out
    assert ExpertStore.open(out).spec.optimizer["lr"] == 0.05
    assert main(args[:-2] + ["--set", "expert.lr=0.02"]) == 2
    assert "trained with other settings" in capsys.readouterr().err
    assert main(args + ["--set", "expert.lrr=1"]) == 2
    assert "unknown config key 'expert.lrr'; did you mean expert.lr" in capsys.readouterr().err
    assert main(args + ["--set", "speed=fast"]) == 2
    assert "speed must be one of auto, plain" in capsys.readouterr().err
    assert main(args + ["--set", "speed=plain"]) == 0  # the store is complete: nothing to train, same identity
