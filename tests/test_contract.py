"""Contract tests over the method registry: every registered method, present and future, gets them for free.

- it has a cheap budget (``tests/method_budgets.py``);
- it *learns*: its digits IPC-1 set beats random real images of the same IPC on the held-out test split, under
  the same seeded evaluation (not only its own initialisation);
- a run interrupted after a checkpoint and resumed equals an uninterrupted run bit for bit (CPU);
- its ``state_dict`` survives a round trip into a fresh distiller;
- ``speed=plain`` (the official modules, nothing compiled or chunked) gives the default's result up to float
  rounding.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import torch

import ddkit
from ddkit.engine import make_generator
from ddkit.evaluation import EvalProtocol, evaluate
from ddkit.methods import METHODS, create_distiller
from ddkit.synthetic import SyntheticSet

from method_budgets import BUDGETS, MethodBudget  # tests/ is on sys.path (pytest's rootdir insertion)

#: the evaluation every "learns" comparison uses: 3 ConvNets x 100 epochs, no augmentation (digits, seconds)
PROTOCOL = EvalProtocol(runs=3, epochs=100, dsa=False)
METHOD_NAMES = METHODS.names()


def _budget(name: str) -> MethodBudget:
    if name not in BUDGETS:
        pytest.fail(f"method {name!r} has no entry in tests/method_budgets.py")
    return BUDGETS[name]


def _options(name: str, tmp_path: Path, real: Any, quick: bool = False) -> dict[str, Any]:
    budget = _budget(name)
    options = dict(budget.options)
    if quick:
        options.update(budget.quick_options)
    if budget.prepare is not None:
        options.update(budget.prepare(tmp_path, real))
    return options


@lru_cache(maxsize=None)
def _random_real_accuracy(ipc: int) -> float:
    real = ddkit.load_dataset("digits")
    syn = ddkit.distill(real, "random", ipc=ipc, seed=0, device="cpu")
    return evaluate(syn, real, PROTOCOL, seed=0).summary()["convnet"]["mean"]


def test_every_method_has_a_budget():
    missing = sorted(set(METHOD_NAMES) - set(BUDGETS))
    assert not missing, f"add these methods to tests/method_budgets.py: {missing}"
    assert not sorted(set(BUDGETS) - set(METHOD_NAMES)), "budgets of methods that are not registered"


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_learns_on_digits(name, digits, tmp_path):
    """The IPC-1 set beats random real images of the same IPC (same evaluation, same seeds)."""
    budget = _budget(name)
    syn = ddkit.distill(digits, name, ipc=1, iterations=budget.iterations, seed=0, device="cpu",
                        **_options(name, tmp_path, digits))
    assert torch.isfinite(syn.images).all()
    ours = evaluate(syn, digits, PROTOCOL, seed=0).summary()["convnet"]["mean"]
    baseline = _random_real_accuracy(1)
    assert ours >= baseline + budget.margin, f"{name}: {ours:.2f} % vs random real images {baseline:.2f} %"


def _quick_iterations(name: str) -> int:
    return max(2, min(_budget(name).iterations, 3))


@pytest.mark.parametrize("name", [n for n in METHOD_NAMES if n not in BUDGETS or not BUDGETS[n].selects_only])
def test_resume_is_exact(name, digits, tmp_path):
    """Stopped after a checkpoint and resumed: the same images (and labels, learned lr) as one straight run."""
    options = _options(name, tmp_path / "prep", digits, quick=True)
    total = _quick_iterations(name)
    straight = ddkit.distill(digits, name, ipc=1, iterations=total, seed=3, device="cpu", **options)
    out = tmp_path / "run"
    ddkit.distill(digits, name, ipc=1, iterations=total - 1, seed=3, device="cpu", out_dir=out,
                  checkpoint_every=1, **options)
    resumed = ddkit.distill(digits, name, ipc=1, iterations=total, seed=3, device="cpu", out_dir=out,
                            resume=True, checkpoint_every=1, **options)
    assert torch.equal(straight.images, resumed.images)
    assert torch.equal(straight.labels, resumed.labels)
    assert straight.learned_lr == resumed.learned_lr


def _assert_same_state(a: Any, b: Any, where: str = "state") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for key in a:
            _assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("name", [n for n in METHOD_NAMES if n not in BUDGETS or not BUDGETS[n].selects_only])
def test_state_dict_round_trip(name, digits, tmp_path):
    """After one step, a fresh distiller loaded with the state dict has the same state and takes the same step."""
    from ddkit.api import method_config

    options = _options(name, tmp_path, digits, quick=True)

    def fresh() -> tuple[Any, SyntheticSet]:
        cfg = method_config(name, digits.name, 1, options)
        cfg.iterations = 2
        d = create_distiller(name, cfg)
        syn = SyntheticSet.from_real(digits, 1, make_generator(0, "init"), init=cfg.init,
                                     soft_labels=cfg.soft_labels, learn_labels=cfg.learn_labels)
        d.setup(digits, syn, make_generator(0, "setup"))
        return d, syn

    first, syn = fresh()
    first.step(1, digits, syn, make_generator(1, "step"))
    second, syn2 = fresh()
    syn2.load_state_dict(syn.state_dict())
    second.load_state_dict(first.state_dict())
    _assert_same_state(first.state_dict(), second.state_dict())
    first.step(2, digits, syn, make_generator(2, "step"))
    second.step(2, digits, syn2, make_generator(2, "step"))
    assert torch.equal(syn.images, syn2.images)


@pytest.mark.parametrize("name", ["dm", "dc", "cafe"])
def test_plain_speed_equals_the_default_up_to_rounding(name, digits, tmp_path):
    """``speed=plain`` runs the plain modules (no patch-statistics stage, no chunks, the official per-class
    loop) and reaches the default's images up to float rounding."""
    budget = _budget(name)
    options = _options(name, tmp_path, digits, quick=True)
    runs = {speed: ddkit.distill(digits, name, ipc=1, iterations=2, seed=0, device="cpu", speed=speed, **options)
            for speed in ("auto", "plain")}
    assert budget.iterations > 0
    torch.testing.assert_close(runs["auto"].images, runs["plain"].images, rtol=1e-3, atol=1e-4)


def test_speed_setting_swaps_modules_reversibly(digits):
    """auto on CPU swaps the patch-statistics first stage in; plain builds (and restores) the plain modules."""
    from torch import nn

    from ddkit.accel.patchnorm import ConvNormStage

    gen = make_generator(0, "net")
    auto = create_distiller("dm", speed="auto").new_network(digits, gen)
    plain = create_distiller("dm", speed="plain").new_network(digits, make_generator(0, "net"))
    assert isinstance(auto.stages[0], ConvNormStage)
    assert type(plain.stages[0]) is nn.Sequential and not any(isinstance(m, ConvNormStage) for m in plain.modules())
    assert list(auto.state_dict()) == list(plain.state_dict())
    x = digits.train_images[:4].double()
    torch.testing.assert_close(auto.double()(x), plain.double()(x), rtol=1e-9, atol=1e-9)


def test_cli_speed_plain_runs_plain_modules_and_matches_the_default(tmp_path):
    """``ddkit distill ... --set speed=plain`` records the setting and reaches the default's images up to float
    rounding (the DC/DSA per-class formulation differs between the two, so DSA is the stricter case)."""
    from ddkit.cli import main

    sets = {}
    for speed in ("auto", "plain"):
        out = tmp_path / speed
        assert main(["distill", "--method", "dsa", "--dataset", "digits", "--ipc", "1", "--iterations", "2",
                     "--out", str(out), "--no-progress", "--set", f"speed={speed}",
                     "--set", "method.model=convnet_w32", "--set", "method.batch_real=16"]) == 0
        assert f"speed: {speed}" in (out / "config.yaml").read_text()
        sets[speed] = SyntheticSet.load(out)
    torch.testing.assert_close(sets["auto"].images, sets["plain"].images, rtol=1e-3, atol=1e-4)
