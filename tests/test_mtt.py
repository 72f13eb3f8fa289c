"""Trajectory matching: MTT, FTD and DDPP.

- each learns on digits at IPC 1 from a few tiny experts (the contract budget's store and settings);
- the default gradient ("checkpoint", memory flat in syn_steps) equals the official unrolled graph in float64,
  for the images and the learned step size, and uses a bounded number of saved activations;
- a store that does not match the run, or is too short, is refused naming what differs;
- an MTT run and an FTD run (raw images + moving average) resume exactly; the learned lr stays positive and is
  what ``evaluate`` trains with; a non-finite loss stops the run with the images untouched.
"""
from __future__ import annotations

import pytest
import torch

import ddkit
from ddkit.engine import make_generator
from ddkit.errors import ConfigError, DivergenceError
from ddkit.evaluation import EvalProtocol, evaluate
from ddkit.experts import ExpertConfig, train_experts
from ddkit.methods import create_distiller
from ddkit.methods.ddpp import match_mask
from ddkit.methods.mtt import MTT, MTTConfig
from ddkit.synthetic import SyntheticSet

from method_budgets import BUDGETS  # the contract budgets: one source for the cheap expert stores and settings

#: the contract tests' "learns" evaluation
PROTOCOL = EvalProtocol(runs=3, epochs=100, dsa=False)


def _options(name: str, tmp_path, digits, **extra) -> dict:
    budget = BUDGETS[name]
    return {**budget.options, **budget.prepare(tmp_path, digits), **extra}


def _distiller(name: str, options: dict, real, syn, seed: int = 0):
    from ddkit.api import method_config

    d = create_distiller(name, method_config(name, real.name, 1, options))
    d.setup(real, syn, make_generator(seed, "setup"))
    return d


def _syn(real, dtype=torch.float32) -> SyntheticSet:
    return SyntheticSet.from_real(real, 1, make_generator(0, "init")).to(dtype)


@pytest.fixture(scope="module")
def random_accuracy(digits) -> float:
    syn = ddkit.distill(digits, "random", ipc=1, seed=0, device="cpu")
    return evaluate(syn, digits, PROTOCOL, seed=0).summary()["convnet"]["mean"]


@pytest.mark.parametrize("name", ["mtt", "ftd", "ddpp"])
def test_learns_on_digits(name, digits, tmp_path, random_accuracy):
    budget = BUDGETS[name]
    syn = ddkit.distill(digits, name, ipc=1, iterations=budget.iterations, seed=0, device="cpu",
                        **_options(name, tmp_path, digits))
    assert syn.learned_lr is not None and syn.learned_lr > 0
    report = evaluate(syn, digits, PROTOCOL, seed=0)
    assert report.protocol["lr_used"] == syn.learned_lr  # the distilled step size is what evaluation trains with
    ours = report.summary()["convnet"]["mean"]
    assert ours >= random_accuracy + 3.0, f"{name}: {ours:.2f} % vs random real images {random_accuracy:.2f} %"


# ---------------------------------------------------------------------------------------------- exact gradient
@pytest.mark.parametrize("name", ["mtt", "ddpp"])
def test_checkpoint_gradient_equals_the_unrolled_graph(name, digits, tmp_path):
    """float64: the default's image and step-size gradients equal the official all-in-one graph's."""
    base = _options(name, tmp_path, digits, syn_steps=4, batch_syn=4, max_start_epoch=3)
    grads = {}
    for mode in ("checkpoint", "graph"):
        syn = _syn(digits, torch.float64)
        d = _distiller(name, {**base, "grad_mode": mode}, digits, syn)
        gen = make_generator(0, "step")
        loss, _ = d.loss(1, digits, syn, gen)
        loss.backward()
        grads[mode] = (loss.detach(), syn.images.grad.clone(), syn.extras["lr"].grad.clone())
    (l1, gi1, gl1), (l2, gi2, gl2) = grads["checkpoint"], grads["graph"]
    assert gi1.abs().max() > 0 and gl1.abs() > 0
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gi1, gi2, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(gl1, gl2, rtol=1e-9, atol=1e-14)


def test_checkpoint_keeps_activations_independent_of_syn_steps(digits, tmp_path):
    """Bytes the loss's graph holds for backward once it is built: flat in syn_steps for "checkpoint" (only the
    parameter trajectory grows, one parameter copy per step), growing with syn_steps for "graph"."""
    import weakref

    def held_bytes(mode: str, steps: int) -> int:
        syn = _syn(digits)
        d = _distiller("mtt", _options("mtt", tmp_path, digits, syn_steps=steps, grad_mode=mode), digits, syn)
        refs = []

        def pack(t):
            refs.append(weakref.ref(t))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = d.loss(1, digits, syn, make_generator(0, "step"))
        alive = {}
        for r in refs:
            t = r()
            if t is not None:
                alive[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        assert loss.requires_grad
        return sum(alive.values())

    net = _distiller("mtt", _options("mtt", tmp_path, digits), digits, _syn(digits)).net
    params = sum(p.numel() * p.element_size() for p in net.parameters())
    ck = {s: held_bytes("checkpoint", s) for s in (2, 8)}
    gr = {s: held_bytes("graph", s) for s in (2, 8)}
    assert ck[8] - ck[2] <= 6 * params * 1.01  # six more parameter copies, nothing else
    assert gr[8] - gr[2] > 5 * (ck[8] - ck[2])


# ---------------------------------------------------------------------------------------------- store checks
def test_mismatched_or_short_store_is_refused(digits, tmp_path):
    options = _options("mtt", tmp_path, digits)
    syn = _syn(digits)
    with pytest.raises(ConfigError, match="does not match this run: it was trained with model 'convnet_w32'.*"
                                          "this run: 'mlp'"):
        _distiller("mtt", {**options, "model": "mlp"}, digits, syn)
    with pytest.raises(ConfigError, match="too short: its trajectories have 5 epochs, this run reads up to epoch 6"):
        _distiller("mtt", {**options, "max_start_epoch": 5}, digits, syn)
    zca = ddkit.load_dataset("digits", zca=True)
    with pytest.raises(ConfigError, match="preprocessing: mean/std normalisation \\(this run: ZCA"):
        _distiller("mtt", options, zca, _syn(zca))
    with pytest.raises(ConfigError, match="needs an expert store: pass --experts DIR"):
        _distiller("mtt", {**options, "experts": None}, digits, syn)
    other = train_experts(digits, ExpertConfig(model="mlp", epochs=1, test_every_epoch=False), tmp_path / "mlp", 1)
    with pytest.raises(ConfigError, match="model 'mlp'.*this run: 'convnet_w32'"):
        _distiller("mtt", {**options, "experts": str(other.root)}, digits, syn)


def test_official_defaults_per_setting():
    cfg = MTT.default_config("cifar10", 1)
    assert (cfg.syn_steps, cfg.expert_epochs, cfg.max_start_epoch, cfg.lr_img, cfg.lr_lr, cfg.lr_teacher) == \
        (50, 2, 2, 100.0, 1e-7, 0.01)
    assert MTT.default_config("cifar100", 50).batch_syn == 125
    assert MTT.default_config("fashion-mnist", 10) == MTTConfig()  # no official row: distill.py's defaults
    ftd = create_distiller("ftd", dataset="cifar100", ipc=10).config
    assert (ftd.max_start_epoch, ftd.ema_decay) == (40, 0.9995)
    assert create_distiller("ddpp").config.beta == 0.1


# ---------------------------------------------------------------------------------------------- resume, lr, NaN
@pytest.mark.parametrize("name", ["mtt", "ftd"])
def test_run_resumes_exactly(name, digits, tmp_path):
    options = _options(name, tmp_path, digits, syn_steps=3)
    straight = ddkit.distill(digits, name, ipc=1, iterations=4, seed=5, device="cpu", **options)
    out = tmp_path / "run"
    ddkit.distill(digits, name, ipc=1, iterations=2, seed=5, device="cpu", out_dir=out, checkpoint_every=1, **options)
    resumed = ddkit.distill(digits, name, ipc=1, iterations=4, seed=5, device="cpu", out_dir=out, resume=True,
                            checkpoint_every=1, **options)
    assert torch.equal(straight.images, resumed.images)
    assert straight.learned_lr == resumed.learned_lr


def test_ftd_saves_the_moving_average_of_the_raw_images(digits, tmp_path):
    options = _options("ftd", tmp_path, digits, syn_steps=2, ema_decay=0.5)
    syn = _syn(digits)
    start = syn.images.detach().clone()
    d = _distiller("ftd", options, digits, syn)
    d.step(1, digits, syn, make_generator(0, "step"))
    raw = d.state_dict()["raw_images"]
    assert not torch.equal(raw, start)
    torch.testing.assert_close(syn.images.detach(), 0.5 * start + 0.5 * raw)


def test_learned_lr_stays_positive(digits, tmp_path):
    floor = 2.0 ** -12  # exact in float32
    options = _options("mtt", tmp_path, digits, syn_steps=3, lr_lr=10.0, min_lr=floor)
    syn = _syn(digits)
    d = _distiller("mtt", options, digits, syn)
    seen = [d.step(it, digits, syn, make_generator(it, "step")) for it in range(1, 4)]
    assert any(m["lr_clamped"] for m in seen)  # plain SGD would have made it negative (mtt-distillation#16)
    assert min(m["lr"] for m in seen) >= floor and syn.learned_lr >= floor


def test_non_finite_loss_stops_with_the_images_untouched(digits, tmp_path, monkeypatch):
    options = _options("mtt", tmp_path, digits, syn_steps=2)
    out = tmp_path / "run"
    calls = {"n": 0}
    original = MTT.distance

    def poisoned(self, final, start, target):
        calls["n"] += 1
        num, den, extra = original(self, final, start, target)
        return (num * float("nan") if calls["n"] == 3 else num), den, extra

    monkeypatch.setattr(MTT, "distance", poisoned)
    with pytest.raises(DivergenceError, match="loss became nan at iteration 3; the last good checkpoint "
                                              "\\(iteration 2\\) is kept"):
        ddkit.distill(digits, "mtt", ipc=1, iterations=5, seed=0, device="cpu", out_dir=out, checkpoint_every=1,
                      **options)
    # the failed iteration applied nothing: the set equals a clean two-iteration run
    monkeypatch.setattr(MTT, "distance", original)
    clean = ddkit.distill(digits, "mtt", ipc=1, iterations=2, seed=0, device="cpu", **options)
    from ddkit.engine.checkpoint import load_checkpoint

    state = load_checkpoint(out)
    assert torch.equal(state["syn"]["images"], clean.images.detach())


# ---------------------------------------------------------------------------------------------- DDPP's rule
def test_ddpp_mask_and_beta_zero_is_mtt(digits, tmp_path):
    final = torch.tensor([1.0, 1.0, -0.5, 0.0, 0.01, 2.0])
    target = torch.tensor([1.0, -1.0, 0.5, 0.0, 1.0, 1.0])
    # similarity 1 - |a-b|/(|a|+|b|): 1, 0 (opposite signs), 0, (both zero: kept), 0.0198, 0.667
    assert match_mask(final, target, 0.1).tolist() == [True, False, False, True, False, True]
    assert match_mask(final, target, 0.0).all()
    losses = {}
    for name, extra in (("mtt", {}), ("ddpp", {"beta": 0.0})):
        syn = _syn(digits)
        d = _distiller(name, _options("mtt", tmp_path, digits, syn_steps=3, **extra), digits, syn)
        losses[name] = d.step(1, digits, syn, make_generator(0, "step"))["loss"], syn.images.detach().clone()
    assert losses["mtt"][0] == losses["ddpp"][0] and torch.equal(losses["mtt"][1], losses["ddpp"][1])
    syn = _syn(digits)
    d = _distiller("ddpp", _options("mtt", tmp_path, digits, syn_steps=3), digits, syn)
    metrics = d.step(1, digits, syn, make_generator(0, "step"))
    assert 0.0 < metrics["pruned"] < 0.1  # "a few" parameters


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_distill_with_experts(digits, tmp_path, capsys):
    from ddkit.cli import main

    experts = _options("mtt", tmp_path, digits)["experts"]

    def args(method: str, out: str, max_start: int = 3) -> list[str]:
        return ["distill", "--method", method, "--dataset", "digits", "--ipc", "1", "--iterations", "2", "--out",
                str(tmp_path / out), "--experts", experts, "--device", "cpu", "--no-progress",
                "--set", "method.model=convnet_w32", "--set", "method.syn_steps=2",
                "--set", f"method.max_start_epoch={max_start}", "--set", "method.expert_epochs=2"]

    assert main(args("mtt", "run")) == 0
    syn = SyntheticSet.load(tmp_path / "run")
    assert syn.learned_lr is not None and syn.meta["config"]["experts"] == experts
    assert main(args("mtt", "short", max_start=9)) == 2
    assert "too short" in capsys.readouterr().err
    assert main(["distill", "--method", "dm", "--dataset", "digits", "--ipc", "1", "--iterations", "1", "--out",
                 str(tmp_path / "dm"), "--experts", experts, "--no-progress"]) == 2
    assert "--experts is for trajectory-matching methods" in capsys.readouterr().err
