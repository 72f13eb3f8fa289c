"""The shared KRR solve (``ddkit.functional.krr``) and the analytic infinite-width kernels (``kernels``)."""
from __future__ import annotations

import pytest
import torch

from ddkit.errors import ConfigError, DDKitError
from ddkit.functional.krr import SingularKernelError, centered_one_hot, krr_loss, krr_predict


def _random_kernels(n_s: int, n_t: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n_s, d, generator=g)
    xt = torch.randn(n_t, d, generator=g)
    return xt @ xs.T, xs @ xs.T, g


def test_centered_one_hot_hard_and_soft():
    y = centered_one_hot(torch.tensor([0, 2, 1]), 4)
    assert torch.allclose(y[0], torch.tensor([0.75, -0.25, -0.25, -0.25]))
    assert torch.allclose(y[1], torch.tensor([-0.25, -0.25, 0.75, -0.25]))
    assert torch.allclose(y.sum(1), torch.zeros(3))
    soft = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    assert torch.allclose(centered_one_hot(soft, 4), torch.tensor([[0.25, 0.25, -0.25, -0.25]]))
    with pytest.raises(ConfigError, match=r"\[0, 4\)"):
        centered_one_hot(torch.tensor([4]), 4)


def test_krr_predict_matches_direct_inverse():
    k_ts, k_ss, g = _random_kernels(12, 7, 20)
    y_s = centered_one_hot(torch.randint(0, 3, (12,), generator=g), 3)
    reg = 1e-3
    k64 = k_ss.double()
    lam = reg * torch.trace(k64) / 12
    direct = k_ts.double() @ torch.linalg.inv(k64 + lam * torch.eye(12, dtype=torch.float64)) @ y_s.double()
    pred = krr_predict(k_ts, k_ss, y_s, reg=reg)
    assert pred.dtype == torch.float32
    assert torch.allclose(pred.double(), direct, rtol=1e-5, atol=1e-6)
    # the ridge matters: reg=0.5 gives a visibly different prediction, checked against its own inverse
    lam = 0.5 * torch.trace(k64) / 12
    direct = k_ts.double() @ torch.linalg.inv(k64 + lam * torch.eye(12, dtype=torch.float64)) @ y_s.double()
    assert torch.allclose(krr_predict(k_ts, k_ss, y_s, reg=0.5).double(), direct, rtol=1e-5, atol=1e-6)


def test_krr_solve_is_float64_even_for_float32_kernels():
    # an ill-conditioned kernel (rank 3 + tiny ridge): a float32 solve loses most digits, the float64 one not
    g = torch.Generator().manual_seed(1)
    f = torch.randn(30, 3, generator=g, dtype=torch.float64)
    k64 = f @ f.T + 1e-7 * torch.eye(30, dtype=torch.float64)
    y = torch.randn(30, 2, generator=g, dtype=torch.float64)
    direct = k64 @ torch.linalg.solve(k64 + 1e-6 * torch.trace(k64) / 30 * torch.eye(30, dtype=torch.float64), y)
    pred = krr_predict(k64.float(), k64.float(), y.float())
    k32 = k64.float()
    naive32 = k32 @ torch.linalg.solve(k32 + 1e-6 * torch.trace(k32) / 30 * torch.eye(30), y.float())
    err64 = (pred.double() - direct).abs().max()
    err32 = (naive32.double() - direct).abs().max()
    assert err64 < err32


def test_krr_loss_is_half_mse_and_differentiable():
    k_ts, k_ss, g = _random_kernels(6, 5, 10)
    y_s = centered_one_hot(torch.arange(6) % 3, 3).requires_grad_(True)
    y_t = centered_one_hot(torch.arange(5) % 3, 3)
    loss = krr_loss(k_ts, k_ss, y_s, y_t, reg=1e-2)
    pred = krr_predict(k_ts, k_ss, y_s, reg=1e-2)
    assert torch.allclose(loss, 0.5 * ((pred - y_t) ** 2).mean())
    loss.backward()
    assert y_s.grad is not None and torch.isfinite(y_s.grad).all() and y_s.grad.abs().sum() > 0
    # gradient in float64 against finite differences (through the kernel too)
    xs = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    xt = torch.randn(3, 3, dtype=torch.float64)
    ys = centered_one_hot(torch.tensor([0, 1, 0, 1]), 2).double()
    yt = centered_one_hot(torch.tensor([1, 0, 1]), 2).double()
    torch.autograd.gradcheck(lambda x: krr_loss(xt @ x.T, x @ x.T + 0.1 * torch.eye(4, dtype=x.dtype), ys, yt,
                                                reg=1e-2), (xs,))


def test_singular_solve_raises_clear_error_not_nan():
    x = torch.ones(4, 3)  # four identical support points: rank 1
    k = x @ x.T
    y = centered_one_hot(torch.tensor([0, 1, 0, 1]), 2)
    with pytest.raises(SingularKernelError, match="not positive definite"):
        krr_predict(k, k, y, reg=0.0)
    assert issubclass(SingularKernelError, DDKitError)
    k_nan = k.clone()
    k_nan[0, 0] = float("nan")
    with pytest.raises(SingularKernelError, match="non-finite"):
        krr_predict(k, k_nan, y)
    with pytest.raises(ConfigError, match="reg must be >= 0"):
        krr_predict(k, k, y, reg=-1.0)
    with pytest.raises(ConfigError, match="y_s must be"):
        krr_predict(k, k, y[:3])
