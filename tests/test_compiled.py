"""The torch.compile lever: option resolution and the eager fallback (compiled numerics: test_dm.py)."""
import pytest
import torch

from ddkit.errors import ConfigError
from ddkit.functional.compiled import CompiledOrEager, resolve_compile

CPU = torch.device("cpu")


def test_auto_compiles_only_long_float32_cpu_runs():
    assert resolve_compile("auto", CPU, torch.float32, long_run=True)
    assert not resolve_compile("auto", CPU, torch.float32, long_run=False)
    assert not resolve_compile("auto", CPU, torch.float64, long_run=True)
    assert not resolve_compile("auto", torch.device("meta"), torch.float32, long_run=True)
    assert resolve_compile("ON", CPU, torch.float64, long_run=False)
    assert not resolve_compile("off", CPU, torch.float32, long_run=True)


def test_unknown_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="auto, on, off"):
        resolve_compile("fast", CPU, torch.float32, long_run=True)


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken_compile(fn, **kwargs):
        def compiled(x):
            raise RuntimeError("no C++ compiler")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    f = CompiledOrEager(lambda x: x * 2)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        assert torch.equal(f(torch.ones(2)), torch.full((2,), 2.0))
    assert not f.enabled
    assert torch.equal(f(torch.ones(2)), torch.full((2,), 2.0))  # no second warning needed: eager from now on


def test_dc_rejects_an_unknown_compile_mode(digits):
    from ddkit.engine import make_generator
    from ddkit.methods.dc import DCConfig, DCDistiller
    from ddkit.synthetic import SyntheticSet

    syn = SyntheticSet.from_real(digits, 1, make_generator(0, "init"))
    with pytest.raises(ConfigError, match="compile"):
        DCDistiller(DCConfig(compile="fastest")).setup(digits, syn, make_generator(0))
