"""Model zoo tests, parametrised over the registry: a newly registered model is tested without edits here."""
from __future__ import annotations

import functools

import pytest
import torch
from torch.func import functional_call

from ddkit.errors import ConfigError, UnknownNameError
from ddkit.models import create_model, describe_model, model_names

NAMES = model_names()
# (channels, H, W): FashionMNIST-like, CIFAR-like, and a tiny input that must survive 3 poolings.
INPUTS = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
NUM_CLASSES = 7
BATCH = 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny batches gain nothing from intra-op threads, and on a busy 2-core runner thread contention made
    these tests ~20x slower; restore the setting for other modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.cache
def _net(name: str, shape: tuple[int, int, int]) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, channels=shape[0], num_classes=NUM_CLASSES, image_size=shape[1:])


def _input(shape: tuple[int, int, int], requires_grad: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, *shape, generator=g).requires_grad_(requires_grad)


def test_registry_has_the_zoo() -> None:
    expected = {
        "convnet", "convnet_d1", "convnet_d2", "convnet_d4", "convnet_w32", "convnet_w64", "convnet_w256",
        "convnet_bn", "convnet_ln", "convnet_gn", "convnet_nn", "convnet_maxpool", "convnet_nopool",
        "mlp", "lenet", "alexnet", "vgg11", "vgg11_bn", "resnet18", "resnet18_bn",
    }  # fmt: skip
    assert expected <= set(NAMES)
    assert NAMES == sorted(NAMES)


@pytest.mark.parametrize("shape", INPUTS, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_shapes_and_views_agree(name: str, shape: tuple[int, int, int]) -> None:
    net = _net(name, shape)
    x = _input(shape)
    logits = net(x)
    feats = net.features(x)
    maps = net.feature_maps(x)
    assert logits.shape == (BATCH, NUM_CLASSES)
    assert feats.shape == (BATCH, net.feature_dim)
    assert isinstance(net.classifier, torch.nn.Linear)
    assert net.classifier.in_features == feats.shape[1]
    assert len(maps) >= 2 and all(m.shape[0] == BATCH for m in maps)
    torch.testing.assert_close(maps[-1], feats, rtol=0, atol=0)
    torch.testing.assert_close(net.classifier(feats), logits, rtol=0, atol=0)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", NAMES)
def test_functional_call_uses_the_given_parameters(name: str) -> None:
    shape = (3, 32, 32)
    net = _net(name, shape)
    x = _input(shape)
    state = {**dict(net.named_parameters()), **dict(net.named_buffers())}
    with torch.no_grad():
        expected = net(x)
        torch.testing.assert_close(functional_call(net, state, (x,)), expected, rtol=0, atol=0)
        # Parameters passed in are really used: a zero classifier gives zero logits, and the module is untouched.
        zeroed = {**state, "classifier.weight": torch.zeros_like(net.classifier.weight),
                  "classifier.bias": torch.zeros_like(net.classifier.bias)}  # fmt: skip
        assert functional_call(net, zeroed, (x,)).abs().max() == 0
        torch.testing.assert_close(net(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", NAMES)
def test_gradients_are_finite_and_nonzero(name: str, shape: tuple[int, int, int]) -> None:
    net = _net(name, shape)
    net.zero_grad(set_to_none=True)
    x = _input(shape, requires_grad=True)
    net(x).square().sum().backward()
    assert torch.isfinite(x.grad).all()
    if name in ("convnet_d4", "convnet_d5") and shape[1] == 8:
        # the maps are 1x1 from stage 4 on, where instance norm outputs its bias whatever the input: the true input
        # gradient is zero (the plain modules leave float noise there, an absolute sum of about 1e-5)
        assert x.grad.abs().max() < 1e-4
    else:
        assert x.grad.abs().sum() > 0
    for pname, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert net.classifier.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_uses_batchnorm(name: str) -> None:
    assert _net(name, (3, 32, 32)).uses_batchnorm is name.endswith("_bn")


@pytest.mark.parametrize("name", NAMES)
def test_describe_model_is_one_line(name: str) -> None:
    text = describe_model(name)
    assert text and "\n" not in text


def test_convnet3_matches_the_official_sizes() -> None:
    # Official ConvNet-3 on 1x28x28 pads the first conv by 3: 32 -> 16 -> 8 -> 4 maps, 128*4*4 features.
    net = _net("convnet", (1, 28, 28))
    assert net.feature_dim == 2048
    assert [tuple(m.shape[1:]) for m in net.feature_maps(_input((1, 28, 28)))[:-1]] == [
        (128, 16, 16), (128, 8, 8), (128, 4, 4)
    ]  # fmt: skip
    assert net.stages[0][0].padding == (3, 3)
    assert _net("convnet", (3, 32, 32)).stages[0][0].padding == (1, 1)
    # Default blocks are conv -> GroupNorm(C, C) ("instancenorm") -> ReLU -> AvgPool2d(2).
    block = net.stages[0]
    assert [type(m).__name__ for m in block] == ["Conv2d", "GroupNorm", "ReLU", "AvgPool2d"]
    assert block[1].num_groups == block[1].num_channels == 128


# Parameter counts of the official networks at their native sizes, derived by hand from networks.py.
OFFICIAL_PARAMS = {
    # ConvNet-3: 3*128*9+128, then 2 x (128*128*9+128), 3 x 256 norm affine, Linear(2048, 10).
    ("convnet", (3, 32, 32)): 3584 + 2 * 147584 + 3 * 256 + 20490,
    # LeNet: conv(3,6,5), conv(6,16,5), 400-120-84-10.
    ("lenet", (3, 32, 32)): 456 + 2416 + 48120 + 10164 + 850,
    # AlexNet: convs 128/192/256/192/192 (5,5,3,3,3), Linear(3072, 10).
    ("alexnet", (3, 32, 32)): 9728 + 614592 + 442624 + 442560 + 331968 + 30730,
    # VGG-11 (conv bias + per-channel norm affine), Linear(512, 10): the well-known 9,231,114.
    ("vgg11", (3, 32, 32)): 9_231_114,
    # CIFAR ResNet-18 (kuangliu layout, the DC code's source): the well-known 11,173,962.
    ("resnet18", (3, 32, 32)): 11_173_962,
    # MLP on 1x28x28: 784-128-128-10.
    ("mlp", (1, 28, 28)): 100480 + 16512 + 1290,
}


@pytest.mark.parametrize(("name", "shape"), list(OFFICIAL_PARAMS))
def test_parameter_counts_match_the_official_networks(name: str, shape: tuple[int, int, int]) -> None:
    net = create_model(name, channels=shape[0], num_classes=10, image_size=shape[1:])
    assert sum(p.numel() for p in net.parameters()) == OFFICIAL_PARAMS[(name, shape)]


def test_overrides_and_variants() -> None:
    net = create_model("convnet", channels=3, num_classes=10, image_size=(32, 32), width=16, depth=2)
    assert net.feature_dim == 16 * 8 * 8
    assert create_model("ConvNet", channels=3, num_classes=10, image_size=32).feature_dim == 2048  # case-insensitive
    d4 = create_model("convnet_d4", channels=3, num_classes=10, image_size=(32, 32), width=8)
    assert len(d4.stages) == 4 and d4.feature_dim == 8 * 2 * 2
    # Non-square inputs keep their aspect ratio.
    assert create_model("convnet", channels=3, num_classes=2, image_size=(32, 16), width=4).feature_dim == 4 * 4 * 2


@pytest.mark.parametrize("typo", ["convnet3", "ConvNet3", "conv_net", "ConvNetD3"])
def test_unknown_name_suggests_close_matches(typo: str) -> None:
    with pytest.raises(UnknownNameError, match="'convnet'"):
        create_model(typo, channels=3, num_classes=10, image_size=(32, 32))


@pytest.mark.parametrize(
    "kwargs",
    [{"widht": 64}, {"norm": "instance"}, {"activation": "tanh"}, {"pooling": "median"}, {"depth": 0}],
)
def test_bad_options_raise_config_error(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        create_model("convnet", channels=3, num_classes=10, image_size=(32, 32), **kwargs)


def test_bad_io_raises_config_error() -> None:
    with pytest.raises(ConfigError):
        create_model("mlp", channels=0, num_classes=10, image_size=(32, 32))
    with pytest.raises(ConfigError):
        create_model("mlp", channels=3, num_classes=10, image_size=(32, 32, 3))
