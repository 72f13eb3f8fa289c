"""The functional SGD core (``ddkit.functional.unroll``): parity with ``torch.optim.SGD`` and ``train_model``,
unrolled gradients against a hand-unrolled computation, "checkpoint" against "graph", bounded saved memory."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddkit.errors import ConfigError
from ddkit.evaluation.train import soft_label_loss, train_model
from ddkit.functional.unroll import SGDRule, loss_and_grads, sgd_update, unroll_sgd
from ddkit.models import create_model

RULES = {
    "plain": SGDRule(),
    "wd": SGDRule(weight_decay=5e-3),
    "momentum": SGDRule(momentum=0.9),
    "momentum_wd_dampening": SGDRule(momentum=0.8, weight_decay=1e-2, dampening=0.3),
    "nesterov_wd": SGDRule(momentum=0.9, weight_decay=5e-4, nesterov=True),
}
SOFT_CE = soft_label_loss("soft_ce")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _mlp(seed: int = 0, width: int = 16, classes: int = 5) -> nn.Module:
    torch.manual_seed(seed)  # tests only: the library never seeds the global RNG
    return create_model("mlp", channels=1, num_classes=classes, image_size=8, width=width).double()


def _convnet(seed: int = 0, width: int = 8, classes: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("convnet", channels=1, num_classes=classes, image_size=8, width=width).double()


def _data(n: int = 12, classes: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.arange(n) % classes
    return x, y, g


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def _batches(steps: int, n: int, size: int, seed: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=g)[:size] for _ in range(steps)]


# --- parity with torch.optim.SGD and train_model ---------------------------------------------------------------


@pytest.mark.parametrize("rule_name", list(RULES))
@pytest.mark.parametrize("per_step_lr", [False, True])
def test_unroll_equals_torch_sgd(rule_name, per_step_lr):
    rule = RULES[rule_name]
    steps = 5
    model = _mlp()
    x, y, _ = _data()
    idx = _batches(steps, x.shape[0], 6)
    lrs = torch.tensor([0.1, 0.05, 0.2, 0.01, 0.07], dtype=torch.float64) if per_step_lr else torch.tensor(0.1).double()
    start = _params(model)

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=rule.momentum, weight_decay=rule.weight_decay,
                          dampening=rule.dampening, nesterov=rule.nesterov)
    for i in range(steps):
        for group in opt.param_groups:
            group["lr"] = float(lrs[i]) if per_step_lr else float(lrs)
        opt.zero_grad()
        F.cross_entropy(model(x[idx[i]]), y[idx[i]]).backward()
        opt.step()

    batch_fn = lambda i, xs, ys: (xs[idx[i]], ys[idx[i]])  # noqa: E731
    for mode in ("no_grad", "graph", "checkpoint"):
        out = unroll_sgd(model, start, batch_fn, (x, y), lrs, steps, rule=rule, mode=mode)
        for name, p in model.named_parameters():
            torch.testing.assert_close(out[name], p.detach(), rtol=0, atol=1e-12, msg=f"{mode} {name}")


def test_sgd_update_first_step_initialises_buffer_with_gradient():
    p = {"w": torch.tensor([1.0, -2.0], dtype=torch.float64)}
    g = {"w": torch.tensor([0.5, 0.25], dtype=torch.float64)}
    rule = SGDRule(momentum=0.9, dampening=0.5, weight_decay=0.1)
    new, buf = sgd_update(p, g, 0.1, rule, None)
    d = g["w"] + 0.1 * p["w"]  # no dampening on the first step, as torch.optim.SGD
    torch.testing.assert_close(buf["w"], d)
    torch.testing.assert_close(new["w"], p["w"] - 0.1 * d)
    new2, buf2 = sgd_update(new, g, 0.1, rule, buf)
    d2 = g["w"] + 0.1 * new["w"]
    torch.testing.assert_close(buf2["w"], 0.9 * d + 0.5 * d2)
    assert sgd_update(p, g, 0.1, SGDRule(), None)[1] is None


def test_train_model_is_pinned_to_the_functional_rule():
    """train_model (torch.optim.SGD, faster) and unroll_sgd with the protocol's rule train identically on the same
    batches: same shuffles, lr x0.1 at half, momentum 0.9, weight decay 5e-4, augmentation off."""
    epochs, batch, lr = 4, 16, 0.05
    x, y, _ = _data(n=40)
    model = _mlp(seed=3)
    start = _params(model)
    train_model(model, x, y, epochs=epochs, lr=lr, generator=torch.Generator().manual_seed(7), batch_size=batch)

    g = torch.Generator().manual_seed(7)
    idx, lrs = [], []
    for epoch in range(epochs):
        order = torch.randperm(x.shape[0], generator=g)
        for s in range(0, x.shape[0], batch):
            idx.append(order[s : s + batch])
            lrs.append(lr * (0.1 if epoch >= epochs // 2 else 1.0))
    rule = SGDRule(momentum=0.9, weight_decay=5e-4)
    out = unroll_sgd(model, start, lambda i, xs, ys: (xs[idx[i]], ys[idx[i]]), (x, y),
                     torch.tensor(lrs, dtype=torch.float64), len(idx), rule=rule, mode="no_grad")
    for name, p in model.named_parameters():
        torch.testing.assert_close(out[name], p.detach(), rtol=0, atol=1e-12, msg=name)
        assert not torch.equal(out[name], start[name])


# --- unrolled gradients -------------------------------------------------------------------------------------------


def _hand_unrolled(w0, b0, x, ylog, lrs, idx, momentum, wd):
    """Softmax regression trained by SGD with momentum and weight decay, every gradient written out by hand:
    for logits ``z = x W^T + b`` and soft targets ``t``, d mean soft-CE / dW = (softmax(z) - t)^T x / n."""
    w, b = w0, b0
    vw = vb = None
    for i, ix in enumerate(idx):
        xi = x[ix].flatten(1)
        ti = ylog[ix].softmax(1)
        r = ((xi @ w.T + b).softmax(1) - ti) / xi.shape[0]
        gw, gb = r.T @ xi + wd * w, r.sum(0) + wd * b
        vw = gw if vw is None else momentum * vw + gw
        vb = gb if vb is None else momentum * vb + gb
        lr = lrs[i] if lrs.dim() else lrs
        w, b = w - lr * vw, b - lr * vb
    return w, b


@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.9, 1e-2)])
@pytest.mark.parametrize("per_step_lr", [False, True])
def test_unrolled_gradient_equals_hand_unrolled(momentum, wd, per_step_lr):
    steps, classes = 4, 5
    x, _, g = _data(n=10, classes=classes)
    x.requires_grad_(True)
    ylog = torch.randn(10, classes, generator=g, dtype=torch.float64, requires_grad=True)  # learnable soft labels
    lrs = (torch.tensor([0.3, 0.2, 0.25, 0.1], dtype=torch.float64) if per_step_lr
           else torch.tensor(0.2, dtype=torch.float64)).requires_grad_(True)
    w0 = (0.1 * torch.randn(classes, 64, generator=g, dtype=torch.float64)).requires_grad_(True)
    b0 = (0.1 * torch.randn(classes, generator=g, dtype=torch.float64)).requires_grad_(True)
    xq = torch.randn(7, 1, 8, 8, generator=g, dtype=torch.float64)  # outer "real" batch
    yq = torch.arange(7) % classes
    idx = _batches(steps, 10, 5)
    leaves = (x, ylog, lrs, w0, b0)

    w, b = _hand_unrolled(w0, b0, x, ylog, lrs, idx, momentum, wd)
    expected = torch.autograd.grad(F.cross_entropy(xq.flatten(1) @ w.T + b, yq), leaves)

    model = nn.Sequential(nn.Flatten(1), nn.Linear(64, classes)).double()
    batch_fn = lambda i, xs, ys: (xs[idx[i]], ys[idx[i]].softmax(1))  # noqa: E731
    rule = SGDRule(momentum=momentum, weight_decay=wd)
    for mode in ("graph", "checkpoint"):
        out = unroll_sgd(model, {"1.weight": w0, "1.bias": b0}, batch_fn, (x, ylog), lrs, steps, rule=rule,
                         loss_fn=SOFT_CE, mode=mode)
        got = torch.autograd.grad(F.cross_entropy(xq.flatten(1) @ out["1.weight"].T + out["1.bias"], yq), leaves)
        for name, e, o in zip(("images", "labels", "lrs", "weight0", "bias0"), expected, got):
            torch.testing.assert_close(o, e, rtol=1e-10, atol=1e-12, msg=f"{mode}: d/d{name}")


@pytest.mark.parametrize("arch", ["mlp", "convnet"])
@pytest.mark.parametrize("rule_name", ["plain", "momentum_wd_dampening", "nesterov_wd"])
def test_checkpoint_gradient_equals_graph(arch, rule_name):
    rule = RULES[rule_name]
    steps, classes = 5, 5
    model = (_mlp if arch == "mlp" else _convnet)(classes=classes)
    x, _, g = _data(n=10, classes=classes)
    x.requires_grad_(True)
    ylog = torch.randn(10, classes, generator=g, dtype=torch.float64, requires_grad=True)
    lrs = torch.tensor([0.05, 0.02, 0.04, 0.03, 0.01], dtype=torch.float64, requires_grad=True)
    params = {k: p.requires_grad_(True) for k, p in _params(model).items()}
    buf0 = ({k: (0.01 * torch.randn(p.shape, generator=g, dtype=torch.float64)).requires_grad_(True)
             for k, p in params.items()} if rule.momentum and arch == "mlp" else None)
    xq = torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64)
    yq = torch.arange(6) % classes
    idx = _batches(steps, 10, 4)
    batch_fn = lambda i, xs, ys: (xs[idx[i]], ys[idx[i]].softmax(1))  # noqa: E731
    leaves = [x, ylog, lrs, *params.values(), *(buf0.values() if buf0 else [])]

    grads = {}
    for mode in ("graph", "checkpoint"):
        out = unroll_sgd(model, params, batch_fn, (x, ylog), lrs, steps, rule=rule, loss_fn=SOFT_CE, mode=mode,
                         momentum_buf=buf0)
        outer = F.cross_entropy(torch.func.functional_call(model, out, (xq,)), yq)
        grads[mode] = torch.autograd.grad(outer, leaves)
    # Images, labels, lrs and the parameters as a whole get non-zero gradients (single parameters may not: a conv
    # bias before instance norm has none), so a difference would show.
    for a in (*grads["graph"][:3], torch.cat([t.flatten() for t in grads["graph"][3:]])):
        assert a.abs().sum() > 0
    for i, (a, b) in enumerate(zip(grads["graph"], grads["checkpoint"])):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=f"leaf {i}")


def test_scalar_lr_and_hard_labels_checkpoint_equals_graph():
    """A scalar learnable lr shared by all steps and integer labels (no gradient) through the checkpoint path."""
    model = _convnet(width=4)
    x, y, g = _data(n=8)
    x.requires_grad_(True)
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    params = _params(model)  # not differentiated: a fixed initialisation
    idx = _batches(3, 8, 8)
    grads = {}
    for mode in ("graph", "checkpoint"):
        out = unroll_sgd(model, params, lambda i, xs, ys: (xs[idx[i]], ys[idx[i]]), (x, y), lr, 3,
                         rule=RULES["momentum"], mode=mode)
        loss = F.cross_entropy(torch.func.functional_call(model, out, (x.detach(),)), y)
        grads[mode] = torch.autograd.grad(loss, (x, lr))
    for a, b in zip(grads["graph"], grads["checkpoint"]):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_no_grad_mode_returns_graph_parameters_detached():
    model = _convnet(width=4)
    x, y, _ = _data(n=8)
    x.requires_grad_(True)
    params = {k: p.requires_grad_(True) for k, p in _params(model).items()}
    idx = _batches(3, 8, 5)
    batch_fn = lambda i, xs, ys: (xs[idx[i]], ys[idx[i]])  # noqa: E731
    graph = unroll_sgd(model, params, batch_fn, (x, y), 0.05, 3, rule=RULES["nesterov_wd"], mode="graph")
    plain = unroll_sgd(model, params, batch_fn, (x, y), 0.05, 3, rule=RULES["nesterov_wd"], mode="no_grad")
    with torch.no_grad():
        under = unroll_sgd(model, params, batch_fn, (x, y), 0.05, 3, rule=RULES["nesterov_wd"], mode="checkpoint")
    for name in graph:
        assert graph[name].requires_grad and not plain[name].requires_grad and not under[name].requires_grad
        torch.testing.assert_close(plain[name], graph[name].detach(), rtol=0, atol=1e-13)
        torch.testing.assert_close(under[name], graph[name].detach(), rtol=0, atol=1e-13)


# --- memory -------------------------------------------------------------------------------------------------------


class _SavedBytes:
    """Live and peak bytes of the tensors autograd holds for backward (``saved_tensors_hooks``), not timed."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def pack(self, t: torch.Tensor) -> "_Held":
        return _Held(t, self)

    @staticmethod
    def unpack(held: "_Held") -> torch.Tensor:
        return held.tensor


class _Held:
    def __init__(self, tensor: torch.Tensor, meter: _SavedBytes) -> None:
        # Detached: holding a saved *output* with its grad_fn would make a reference cycle that never frees.
        self.tensor, self.meter, self.nbytes = tensor.detach(), meter, tensor.numel() * tensor.element_size()
        meter.live += self.nbytes
        meter.peak = max(meter.peak, meter.live)

    def __del__(self) -> None:
        self.meter.live -= self.nbytes


def _saved_peak(mode: str, steps: int) -> tuple[int, int]:
    """Peak saved bytes over forward and backward of a DD-like unroll; and the parameter bytes of one state."""
    model = _convnet(width=4, classes=3)
    x = torch.randn(64, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    y = torch.arange(64) % 3
    lrs = torch.full((steps,), 0.01, dtype=torch.float64, requires_grad=True)
    params = _params(model)
    meter = _SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        out = unroll_sgd(model, params, lambda i, xs, ys: (xs, ys), (x, y), lrs, steps, mode=mode)
        loss = sum(p.square().sum() for p in out.values())
        loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    return meter.peak, sum(p.numel() * p.element_size() for p in params.values())


def test_checkpoint_saves_constant_activations_per_step():
    """Growing the unroll from 2 to 10 steps: "graph" keeps 8 more steps of activations (each at least the
    batch's 64x4x8x8 first-stage maps); "checkpoint" keeps only 8 more copies of the (small) parameters: its peak
    is one step's double-backward graph, whatever the number of steps."""
    activation_bytes = 64 * 4 * 8 * 8 * 8  # one float64 first-stage map of the batch
    graph2, _ = _saved_peak("graph", 2)
    graph10, _ = _saved_peak("graph", 10)
    ckpt2, state = _saved_peak("checkpoint", 2)
    ckpt10, _ = _saved_peak("checkpoint", 10)
    assert graph10 - graph2 >= 8 * activation_bytes
    assert ckpt10 - ckpt2 <= 8 * (state + 8)  # a parameter copy and a float64 lr per extra step
    assert state < activation_bytes / 4  # the test's premise: parameters are small beside activations
    assert ckpt10 < graph10 / 4


# --- errors -------------------------------------------------------------------------------------------------------


def test_bad_arguments_raise_config_errors():
    model = _mlp()
    x, y, _ = _data()
    params = _params(model)
    fn = lambda i, xs, ys: (xs, ys)  # noqa: E731
    with pytest.raises(ConfigError, match="mode"):
        unroll_sgd(model, params, fn, (x, y), 0.1, 2, mode="fast")
    with pytest.raises(ConfigError, match=r"\[steps\]=2"):
        unroll_sgd(model, params, fn, (x, y), torch.ones(3, dtype=torch.float64), 2)
    with pytest.raises(ConfigError, match="steps"):
        unroll_sgd(model, params, fn, (x, y), 0.1, -1)
    with pytest.raises(ConfigError, match="nesterov"):
        SGDRule(nesterov=True)


def test_loss_and_grads_matches_autograd_and_works_under_no_grad():
    model = _mlp()
    x, y, _ = _data()
    loss = F.cross_entropy(model(x), y)
    expected = torch.autograd.grad(loss, list(model.parameters()))
    with torch.no_grad():
        got_loss, got = loss_and_grads(model, _params(model), x, y)
    torch.testing.assert_close(got_loss, loss.detach())
    for e, (name, g) in zip(expected, got.items()):
        torch.testing.assert_close(g, e, msg=name)


def test_checkpoint_recomputes_in_the_forward_mode_with_batch_norm():
    """Inner steps in train mode (batch statistics, running statistics updated once per step), outer loss in eval
    mode (running statistics): "checkpoint" recomputes in train mode and leaves the running statistics as
    "graph" does."""
    torch.manual_seed(0)
    model = create_model("convnet_bn", channels=1, num_classes=3, image_size=8, width=4).double()
    start_buffers = {k: b.clone() for k, b in model.named_buffers()}
    x, y, _ = _data(n=9, classes=3)
    x.requires_grad_(True)
    idx = _batches(3, 9, 6)
    grads, stats = {}, {}
    for mode in ("graph", "checkpoint"):
        with torch.no_grad():
            for k, b in model.named_buffers():
                b.copy_(start_buffers[k])
        model.train()
        out = unroll_sgd(model, _params(model), lambda i, xs, ys: (xs[idx[i]], ys[idx[i]]), (x, y), 0.1, 3,
                         mode=mode)
        model.eval()
        loss = F.cross_entropy(torch.func.functional_call(model, out, (x.detach(),)), y)
        grads[mode] = torch.autograd.grad(loss, x)[0]
        stats[mode] = {k: b.clone() for k, b in model.named_buffers()}
    assert model.training is False  # the caller's mode is back after the backward
    torch.testing.assert_close(grads["checkpoint"], grads["graph"], rtol=1e-10, atol=1e-12)
    for k in stats["graph"]:
        torch.testing.assert_close(stats["checkpoint"][k], stats["graph"][k], rtol=0, atol=0)
        assert not torch.equal(stats["graph"][k], start_buffers[k]), f"{k} was not updated: the test shows nothing"
