"""CAFE: official feature taps and loss terms, stopping rules, any input shape, and a short run that learns."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ddkit.api import real_from_tensors
from ddkit.engine import Callback, distill, make_generator
from ddkit.methods import create_distiller
from ddkit.accel import SpeedLayer
from ddkit.methods.cafe import CAFEConfig, CAFEDistiller, _window_done, feature_taps, weighted_taps
from ddkit.models import create_model
from ddkit.synthetic import SyntheticSet

# small loops so that one outer iteration is cheap in tests
FAST = dict(model="convnet_w32", batch_real=16, watch_per_class=8, max_updates=12, max_inner_epochs=12)


def _random_real(channels: int, size: int, classes: int = 3, per_class: int = 12):
    g = torch.Generator().manual_seed(0)
    n = classes * per_class
    x = torch.randn(n, channels, size, size, generator=g)
    y = torch.arange(classes).repeat(per_class)
    return real_from_tensors(x, y, x[: classes * 2], y[: classes * 2], name="tiny")


def test_taps_follow_the_official_convnet():
    """ConvNet-3 on 28x28: pre-pool activations of each block plus the last pooled map, then the embedding."""
    net = create_model("convnet", channels=1, num_classes=10, image_size=(28, 28))
    x = torch.randn(2, 1, 28, 28)
    taps, emb = feature_taps(net, x)
    assert [tuple(t.shape[1:]) for t in taps] == [(128, 32, 32), (128, 16, 16), (128, 8, 8), (128, 4, 4)]
    assert torch.allclose(emb, net.features(x))
    # official: fourth_weight -> features[-1] (block 1 pre-pool), ..., first_weight -> features[-4] (pooled)
    weights = CAFEConfig().layer_weights()
    assert weighted_taps(taps, weights) == [(3, 1.0), (2, 1.0), (1, 0.1), (0, 0.1)]


def test_watcher_rules():
    """Outer rule: stop when the 10-reading range is below lambda_1; inner rule: when it exceeds lambda_2."""
    window: list[float] = []
    steady = [0.5] * 9
    assert not any(_window_done(window, r, 10, lambda span: span < 0.04) for r in steady)
    assert _window_done(window, 0.52, 10, lambda span: span < 0.04)
    window = [0.1 * i for i in range(9)]
    assert not _window_done(window, 0.2, 10, lambda span: span < 0.04)
    assert len(window) == 9  # oldest reading dropped


def test_image_lr_schedule_matches_official_milestones(digits):
    """x0.5 from official iterations 1200, 1600, 1800 of 2000 (0-based ``it``; ours is 1-based)."""
    syn = SyntheticSet.from_real(digits, 1, make_generator(0), init="noise")
    d = CAFEDistiller(CAFEConfig())
    d.setup(digits, syn, make_generator(0))
    lrs = {}
    for it in (1, 1200, 1201, 1600, 1601, 1801, 2000):
        d._set_image_lr(it)
        lrs[it] = d.optimizer.param_groups[0]["lr"]
    assert lrs[1] == lrs[1200] == 0.1
    assert lrs[1201] == lrs[1600] == pytest.approx(0.05)
    assert lrs[1601] == pytest.approx(0.025)
    assert lrs[1801] == lrs[2000] == pytest.approx(0.0125)


def test_loss_terms_match_a_direct_computation(digits):
    """The image loss equals the official composition written out for one class-major batch."""
    torch.manual_seed(0)
    cfg = CAFEConfig(model="convnet_w32", batch_real=20)
    syn = SyntheticSet.from_real(digits, 2, make_generator(0), init="real").to(torch.float64)
    d = CAFEDistiller(cfg)
    d.setup(digits, syn, make_generator(0))
    net = create_model("convnet_w32", channels=1, num_classes=10, image_size=(8, 8)).double()
    net.requires_grad_(False)
    g1, g2 = make_generator(1), make_generator(1)
    loss, parts = d.matching_loss(net, digits, syn, g1)

    from ddkit.methods.dm import sample_per_class

    batch = sample_per_class(digits, cfg.batch_real, g2, torch.device("cpu"))
    real_taps, real_emb = feature_taps(net, batch.images.double())
    syn_taps, syn_emb = feature_taps(net, syn.images)
    k, n, ipc = 10, cfg.batch_real, 2

    def cmean(t, per):  # the official criterion_middle reshape: class-major blocks of equal size
        return t.view(k, per, *t.shape[1:]).mean(1)

    middle = sum(w * F.mse_loss(cmean(real_taps[i], n), cmean(syn_taps[i], ipc), reduction="sum")
                 for i, w in weighted_taps(real_taps, cfg.layer_weights()))
    centres = cmean(syn_emb, ipc)
    mean_term = F.mse_loss(centres, cmean(real_emb, n), reduction="sum")
    disc = cfg.inner_weight * F.cross_entropy(real_emb @ centres.t(), batch.labels, reduction="sum")
    real_ce = F.cross_entropy(net(batch.images.double()), batch.labels)
    assert parts["loss_middle"] == pytest.approx(float(middle), rel=1e-9)
    assert parts["loss_mean"] == pytest.approx(float(mean_term), rel=1e-9)
    assert parts["loss_disc"] == pytest.approx(float(disc), rel=1e-9)
    assert parts["loss_real"] == pytest.approx(float(real_ce), rel=1e-9)
    assert float(loss) == pytest.approx(float(middle + mean_term + disc + real_ce), rel=1e-9)


@pytest.mark.parametrize("channels,size,dsa", [(1, 8, False), (3, 32, True)])
def test_runs_on_any_shape(channels, size, dsa):
    """No hard-coded CIFAR reshape: 1x8x8 and 3x32x32, with and without DSA, three classes."""
    real = _random_real(channels, size)
    syn = SyntheticSet.from_real(real, 2, make_generator(0), init="noise")
    d = CAFEDistiller(CAFEConfig(dsa=dsa, **dict(FAST, max_updates=4, max_inner_epochs=3, watch_window=3)))
    before = syn.images.detach().clone()
    metrics = []

    class Keep(Callback):
        def on_iteration_end(self, state):
            metrics.append(dict(state.metrics))

    distill(d, real, syn, iterations=2, seed=0, callbacks=[Keep()])
    assert not torch.equal(before, syn.images.detach())
    assert len(metrics) == 2
    for m in metrics:
        assert math.isfinite(m["loss"])
        assert 3 <= m["updates"] <= 4  # the outer rule needs watch_window readings first


def test_resume_is_exact(digits, tmp_path):
    """State at a step boundary is the image optimizer: 2 + resume 1 == 3 iterations."""
    cfg = dict(FAST, max_updates=3, max_inner_epochs=2)
    runs = []
    for split in (False, True):
        syn = SyntheticSet.from_real(digits, 1, make_generator(0), init="noise")
        out = tmp_path / f"run{int(split)}"
        if split:
            distill(CAFEDistiller(CAFEConfig(**cfg)), digits, syn, iterations=2, seed=3, checkpoint_dir=out,
                    checkpoint_every=1)
            syn = SyntheticSet.from_real(digits, 1, make_generator(9), init="noise")
            distill(CAFEDistiller(CAFEConfig(**cfg)), digits, syn, iterations=3, seed=3, checkpoint_dir=out,
                    checkpoint_every=1, resume=True)
        else:
            distill(CAFEDistiller(CAFEConfig(**cfg)), digits, syn, iterations=3, seed=3)
        runs.append(syn.images.detach().clone())
    assert torch.equal(runs[0], runs[1])


def test_cafe_learns_on_digits(digits):
    """A short run (one outer iteration, capped loops) beats its noise initialisation (CAFE's default init)."""
    from ddkit.evaluation import EvalProtocol, evaluate

    protocol = EvalProtocol(runs=3, epochs=100, dsa=False)
    syn = SyntheticSet.from_real(digits, 1, make_generator(0, "init"), init="noise")
    before = evaluate(syn, digits, protocol, seed=0).summary()["convnet"]["mean"]
    d = create_distiller("cafe", dataset="digits", ipc=1)
    for key, value in dict(batch_real=64, watch_per_class=16, max_updates=5, max_inner_epochs=5).items():
        setattr(d.config, key, value)
    distill(d, digits, syn, iterations=1, seed=0)
    after = evaluate(syn, digits, protocol, seed=0).summary()["convnet"]["mean"]
    assert after - before > 30.0, (before, after)


def test_compiled_reading_equals_the_eager_one_and_follows_the_network(digits):
    """compile=on: the stopping-rule reading through a compiled eval-mode copy gives the eager reading, also
    after the network has changed (the copy is refreshed at every reading)."""
    syn = SyntheticSet.from_real(digits, 1, make_generator(0), init="noise")
    readers = {}
    for mode in ("on", "off"):
        d = CAFEDistiller(CAFEConfig(**{**FAST, "watch_per_class": 40}))
        d.speed = SpeedLayer("auto", "cpu", compile=mode == "on")
        d.setup(digits, syn, make_generator(0, "setup"))
        readers[mode] = d
    assert readers["on"].reader.enabled and not readers["off"].reader.enabled
    net = readers["off"].new_network(digits, make_generator(1, "net")).train()
    for _ in range(2):
        got = readers["on"].real_accuracy(net, digits, make_generator(2, "read"))
        if not readers["on"].reader._compiled.enabled:
            pytest.skip("torch.compile does not work on this machine: nothing compiled to compare")
        want = readers["off"].real_accuracy(net, digits, make_generator(2, "read"))
        assert got == pytest.approx(want, abs=1e-9)
        assert net.training  # the reading restores the mode
        with torch.no_grad():  # change the network: the next reading must see it
            for p in net.parameters():
                p.add_(0.5 * torch.randn_like(p))
