"""KIP: the objective equals a direct KRR computation, a short run learns (KRR accuracy on held-out digits), learned
labels, the recorded KRR accuracy, and the bad-input paths (kernel too large, singular solve)."""
from __future__ import annotations

import pytest
import torch

from ddkit.engine import distill, make_generator
from ddkit.errors import ConfigError
from ddkit.functional.kernels import KernelSpec, kernel_matrix
from ddkit.functional.krr import SingularKernelError, centered_one_hot
from ddkit.methods.kip import KIPConfig, KIPDistiller, kip_krr_accuracy
from ddkit.synthetic import SyntheticSet


def _syn(real, ipc: int = 1, seed: int = 0, learn_labels: bool = False) -> SyntheticSet:
    return SyntheticSet.from_real(real, ipc, make_generator(seed, "init"), learn_labels=learn_labels)


def test_loss_is_the_colab_objective(digits):
    """0.5 * mean((Y_t - K_ts (K_ss + reg tr(K_ss)/n I)^-1 Y_s)^2) on a class-balanced target batch, by hand."""
    cfg = KIPConfig(target_batch=50, reg=1e-3, arch="conv", depth=1)
    syn = _syn(digits, 2)
    kip = KIPDistiller(cfg)
    kip.setup(digits, syn, make_generator(0, "setup"))
    loss, metrics = kip.loss(1, digits, syn, make_generator(3, "draw"))

    # the same draw: 5 images of every class, class-major
    g = make_generator(3, "draw")
    picks = []
    for ix in digits.class_indices():
        picks.append(ix[torch.randperm(ix.numel(), generator=g)[:5]])
    index = torch.cat(picks)
    x_t, labels_t = digits.train_images[index].double(), digits.train_labels[index]
    spec = KernelSpec(arch="conv", depth=1, get="ntk")
    x_s = syn.images.detach().double()
    k_ss = kernel_matrix(spec, x_s, x_s)
    k_ts = kernel_matrix(spec, x_t, x_s)
    n = k_ss.shape[0]
    alpha = torch.linalg.inv(k_ss + 1e-3 * torch.trace(k_ss) / n * torch.eye(n, dtype=torch.float64))
    pred = k_ts @ alpha @ centered_one_hot(syn.labels, 10).double()
    direct = 0.5 * ((pred - centered_one_hot(labels_t, 10).double()) ** 2).mean()
    assert loss.dtype == torch.float64  # kernel_dtype float64, as the colab's jax_enable_x64
    assert torch.allclose(loss.detach(), direct, rtol=1e-8)
    assert metrics["acc"] == pytest.approx(100.0 * float((pred.argmax(1) == labels_t).double().mean()))
    (g_img,) = torch.autograd.grad(loss, syn.images)
    assert g_img.dtype == torch.float32 and torch.isfinite(g_img).all() and g_img.abs().sum() > 0


def test_short_run_learns_and_records_krr_accuracy(digits):
    """KRR accuracy on the held-out split rises well above the real-image initialisation's, and is recorded
    apart from anything a trained network would report."""
    cfg = KIPConfig(target_batch=1000, krr_eval_every=10)
    spec = KernelSpec()
    syn = _syn(digits, 1)
    before = kip_krr_accuracy(syn, digits, spec)
    kip = KIPDistiller(cfg)
    history = []

    from ddkit.engine.callbacks import Callback

    class Keep(Callback):
        def on_iteration_end(self, state):
            history.append(dict(state.metrics))

    distill(kip, digits, syn, iterations=20, seed=0, callbacks=[Keep()])
    after = kip_krr_accuracy(syn, digits, spec)
    assert after > before + 10.0, (before, after)
    assert history[-1]["loss"] < history[0]["loss"]
    assert [h["krr_test_acc"] for h in history if "krr_test_acc" in h] == [pytest.approx(history[9]["krr_test_acc"]),
                                                                         pytest.approx(after)]
    record = syn.meta["krr_test_acc"]
    assert record["accuracy"] == pytest.approx(after) and record["iteration"] == 20 and record["split"] == "test"
    assert "NTK" in record["kernel"] and torch.isfinite(syn.images).all()


def test_learned_labels_are_regression_targets_that_move(digits):
    syn = _syn(digits, 1, learn_labels=True)
    kip = KIPDistiller(KIPConfig(learn_labels=True, target_batch=200))
    distill(kip, digits, syn, iterations=3, seed=0)
    assert syn.labels.shape == (10, 10) and syn.labels.requires_grad
    assert syn.meta["label_kind"] == "regression"
    start = centered_one_hot(torch.arange(10), 10)
    assert not torch.allclose(syn.labels.detach(), start)
    assert torch.equal(syn.hard_labels(), torch.arange(10))  # still argmax to their class after 3 steps


def test_kernel_too_large_names_the_batch_option(digits):
    syn = _syn(digits, 1)
    # one row of 10 support pairs x 64 positions in float64, 34 tensors at depth 3, is 170 KiB; allow 1 MiB
    kip = KIPDistiller(KIPConfig(arch="conv", depth=3, kernel_batch=500, kernel_memory_gb=2 ** -10))
    with pytest.raises(ConfigError, match=r"lower method\.kernel_batch \(now 500\) to at most 6"):
        distill(kip, digits, syn, iterations=1, seed=0)
    assert torch.isfinite(syn.images).all()
    # the automatic batch fits the same limit
    kip = KIPDistiller(KIPConfig(arch="conv", depth=3, kernel_memory_gb=2 ** -10, target_batch=100))
    distill(kip, digits, syn, iterations=1, seed=0)


def test_singular_solve_is_reported_and_images_stay_finite(digits):
    """Duplicated support images with no ridge: the regression has no unique solution."""
    syn = _syn(digits, 2)
    with torch.no_grad():
        syn.images[1] = syn.images[0]  # two identical class-0 images
    before = syn.images.detach().clone()
    kip = KIPDistiller(KIPConfig(reg=0.0, target_batch=100))
    with pytest.raises(SingularKernelError, match="not positive definite.*raise reg"):
        distill(kip, digits, syn, iterations=1, seed=0)
    assert torch.equal(syn.images.detach(), before)


def test_bad_options_are_refused(digits):
    for bad, match in [(dict(arch="myrtle"), "method.arch"), (dict(kernel="rbf"), "method.kernel"),
                       (dict(kernel_dtype="half"), "kernel_dtype"), (dict(target_batch=3), "target_batch")]:
        with pytest.raises(ConfigError, match=match):
            KIPDistiller(KIPConfig(**bad)).setup(digits, _syn(digits), make_generator(0, "setup"))
