"""The torch.compile lever: option resolution and the eager fallback (compiled numerics: test_dm.py)."""
import pytest
import torch

from ddkit.accel import SpeedLayer
from ddkit.accel.compiled import (
    COMPILE_MIN_PIXEL_STEPS,
    ChunkedForward,
    CompiledOrEager,
    cpu_chunk,
    even_chunk,
    forward_of,
    train_chunk,
)
from ddkit.errors import ConfigError
from ddkit.models import create_model

CPU = torch.device("cpu")


def test_one_rule_compiles_only_long_float32_cpu_runs_under_auto():
    auto = SpeedLayer("auto", CPU)
    assert auto.levers and auto.compiles(COMPILE_MIN_PIXEL_STEPS)
    assert not auto.compiles(COMPILE_MIN_PIXEL_STEPS - 1)
    assert not auto.compiles(1e12, torch.float64)
    assert not SpeedLayer("plain", CPU).compiles(1e12)
    cuda = SpeedLayer("auto", torch.device("cuda"))  # no lever measured on CUDA yet: plain modules there
    assert not cuda.levers and not cuda.compiles(1e12)
    assert SpeedLayer("auto", CPU, compile=True).compiles(0, torch.float64)  # benchmarks/tests force it
    assert not SpeedLayer("auto", CPU, compile=False).compiles(1e12)


def test_unknown_speed_is_a_config_error():
    with pytest.raises(ConfigError, match="auto, plain"):
        SpeedLayer("fast", CPU)


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken_compile(fn, **kwargs):
        def compiled(x):
            raise torch._inductor.exc.InductorError(RuntimeError("no C++ compiler"), None)
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    f = CompiledOrEager(lambda x: x * 2)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        assert torch.equal(f(torch.ones(2)), torch.full((2,), 2.0))
    assert not f.enabled
    assert torch.equal(f(torch.ones(2)), torch.full((2,), 2.0))  # no second warning needed: eager from now on


def test_errors_of_the_computation_are_not_taken_for_compiler_failures(monkeypatch):
    """An out-of-memory or shape error propagates (it would fail eagerly too); compilation stays on."""
    def oom_compile(fn, **kwargs):
        def compiled(x):
            raise torch.OutOfMemoryError("CPU out of memory")
        return compiled

    monkeypatch.setattr(torch, "compile", oom_compile)
    f = CompiledOrEager(lambda x: x * 2)
    with pytest.raises(torch.OutOfMemoryError):
        f(torch.ones(2))
    assert f.enabled


def test_chunk_sizes_split_batches_evenly_where_they_can():
    assert even_chunk(256, 16) == 16
    assert even_chunk(100, 16) == 10  # ten equal passes: one compiled graph shape, not 16 + 4
    assert even_chunk(97, 16) == 16  # a prime: the remainder pass it is
    assert even_chunk(12, 16) == 12
    assert cpu_chunk((1, 28, 28), CPU) == 16 and cpu_chunk((1, 8, 8), CPU) == 196
    assert cpu_chunk((3, 32, 32), torch.device("meta")) is None
    # compiled training passes take chunks about twice the eager size; accelerators whole batches
    assert train_chunk((1, 28, 28), CPU, compiled=True) == 32 and train_chunk((1, 28, 28), CPU, compiled=False) == 16
    assert train_chunk((1, 28, 28), torch.device("meta"), compiled=True) is None


def test_chunked_forward_is_the_same_function_and_skips_batchnorm():
    torch.manual_seed(0)
    net = create_model("convnet_w32", channels=1, num_classes=10, image_size=(8, 8)).double()
    x = torch.randn(10, 1, 8, 8, dtype=torch.float64)
    fwd = forward_of(net, compiled=False, chunk=3)
    assert isinstance(fwd, ChunkedForward)
    torch.testing.assert_close(fwd(x), net(x), rtol=1e-12, atol=1e-12)
    calls = []
    counted = ChunkedForward(lambda t: calls.append(t.shape[0]) or t, 4)
    counted(torch.zeros(4, 1)), counted(torch.zeros(12, 1))
    assert calls == [4, 4, 4, 4]  # whole up to one chunk, then chunks
    bn = create_model("convnet_bn", channels=1, num_classes=10, image_size=(8, 8))
    assert forward_of(bn, compiled=False, chunk=3) is bn  # batch statistics need the whole batch
    compiled = forward_of(net, compiled=True, chunk=3)  # chunks of the compiled forward (not called here)
    assert isinstance(compiled, ChunkedForward) and isinstance(compiled.fn, CompiledOrEager)
    assert isinstance(forward_of(bn, compiled=True, chunk=3), CompiledOrEager)


def test_a_planned_run_decides_compilation_not_the_method_default_budget():
    """The engine states the run's length (plan_run); a method's config.iterations is only the fallback."""
    per_iteration = COMPILE_MIN_PIXEL_STEPS / 100
    speed = SpeedLayer("auto", CPU)
    assert speed.compiles_run(per_iteration, torch.float32, default_iterations=20000)
    speed.plan_run(30)
    assert not speed.compiles_run(per_iteration, torch.float32, default_iterations=20000)
    speed.plan_run(100)
    assert speed.compiles_run(per_iteration, torch.float32, default_iterations=1)
