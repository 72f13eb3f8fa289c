"""Per-class gradients: the batched ``vmap(grad)`` formulation equals the official per-class loop (float64),
and the gradient-matching distances equal the official ``distance_wb``/``match_loss`` and hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ddkit.functional.distances import contributes, layer_distance, match_distance
from ddkit.functional.pergrad import (
    batching_is_exact,
    class_labels,
    naive_per_class_grads,
    pad_classes,
    per_class_grads,
    per_class_grads_loop,
    split_parameters,
)
from ddkit.models import create_model
from reference import official_class_loop, official_distance_wb, official_match_loss  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


K, N_REAL, N_SYN = 4, 6, 2


def _net(norm: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = create_model("convnet", channels=1, num_classes=K, image_size=(8, 8), width=8, norm=norm).double()
    if norm == "batchnorm":  # DC's BN handling: statistics from a real batch, then eval mode
        net.train()
        with torch.no_grad():
            net(torch.randn(32, 1, 8, 8, dtype=torch.float64))
        net.eval()
    return net


@pytest.mark.parametrize("norm", ["instancenorm", "groupnorm", "none", "batchnorm"])
@pytest.mark.parametrize("metric", ["ours", "mse", "cos"])
def test_batched_grads_loss_and_image_gradient_equal_the_official_loop(norm, metric):
    net = _net(norm)
    g = torch.Generator().manual_seed(1)
    xr = torch.randn(K, N_REAL, 1, 8, 8, generator=g, dtype=torch.float64)
    xs0 = torch.randn(K, N_SYN, 1, 8, 8, generator=g, dtype=torch.float64)

    # fast: matched parameters only, real side without a graph and in chunks, synthetic side batched
    diff, const = split_parameters(net, lambda name, p: contributes(tuple(p.shape), metric))
    assert batching_is_exact(net, second_order=True)
    with torch.no_grad():
        g_real = per_class_grads(net, diff, const, xr, class_labels(K, N_REAL), sample_chunk=4)
    assert all(not v.requires_grad for v in g_real.values())
    xs = xs0.clone().requires_grad_(True)
    g_syn = per_class_grads(net, diff, const, xs, class_labels(K, N_SYN))
    loss = match_distance(g_real, g_syn, metric)
    (img_grad,) = torch.autograd.grad(loss, xs)

    # naive: the module's own parameters, one class at a time
    ref_real = naive_per_class_grads(net, list(diff), list(xr), list(class_labels(K, N_REAL)))
    for name in diff:
        torch.testing.assert_close(g_real[name], ref_real[name], rtol=1e-10, atol=1e-12)
    xs_ref = xs0.clone().requires_grad_(True)
    ref_loss = official_class_loop(net, list(xr), list(xs_ref), metric)
    (ref_img_grad,) = torch.autograd.grad(ref_loss, xs_ref)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(img_grad, ref_img_grad, rtol=1e-8, atol=1e-12)
    assert img_grad.abs().max() > 0


def test_loop_formulation_equals_naive_and_handles_layernorm():
    """LayerNorm: vmap's double backward is wrong in PyTorch, so the second-order side must use the loop."""
    net = _net("layernorm")
    assert batching_is_exact(net, second_order=False)
    assert not batching_is_exact(net, second_order=True)
    g = torch.Generator().manual_seed(2)
    xr = torch.randn(K, N_REAL, 1, 8, 8, generator=g, dtype=torch.float64)
    xs0 = torch.randn(K, N_SYN, 1, 8, 8, generator=g, dtype=torch.float64)
    diff, const = split_parameters(net, lambda name, p: p.dim() >= 2)
    with torch.no_grad():
        g_real = per_class_grads(net, diff, const, xr, class_labels(K, N_REAL))
    xs = xs0.clone().requires_grad_(True)
    g_syn = per_class_grads_loop(net, diff, const, xs, class_labels(K, N_SYN), sample_chunk=1, create_graph=True)
    loss = match_distance(g_real, g_syn, "ours")
    (img_grad,) = torch.autograd.grad(loss, xs)
    xs_ref = xs0.clone().requires_grad_(True)
    ref_loss = official_class_loop(net, list(xr), list(xs_ref), "ours")
    (ref_img_grad,) = torch.autograd.grad(ref_loss, xs_ref)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(img_grad, ref_img_grad, rtol=1e-8, atol=1e-12)


def test_unequal_class_sizes_are_padded_exactly():
    net = _net("instancenorm")
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64) for n in (5, 3, 6, 1)]
    x, w = pad_classes(batches)
    assert x.shape == (K, 6, 1, 8, 8) and w.sum(1).tolist() == [5, 3, 6, 1]
    diff, const = split_parameters(net)
    with torch.no_grad():
        fast = per_class_grads(net, diff, const, x, class_labels(K, 6), w, sample_chunk=4)
        loop = per_class_grads_loop(net, diff, const, x, class_labels(K, 6), w, sample_chunk=2)
    ref = naive_per_class_grads(net, list(diff), batches, [torch.full((b.shape[0],), c) for c, b in enumerate(batches)])
    for name in diff:
        torch.testing.assert_close(fast[name], ref[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(loop[name], ref[name], rtol=1e-10, atol=1e-12)


def test_train_mode_batchnorm_is_refused():
    net = _net("batchnorm").train()
    assert not batching_is_exact(net, second_order=False)
    diff, const = split_parameters(net)
    with pytest.raises(ValueError, match="eval mode"):
        per_class_grads(net, diff, const, torch.randn(K, 2, 1, 8, 8, dtype=torch.float64), class_labels(K, 2))


# ------------------------------------------------------------------------------------------------- distances
def test_ours_distance_by_hand():
    # one class, a 2x2 weight: row 0 orthogonal (1 - 0 = 1), row 1 parallel (1 - 1 = 0, up to the 1e-6)
    real = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]], dtype=torch.float64)
    syn = torch.tensor([[[0.0, 3.0], [2.0, 2.0]]], dtype=torch.float64)
    expected = 1.0 + (1.0 - 4.0 / (math.sqrt(2) * math.sqrt(8) + 1e-6))
    assert float(layer_distance(real, syn)) == pytest.approx(expected, abs=1e-12)
    # a 1-D parameter (bias) contributes 0 to 'ours' but enters 'mse'/'cos'
    bias_r, bias_s = torch.tensor([[1.0, 2.0]], dtype=torch.float64), torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    assert float(layer_distance(bias_r, bias_s)) == 0.0
    assert float(match_distance([real, bias_r], [syn, bias_s], "ours")) == pytest.approx(expected, abs=1e-12)
    assert float(match_distance([real, bias_r], [syn, bias_s], "mse")) == pytest.approx(1 + 9 + 1 + 1 + 1 + 4)
    vr = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 2.0], dtype=torch.float64)
    vs = torch.tensor([0.0, 3.0, 2.0, 2.0, 0.0, 0.0], dtype=torch.float64)
    cos = float(vr @ vs) / (float(vr.norm() * vs.norm()) + 1e-6)
    assert float(match_distance([real, bias_r], [syn, bias_s], "cos")) == pytest.approx(1 - cos, abs=1e-12)
    assert not contributes((5,), "ours") and contributes((5,), "mse") and contributes((3, 4), "ours")


@pytest.mark.parametrize("metric", ["ours", "mse", "cos"])
def test_distances_equal_the_official_match_loss_summed_over_classes(metric):
    g = torch.Generator().manual_seed(4)
    shapes = [(8, 3, 3, 3), (8,), (5, 4, 4), (10, 32), (10,)]  # conv, bias, layer-norm scale, linear, bias
    real = [torch.randn(3, *s, generator=g, dtype=torch.float64) for s in shapes]
    syn = [torch.randn(3, *s, generator=g, dtype=torch.float64) for s in shapes]
    ours = match_distance(real, syn, metric)
    ref = sum(official_match_loss([s[c] for s in syn], [r[c] for r in real], metric) for c in range(3))
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_distance_rejects_bad_input():
    from ddkit.errors import ConfigError

    with pytest.raises(ConfigError, match="ours"):
        match_distance([torch.ones(1, 2, 2)], [torch.ones(1, 2, 2)], "l1")
    with pytest.raises(ValueError, match="shapes differ"):
        match_distance([torch.ones(1, 2, 2)], [torch.ones(1, 2, 3)])
