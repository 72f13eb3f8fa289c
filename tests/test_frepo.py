"""FRePo: the LAMB optimiser, the KRR objective against a direct float64 computation, the model pool (staggered
counters, resets, frozen kernel networks), exact resume, learning on digits, and the ``frepo`` evaluation
protocol (schedule, step budget, centred targets, CLI)."""
from __future__ import annotations

import math

import pytest
import torch

from ddkit.engine import distill, make_generator
from ddkit.errors import ConfigError, DivergenceError
from ddkit.evaluation import EvalProtocol, evaluate, train_model
from ddkit.evaluation.protocol import frepo_steps, training_length, warmup_cosine
from ddkit.methods import create_distiller
from ddkit.methods.frepo import (
    REGRESSION_LABELS,
    FRePoConfig,
    FRePoDistiller,
    Lamb,
    cosine_decay,
    label_margin_loss,
    official_flip,
)
from ddkit.synthetic import SyntheticSet


def _syn(real, ipc: int = 1, seed: int = 0, dtype=torch.float32) -> SyntheticSet:
    syn = SyntheticSet.from_real(real, ipc, make_generator(seed, "init"), soft_labels=True, learn_labels=True)
    return syn.to(dtype)


def _small(**kw) -> FRePoConfig:
    """A few tiny pool networks and a small real batch: milliseconds per step on digits."""
    options = dict(model="convnet_w32", batch_real=64, num_models=3, max_online_updates=4, lr_img=0.01)
    options.update(kw)
    return FRePoConfig(**options)


# ------------------------------------------------------------------------------------------------ optimiser
def test_lamb_matches_optax_formula():
    """Three steps of Lamb equal optax.lamb's chain (scale_by_adam, trust ratio per tensor, -lr), in float64;
    a zero tensor takes the plain Adam step (trust ratio 1)."""
    g = torch.Generator().manual_seed(0)
    p = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = Lamb([p, z], lr=0.05)
    ref_p, ref_z = p.detach().clone(), z.detach().clone()
    m = [torch.zeros_like(ref_p), torch.zeros_like(ref_z)]
    v = [torch.zeros_like(ref_p), torch.zeros_like(ref_z)]
    for t in range(1, 4):
        grads = [torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)]
        p.grad, z.grad = grads[0].clone(), grads[1].clone()
        opt.step()
        refs = [ref_p, ref_z]
        for i, (ref, grad) in enumerate(zip(refs, grads)):
            m[i] = 0.9 * m[i] + 0.1 * grad
            v[i] = 0.999 * v[i] + 0.001 * grad**2
            u = (m[i] / (1 - 0.9**t)) / ((v[i] / (1 - 0.999**t)).sqrt() + 1e-6)
            pn, un = ref.norm(), u.norm()
            ratio = 1.0 if float(pn) == 0.0 or float(un) == 0.0 else pn / un
            refs[i] = ref - 0.05 * ratio * u
        ref_p, ref_z = refs
        torch.testing.assert_close(p.detach(), ref_p, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(z.detach(), ref_z, rtol=1e-12, atol=1e-12)
    # the trust ratio makes the step of a tensor lr * ||p|| long, whatever the gradient's scale
    q = torch.randn(100, generator=g, dtype=torch.float64, requires_grad=True)
    before = q.detach().clone()
    q.grad = 1e3 * torch.randn(100, generator=g, dtype=torch.float64)
    Lamb([q], lr=0.01).step()
    assert math.isclose(float((q.detach() - before).norm()), 0.01 * float(before.norm()), rel_tol=1e-9)


def test_lamb_rejects_bad_settings():
    with pytest.raises(ConfigError, match="betas"):
        Lamb([torch.zeros(1, requires_grad=True)], betas=(1.0, 0.999))


def test_schedules():
    assert cosine_decay(0, 100, 3e-4, 0.1) == pytest.approx(3e-4)
    assert cosine_decay(50, 100, 3e-4, 0.1) == pytest.approx(3e-4 * (0.9 * 0.5 + 0.1))
    assert cosine_decay(100, 100, 3e-4, 0.1) == pytest.approx(3e-5)
    assert cosine_decay(500, 100, 3e-4, 0.1) == pytest.approx(3e-5)  # optax stays at alpha after decay_steps
    kw = dict(lr=3e-4, warmup=500, total=1000, final_ratio=0.01)
    assert warmup_cosine(0, **kw) == 0.0
    assert warmup_cosine(250, **kw) == pytest.approx(1.5e-4)
    assert warmup_cosine(500, **kw) == pytest.approx(3e-4)
    assert warmup_cosine(750, **kw) == pytest.approx(3e-4 * (0.99 * 0.5 + 0.01))
    assert warmup_cosine(1000, **kw) == pytest.approx(3e-6)


# ------------------------------------------------------------------------------------------------ objective
def test_labels_start_centred_and_scaled(digits):
    syn = _syn(digits)
    d = FRePoDistiller(_small())
    d.setup(digits, syn, make_generator(0, "t"))
    expected = torch.nn.functional.one_hot(torch.arange(10), 10).float() - 0.1  # sqrt(10/10) = 1
    torch.testing.assert_close(syn.labels.detach(), expected)
    assert syn.meta["label_kind"] == REGRESSION_LABELS
    d.setup(digits, syn, make_generator(0, "t"))  # a second setup (resume) does not centre twice
    torch.testing.assert_close(syn.labels.detach(), expected)


def test_loss_equals_direct_float64_krr(digits):
    """loss == 0.5 * sum_k (K_ts (K_ss + reg tr/n I)^-1 Y_s - Y_t)^2 averaged + label margin, with the same
    draws; its image and label gradients equal the direct formula's; the pool network gets no gradient."""
    syn = _syn(digits, ipc=2, dtype=torch.float64)
    d = FRePoDistiller(_small(flip=True, reg=1e-3))  # well conditioned: gradients comparable at 1e-5
    gen = make_generator(0, "t")
    d.setup(digits, syn, gen)
    with torch.no_grad():
        syn.labels.add_(0.05 * torch.randn(syn.labels.shape, generator=torch.Generator().manual_seed(1),
                                           dtype=torch.float64))
    state = gen.get_state()
    loss, metrics = d.loss(1, digits, syn, gen)
    image_grad, label_grad = torch.autograd.grad(loss, [syn.images, syn.labels])

    replay = torch.Generator()
    replay.set_state(state)
    index = torch.randperm(digits.train_images.shape[0], generator=replay)[:64]
    net = d.pool[d.current].net.eval()
    x = torch.cat([syn.images, syn.images.flip(-1)])
    y = torch.cat([syn.labels, syn.labels])
    f_t = net.features(digits.train_images[index].double()).detach()
    f_s = net.features(x)
    k_ss = f_s @ f_s.T
    system = k_ss + 1e-3 * torch.trace(k_ss) / k_ss.shape[0] * torch.eye(k_ss.shape[0], dtype=torch.float64)
    pred = f_t @ f_s.T @ torch.linalg.inv(system) @ y
    y_t = torch.nn.functional.one_hot(digits.train_labels[index], 10).double() - 0.1
    top = syn.labels.topk(2, dim=1).values
    direct = 0.5 * ((pred - y_t) ** 2).sum(1).mean() - (top[:, 0] - top[:, 1]).clamp_max(0.1).mean()
    torch.testing.assert_close(loss, direct, rtol=1e-7, atol=1e-9)
    direct_image_grad, direct_label_grad = torch.autograd.grad(direct, [syn.images, syn.labels])
    torch.testing.assert_close(image_grad, direct_image_grad, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(label_grad, direct_label_grad, rtol=1e-5, atol=1e-9)
    assert all(p.grad is None for member in d.pool for p in member.net.parameters())
    assert all(p.requires_grad for member in d.pool for p in member.net.parameters())
    assert metrics["label_loss"] == pytest.approx(float(label_margin_loss(syn.labels.detach())))


def test_singular_solve_is_reported_not_nan(digits):
    """Identical support images with no ridge cannot be solved: a DivergenceError, and the images stay finite."""
    syn = _syn(digits, ipc=1)
    with torch.no_grad():
        syn.images.copy_(syn.images[:1].expand_as(syn.images))
    d = FRePoDistiller(_small(reg=0.0))
    with pytest.raises(DivergenceError, match="positive definite|non-finite"):
        distill(d, digits, syn, iterations=1, seed=0)
    assert bool(torch.isfinite(syn.images).all())


def test_out_of_memory_names_the_settings(digits, monkeypatch):
    syn = _syn(digits)
    d = FRePoDistiller(_small())
    d.setup(digits, syn, make_generator(0, "t"))

    def exhausted(x):
        raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1 GB")

    monkeypatch.setattr(d.pool[d.current].net, "features", exhausted)
    with pytest.raises(ConfigError, match="method.real_chunk or method.batch_real"):
        d.loss(1, digits, syn, make_generator(0, "t"))


def test_learned_hard_labels_are_refused(digits):
    syn = SyntheticSet.from_real(digits, 1, make_generator(0, "init"), soft_labels=False, learn_labels=True)
    with pytest.raises(ConfigError, match="soft_labels"):
        FRePoDistiller(_small()).setup(digits, syn, make_generator(0, "t"))


def test_bad_options_are_refused(digits):
    for bad in ({"num_models": 0}, {"optimizer": "sgd"}, {"reg": -1.0}):
        with pytest.raises(ConfigError, match="frepo"):
            FRePoDistiller(_small(**bad)).setup(digits, _syn(digits), make_generator(0, "t"))


def test_official_flip_rule():
    assert not official_flip("fashion-mnist", 10) and not official_flip("digits", 1)
    assert official_flip("cifar10", 10) and official_flip("cifar100", 1)
    assert not official_flip("cifar100", 10)


# ------------------------------------------------------------------------------------------------ the pool
def test_pool_is_staggered_trained_and_reset(digits):
    syn = _syn(digits)
    d = FRePoDistiller(_small(num_models=3, max_online_updates=7))
    gen = make_generator(0, "t")
    d.setup(digits, syn, gen)
    assert [m.updates for m in d.pool] == [0, 2, 4]  # (max_online_updates // num_models) * i

    d.current = 1
    before = [p.detach().clone() for p in d.pool[1].net.parameters()]
    loss = d.update_pool(digits, syn, gen)
    assert loss is not None and d.pool[1].updates == 3
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, d.pool[1].net.parameters()))

    d.current = 2
    d.pool[2].updates = 8  # more than max_online_updates: the official `nn_step > max_online_updates`
    old = d.pool[2].net
    assert d.update_pool(digits, syn, gen) is None
    assert d.pool[2].updates == 0 and d.pool[2].net is not old
    assert len(d.pool[2].optimizer.state) == 0  # a fresh Adam


def test_batchnorm_pool_uses_flax_momentum(digits):
    d = FRePoDistiller(_small(model="convnet_bn"))
    d.setup(digits, _syn(digits), make_generator(0, "t"))
    norms = [m for m in d.pool[0].net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.momentum == 0.9 for m in norms)


def test_resume_equals_uninterrupted_run(digits, tmp_path):
    """4 iterations in one go == 2, checkpoint, then 2 more in a fresh process state (bit for bit on CPU)."""
    def fresh():
        return _syn(digits), FRePoDistiller(_small(model="convnet_bn", max_online_updates=2, num_models=2))

    syn_a, d_a = fresh()
    distill(d_a, digits, syn_a, iterations=4, seed=3)

    syn_b, d_b = fresh()
    distill(d_b, digits, syn_b, iterations=2, seed=3, checkpoint_dir=tmp_path, checkpoint_every=2)
    syn_c, d_c = fresh()
    distill(d_c, digits, syn_c, iterations=4, seed=3, checkpoint_dir=tmp_path, checkpoint_every=2, resume=True)

    assert torch.equal(syn_a.images, syn_c.images) and torch.equal(syn_a.labels, syn_c.labels)
    assert d_a.current == d_c.current
    for m_a, m_c in zip(d_a.pool, d_c.pool):
        assert m_a.updates == m_c.updates
        for (k, a), (_, c) in zip(m_a.net.state_dict().items(), m_c.net.state_dict().items()):
            assert torch.equal(a, c), k


def test_state_dict_is_a_copy(digits):
    syn = _syn(digits)
    d = FRePoDistiller(_small())
    distill(d, digits, syn, iterations=1, seed=0)
    state = d.state_dict()
    saved = state["pool"][0]["model"]
    first = next(iter(saved.values())).clone()
    distill(d, digits, syn, iterations=3, seed=1)
    assert torch.equal(next(iter(saved.values())), first)


def test_frepo_learns_on_digits(digits):
    """30 iterations (LAMB lr 0.03 instead of the official 3e-4, which needs ~1e5 steps) beat the real
    initialisation under the frepo protocol.  Measured (3 runs, 300 steps, no augmentation) on seeds 0/1:
    45.9 -> 76.6 and 39.2 -> 78.3 %."""
    protocol = EvalProtocol.named("frepo", runs=2, steps=200, dsa=False)
    base = SyntheticSet.from_real(digits, 1, make_generator(0, "init"))
    before = evaluate(base, digits, protocol, seed=0).summary()["convnet_nn"]["mean"]
    syn = _syn(digits)
    d = create_distiller("frepo", dataset="digits", ipc=1)
    d.config.batch_real, d.config.lr_img = 128, 0.03
    distill(d, digits, syn, iterations=30, seed=0)
    after = evaluate(syn, digits, protocol, seed=0).summary()["convnet_nn"]["mean"]
    assert after - before > 10.0, (before, after)


# ------------------------------------------------------------------------------------------ the protocol
def test_named_protocols():
    field = EvalProtocol.named("field")
    assert field == EvalProtocol()
    frepo = EvalProtocol.named("frepo", runs=2, epochs=None)
    assert (frepo.optimizer, frepo.schedule, frepo.targets, frepo.lr, frepo.weight_decay) == \
        ("adam", "warmup_cosine", "centred", 3e-4, 0.0)
    assert frepo.runs == 2 and frepo.models == ("convnet_nn",)
    with pytest.raises(ConfigError, match="unknown evaluation protocol"):
        EvalProtocol.named("frepoo")
    with pytest.raises(ConfigError, match="no field"):
        EvalProtocol.named("frepo", step=3)


def test_frepo_step_budget():
    assert frepo_steps(10) == 1000 and frepo_steps(100) == 2000 and frepo_steps(500) == 5000
    assert frepo_steps(50) == 2000 and frepo_steps(20000) == 40000  # ddkit's extension of the table
    p = EvalProtocol.named("frepo")
    assert training_length(p, 100) == (2000, 2000, 2000)  # one batch of min(N, 500) per step
    assert training_length(p, 1000) == (5000, 10000, 10000)  # two batches of 500 per epoch
    assert training_length(EvalProtocol(epochs=7), 300) == (7, None, 14)


def test_train_model_step_hooks():
    """``lr_at`` sets every step's rate and ``max_steps`` stops mid-epoch; without them nothing changes."""
    net = torch.nn.Linear(4, 3)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    seen = []
    opt = torch.optim.Adam(net.parameters(), lr=1.0)
    opt.register_step_pre_hook(lambda o, *_: seen.append(o.param_groups[0]["lr"]))
    train_model(net, x, y, epochs=5, lr=1.0, generator=torch.Generator().manual_seed(0), batch_size=4,
                optimizer=opt, lr_at=lambda s: 0.1 * s, max_steps=7)
    assert seen == pytest.approx([0.1 * s for s in range(7)])


def test_frepo_protocol_on_hard_labels_and_field_protocol_on_regression_labels(digits, monkeypatch):
    """Hard labels become centred targets under ``frepo``, FRePo's learned labels are regressed on as they are;
    the field's protocol trains with cross-entropy on the argmax class of regression labels."""
    import ddkit.evaluation.protocol as protocol_module

    seen = []
    monkeypatch.setattr(protocol_module, "train_and_test",
                        lambda name, images, labels, real, protocol, *a: seen.append((labels, protocol)) or 50.0)
    base = SyntheticSet.from_real(digits, 1, make_generator(0, "init"))
    evaluate(base, digits, EvalProtocol.named("frepo", runs=1), seed=0)
    labels, protocol = seen.pop()
    torch.testing.assert_close(labels, torch.nn.functional.one_hot(base.labels, 10).float() - 0.1)
    assert protocol.soft_label_loss == "half_sse"

    syn = _syn(digits)
    FRePoDistiller(_small()).setup(digits, syn, make_generator(0, "t"))
    with torch.no_grad():
        syn.labels.mul_(1.5)  # learned labels: no longer centred one-hot vectors
    evaluate(syn, digits, EvalProtocol.named("frepo", runs=1), seed=0)
    labels, protocol = seen.pop()
    assert torch.equal(labels, syn.labels.detach()) and protocol.soft_label_loss == "half_sse"
    evaluate(syn, digits, EvalProtocol(runs=1), seed=0)
    labels, protocol = seen.pop()
    assert torch.equal(labels, torch.arange(10)) and not labels.is_floating_point()


def test_bad_protocol_values():
    from ddkit.evaluation.protocol import check_protocol

    for bad in ({"optimizer": "lamb"}, {"schedule": "cosine"}, {"steps": 0}, {"targets": "onehot"}):
        with pytest.raises(ConfigError, match="EvalProtocol"):
            check_protocol(EvalProtocol(**bad))


def test_cli_evaluate_protocol_frepo(digits, tmp_path, capsys):
    from ddkit.cli import main

    syn = _syn(digits)
    FRePoDistiller(_small()).setup(digits, syn, make_generator(0, "t"))
    syn.meta.update({"method": "frepo", "ipc": 1})
    syn.save(tmp_path / "run")
    assert main(["evaluate", str(tmp_path / "run"), "--protocol", "frepo", "--runs", "1", "--steps", "20",
                 "--no-dsa", "--device", "cpu", "--json", str(tmp_path / "r.json")]) == 0
    import json

    result = json.loads((tmp_path / "r.json").read_text())
    assert result["protocol"]["name"] == "frepo" and result["protocol"]["steps"] == 20
    assert result["protocol"]["models"] == ["convnet_nn"]
    assert main(["evaluate", str(tmp_path / "run"), "--protocol", "nope"]) != 0
