"""The patch-statistics shortcut for ``conv -> instance norm`` computes what the plain modules compute."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ddkit.accel.compiled import CompiledOrEager
from ddkit.models import create_model
from ddkit.accel.patchnorm import (
    ConvNormStage,
    conv_instance_norm,
    conv_instance_norm_pool,
    fuses_pooling,
    pooled_shortcut_applies,
    shortcut_applies,
    install,
    uninstall,
)


def _pair(channels: int, size: tuple[int, int], **kw) -> tuple[nn.Module, nn.Module]:
    """The same float64 ConvNet twice: shortcut on, shortcut off."""
    torch.manual_seed(0)
    fast = install(create_model("convnet", channels=channels, num_classes=5, image_size=size, **kw).double())
    for p in fast.parameters():  # move the norm affines off their (1, 0) initialisation
        with torch.no_grad():
            p.add_(0.1 * torch.randn_like(p))
    plain = uninstall(copy.deepcopy(fast))
    return fast, plain


@pytest.mark.parametrize("channels,size", [(1, (28, 28)), (3, (32, 32)), (1, (12, 9))])
def test_values_and_gradients_match_the_plain_modules(channels, size):
    fast, plain = _pair(channels, size)
    assert fast.stages[0].use_shortcut and type(plain.stages[0]) is nn.Sequential  # the swap, and its reversal
    assert type(fast.stages[1]) is nn.Sequential  # 128 input channels: statistics would cost more than they save
    x = torch.randn(6, channels, *size, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (6,))

    def loss_and_grads(net):
        loss = nn.functional.cross_entropy(net(x), y)
        params = list(net.parameters())
        grads = torch.autograd.grad(loss, params + [x], create_graph=True)
        # a second-order quantity, as DC's synthetic side uses: d/dx of a function of the weight gradients
        second = torch.autograd.grad(sum((g ** 2).sum() for g in grads[:-1]), x)[0]
        return loss, grads, second

    lf, gf, sf = loss_and_grads(fast)
    lp, gp, sp = loss_and_grads(plain)
    torch.testing.assert_close(lf, lp, rtol=1e-10, atol=1e-12)
    for a, b in zip(gf, gp):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(sf, sp, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(fast.feature_maps(x)[0], plain.feature_maps(x)[0], rtol=1e-10, atol=1e-12)


def test_torch_func_transforms_see_through_it():
    """functional_call with substituted parameters and vmap over a leading class axis (DC's batched gradients)."""
    fast, plain = _pair(1, (10, 10))
    params = {k: v.detach() + 0.05 for k, v in fast.named_parameters()}
    x = torch.randn(3, 4, 1, 10, 10, dtype=torch.float64)

    def loss(net):
        return lambda p, xs: functional_call(net, p, (xs,)).logsumexp(1).sum()

    gf = vmap(grad(loss(fast)), in_dims=(None, 0))(params, x)
    gp = vmap(grad(loss(plain)), in_dims=(None, 0))(params, x)
    for k in gp:
        torch.testing.assert_close(gf[k], gp[k], rtol=1e-8, atol=1e-10)


def test_state_dict_and_output_layout():
    fast, plain = _pair(1, (28, 28))
    assert list(fast.state_dict()) == list(plain.state_dict())
    assert isinstance(fast.stages[0], ConvNormStage) and isinstance(fast.stages[0], nn.Sequential)
    out = conv_instance_norm(torch.randn(2, 1, 28, 28, dtype=torch.float64), fast.stages[0][0], fast.stages[0][1])
    assert out.shape == (2, 128, 32, 32)  # the official padding of 3 on 28x28 inputs


def test_constant_images_and_no_affine():
    """Zero variance (a blank image) gives the plain modules' output (the affine shift), not NaN; affine=False."""
    conv = nn.Conv2d(3, 8, 3, padding=1).double()
    norm = nn.GroupNorm(8, 8, affine=False).double()
    stage = ConvNormStage(conv, norm, nn.ReLU())
    assert stage.use_shortcut
    x = torch.cat([torch.zeros(1, 3, 7, 7), torch.full((1, 3, 7, 7), 2.5), torch.randn(2, 3, 7, 7)]).double()
    torch.testing.assert_close(stage(x), nn.functional.relu(norm(conv(x))), rtol=1e-8, atol=1e-6)


@pytest.mark.parametrize("conv,norm", [
    (nn.Conv2d(1, 8, 3, stride=2), nn.GroupNorm(8, 8)),     # strided
    (nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(4, 8)),    # group norm with shared groups
    (nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)),     # batch statistics
    (nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(8, 8)),    # 72 values per patch: too many
    (nn.Conv2d(1, 8, 3, padding="same"), nn.GroupNorm(8, 8)),
])
def test_shortcut_is_only_taken_where_it_is_exact_and_cheap(conv, norm):
    assert not shortcut_applies(conv, norm)
    stage = ConvNormStage(conv, norm)
    x = torch.randn(2, conv.in_channels, 9, 9)
    torch.testing.assert_close(stage(x), norm(conv(x)))


def test_other_norms_keep_the_plain_path():
    for kw in ({"norm": "batchnorm"}, {"norm": "layernorm"}, {"norm": "groupnorm"}, {"norm": "none"}):
        net = install(create_model("convnet", channels=1, num_classes=3, image_size=(28, 28), **kw))
        assert not any(getattr(m, "use_shortcut", False) for m in net.modules())


@pytest.mark.parametrize("channels,size,act", [
    (1, (28, 28), nn.ReLU()), (3, (32, 32), nn.ReLU()), (1, (11, 9), nn.LeakyReLU(0.2)), (1, (8, 8), nn.Sigmoid()),
])
def test_pooled_stage_matches_the_plain_modules(channels, size, act):
    """``conv_instance_norm_pool`` (what compiled graphs run) == conv -> norm -> act -> 2x2 average pool, in
    values and in the gradients of the image, the conv and the norm parameters; odd maps drop their last
    row/column as AvgPool2d does."""
    torch.manual_seed(1)
    conv = nn.Conv2d(channels, 16, 3, padding=1).double()
    norm = nn.GroupNorm(16, 16).double()
    with torch.no_grad():
        norm.weight.add_(0.3 * torch.randn(16, dtype=torch.float64))
        norm.bias.add_(0.3 * torch.randn(16, dtype=torch.float64))
    pool = nn.AvgPool2d(2, 2)
    x = torch.randn(3, channels, *size, dtype=torch.float64, requires_grad=True)
    fused = conv_instance_norm_pool(x, conv, norm, act)
    plain = pool(act(norm(conv(x))))
    assert fused.shape == plain.shape and fused.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fused, plain, rtol=1e-10, atol=1e-12)
    wrt = [x, conv.weight, conv.bias, norm.weight, norm.bias]
    weights = torch.randn_like(plain)
    for a, b in zip(torch.autograd.grad((fused * weights).sum(), wrt), torch.autograd.grad((plain * weights).sum(), wrt)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_pooled_stage_is_only_taken_for_2x2_average_pooling():
    conv, norm = nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(8, 8)
    assert pooled_shortcut_applies([conv, norm, nn.ReLU(), nn.AvgPool2d(2, 2)])
    for tail in ([nn.ReLU(), nn.MaxPool2d(2, 2)], [nn.ReLU(), nn.AvgPool2d(2, 1)], [nn.ReLU(), nn.AvgPool2d(3, 2)],
                 [nn.ReLU(), nn.AvgPool2d(2, 2, ceil_mode=True)], [nn.Softmax(1), nn.AvgPool2d(2, 2)], [nn.ReLU()]):
        assert not pooled_shortcut_applies([conv, norm, *tail])
    plain_model = create_model("convnet", channels=1, num_classes=3, image_size=(28, 28))
    assert not fuses_pooling(plain_model)  # models build plain modules; the speed layer swaps stages in
    assert fuses_pooling(install(plain_model))
    assert not fuses_pooling(install(create_model("convnet", channels=3, num_classes=3, image_size=(32, 32))))
    for name in ("convnet_maxpool", "convnet_nopool", "convnet_bn"):
        assert not fuses_pooling(install(create_model(name, channels=1, num_classes=3, image_size=(28, 28))))
    net = create_model("convnet", channels=1, num_classes=3, image_size=(28, 28))
    assert not fuses_pooling(install(net, fuse_pooling=False))


def test_compiled_graph_takes_the_pooled_stage(monkeypatch):
    """Under torch.compile the first stage goes through ``conv_instance_norm_pool`` and still gives the plain
    modules' features and input gradient (float32)."""
    import ddkit.accel.patchnorm as patchnorm

    traced = []
    original = patchnorm.conv_instance_norm_pool

    def spy(*args):
        traced.append(True)
        return original(*args)

    monkeypatch.setattr(patchnorm, "conv_instance_norm_pool", spy)
    torch.manual_seed(0)
    net = install(create_model("convnet_d2", channels=1, num_classes=3, image_size=(10, 10), width=16))
    plain = uninstall(copy.deepcopy(net))
    x = torch.randn(5, 1, 10, 10)
    xc = x.clone().requires_grad_(True)
    xp = x.clone().requires_grad_(True)
    got = CompiledOrEager(net.features)(xc)  # ddkit's compiled calls: static sizes
    want = plain.features(xp)
    assert traced, "the compiled graph did not use the pooled stage"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    want_grad = torch.autograd.grad(want.square().sum(), xp)[0]
    torch.testing.assert_close(torch.autograd.grad(got.square().sum(), xc)[0], want_grad, rtol=1e-4, atol=1e-5)
    assert not any(m.static_shapes for m in net.modules() if isinstance(m, ConvNormStage))
    # a user's own compile may trace symbolic sizes, which the fused stage cannot take: the batched product
    traced.clear()
    xd = x.clone().requires_grad_(True)
    got = torch.compile(net.features, dynamic=True)(xd)
    assert not traced
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(got.square().sum(), xd)[0], want_grad, rtol=1e-4, atol=1e-5)
