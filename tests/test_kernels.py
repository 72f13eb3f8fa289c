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


# ------------------------------------------------------------------------------------------------ kernels
import math  # noqa: E402

import torch.nn.functional as F  # noqa: E402
from torch.func import functional_call, grad, vmap  # noqa: E402

from ddkit.functional.kernels import KernelSpec, block_bytes, kernel_matrix  # noqa: E402

W_STD, B_STD = math.sqrt(2.0), 0.1


class WideNet(torch.nn.Module):
    """The finite network whose infinite-width limit the analytic kernel is: NTK parameterisation (weights and
    biases N(0, 1), ``W_std / sqrt(fan_in)`` and ``b_std`` applied in the forward), one scalar output."""

    def __init__(self, arch: str, depth: int, width: int, in_shape: tuple[int, int, int], g: torch.Generator):
        super().__init__()
        self.arch = arch
        c, h, w = in_shape
        shapes = []
        fan = c * h * w if arch == "fc" else c
        for _ in range(depth):
            shapes.append((width, fan) if arch == "fc" else (width, fan, 3, 3))
            fan = width
        readout_in = width if arch == "fc" else width * h * w
        self.weights = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in shapes]
            + [torch.nn.Parameter(torch.randn(1, readout_in, generator=g, dtype=torch.float64))])
        self.biases = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(width, generator=g, dtype=torch.float64)) for _ in shapes]
            + [torch.nn.Parameter(torch.randn(1, generator=g, dtype=torch.float64))])

    def features(self, x):
        h = x.flatten(1) if self.arch == "fc" else x
        for w, b in zip(list(self.weights)[:-1], list(self.biases)[:-1]):
            if self.arch == "fc":
                z = W_STD / math.sqrt(w.shape[1]) * h @ w.T + B_STD * b
            else:
                z = W_STD / math.sqrt(w[0].numel()) * F.conv2d(h, w, padding=1) + B_STD * b[:, None, None]
            h = torch.relu(z)
        return h.flatten(1)

    def forward(self, x):
        h = self.features(x)
        w, b = self.weights[-1], self.biases[-1]
        return (W_STD / math.sqrt(h.shape[1]) * h @ w.T + B_STD * b).squeeze(-1)


def empirical_nngp(net: WideNet, x):
    """The output covariance over the readout's random weights, given the (very wide) last hidden layer."""
    h = net.features(x)
    return W_STD ** 2 * h @ h.T / h.shape[1] + B_STD ** 2


def empirical_ntk(net: WideNet, x):
    """``J J^T``: per-example gradients of the scalar output with respect to every parameter."""
    params = {k: v.detach() for k, v in net.named_parameters()}

    def out(p, xi):
        return functional_call(net, p, (xi[None],)).squeeze(0)

    jac = vmap(grad(out), in_dims=(None, 0))(params, x)
    flat = torch.cat([j.flatten(1) for j in jac.values()], dim=1)
    return flat @ flat.T


# widths and seeds: the finite-width fluctuation is O(1 / sqrt(width * seeds)); measured relative Frobenius
# errors were 1.5-3 % at these sizes, so the 6 % tolerance is met with margin, while a wrong kernel (NTK for NNGP,
# a missing bias, unpooled conv covariances) is off by far more (checked below)
EMPIRICAL = {"fc": dict(width=4096, seeds=2), "conv": dict(width=384, seeds=3)}
TOLERANCE = 0.06


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("arch", ["fc", "conv"])
@pytest.mark.parametrize("get", ["nngp", "ntk"])
@pytest.mark.parametrize("depth", [1, 2])
def test_analytic_kernel_matches_a_wide_network(arch, get, depth, one_thread):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 2, 5, 5, generator=g, dtype=torch.float64)
    size = EMPIRICAL[arch]
    if arch == "fc" and get == "ntk" and depth == 2:
        size = dict(width=2048, seeds=2)  # a 2048 x 2048 hidden matrix keeps the Jacobian small
    emp = 0.0
    for s in range(size["seeds"]):
        net = WideNet(arch, depth, size["width"], (2, 5, 5), torch.Generator().manual_seed(100 + s))
        emp = emp + (empirical_nngp(net, x) if get == "nngp" else empirical_ntk(net, x))
    emp = emp / size["seeds"]
    spec = KernelSpec(arch=arch, depth=depth, get=get)
    analytic = kernel_matrix(spec, x, x)
    assert _rel(analytic, emp) < TOLERANCE
    # the test discriminates: the other kernel, or a wrong bias scale, is far outside the tolerance
    other = KernelSpec(arch=arch, depth=depth, get="ntk" if get == "nngp" else "nngp")
    assert _rel(kernel_matrix(other, x, x), emp) > 3 * TOLERANCE
    wrong_bias = KernelSpec(arch=arch, depth=depth, get=get, b_std=1.0)
    assert _rel(kernel_matrix(wrong_bias, x, x), emp) > 2 * TOLERANCE


def test_conv_kernel_is_a_kernel_and_its_bias_term_is_exact():
    """Symmetric positive definite, and on an all-zero image (only the biases speak) the closed form."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 6, 6, generator=g, dtype=torch.float64)
    spec = KernelSpec(arch="conv", depth=2, get="ntk")
    k = kernel_matrix(spec, x, x)
    assert torch.allclose(k, k.T, atol=1e-12)
    assert torch.linalg.eigvalsh(k).min() > 0
    # a zero image: only the biases speak; NNGP at depth 1 is then W^2 * E[relu(u)^2] + b^2 = W^2 b^2 / 2 + b^2
    z = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    nngp = kernel_matrix(KernelSpec(arch="conv", depth=1, get="nngp"), z, z)
    assert torch.allclose(nngp, torch.tensor([[W_STD ** 2 * B_STD ** 2 / 2 + B_STD ** 2]], dtype=torch.float64))


@pytest.mark.parametrize("arch", ["fc", "conv"])
def test_batched_and_checkpointed_equal_one_block(arch):
    g = torch.Generator().manual_seed(1)
    xt = torch.randn(7, 1, 5, 4, generator=g, dtype=torch.float64)
    xs = torch.randn(4, 1, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    spec = KernelSpec(arch=arch, depth=2, get="ntk")
    full = kernel_matrix(spec, xt, xs, batch=100)
    blocks = kernel_matrix(spec, xt, xs, batch=2)
    assert torch.allclose(full, blocks, rtol=1e-12, atol=1e-12)
    w = torch.randn(7, 4, generator=g, dtype=torch.float64)
    (g_full,) = torch.autograd.grad((full * w).sum(), xs)
    (g_blocks,) = torch.autograd.grad((blocks * w).sum(), xs)
    assert torch.allclose(g_full, g_blocks, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("get", ["nngp", "ntk"])
def test_kernel_gradients_are_exact_and_finite_on_the_diagonal(get):
    g = torch.Generator().manual_seed(2)
    xs = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    xt = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    spec = KernelSpec(arch="conv", depth=2, get=get)
    torch.autograd.gradcheck(lambda s: kernel_matrix(spec, xt, s), (xs,))
    # K_ss has c = 1 on its diagonal, where autograd through arccos would give NaN
    k_ss = kernel_matrix(spec, xs, xs)
    (gs,) = torch.autograd.grad(k_ss.sum(), xs)
    assert torch.isfinite(gs).all()
    torch.autograd.gradcheck(lambda s: kernel_matrix(spec, s, s), (xs,))


def test_over_large_block_is_refused_with_the_batch_option():
    x = torch.randn(50, 1, 28, 28)
    spec = KernelSpec(arch="conv", depth=3, get="ntk")
    need = block_bytes(spec, 50, 50, 784, torch.float32)
    with pytest.raises(ConfigError, match=r"lower method\.kernel_batch \(now 50\) to at most"):
        kernel_matrix(spec, x, x, batch=50, memory_limit=need // 2)
    with pytest.raises(ConfigError, match="even one row does not fit"):
        kernel_matrix(spec, x, x, memory_limit=1000)
    with pytest.raises(ConfigError, match="kernel architecture"):
        KernelSpec(arch="myrtle")
