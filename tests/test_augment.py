"""Tests for ddkit.augment: the differentiable ops and the siamese DSA wrapper (official DSA semantics)."""
from __future__ import annotations

import math

import pytest
import torch

from ddkit.augment import DSA, FAMILY_NAMES, DSAParams, ops
from ddkit.errors import ConfigError, UnknownNameError

FAMILIES = list(FAMILY_NAMES)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int = 4, c: int = 3, h: int = 12, w: int = 10, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=gen(seed), dtype=dtype)


def single(family: str, **hp: float) -> DSA:
    """A DSA that always applies exactly ``family`` (mode 'M' over a one-token strategy)."""
    return DSA(family, params=DSAParams(**hp), mode="M")


# ------------------------------------------------------------------------------------------- differentiability


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n_params", [1, 2], ids=["shared", "per_sample"])
def test_gradcheck_each_family(family: str, n_params: int) -> None:
    aug = single(family, prob_flip=1.0 if family == "flip" else 0.5)
    p = aug.sample(n_params, gen(1))
    x = images(2, 2, 5, 4, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: aug.apply(t, p), (x,), eps=1e-6, atol=1e-5)


OP_CASES = {
    "brightness": lambda x: ops.brightness(x, torch.tensor([0.3, -0.2])),
    "saturation": lambda x: ops.saturation(x, torch.tensor([1.7, 0.4])),
    "contrast": lambda x: ops.contrast(x, torch.tensor([0.6, 1.4])),
    "translate": lambda x: ops.translate(x, torch.tensor([[1, -2], [-1, 0]])),
    "cutout": lambda x: ops.cutout(x, torch.tensor([[2, 1], [0, 3]]), (3, 2)),
    "flip": lambda x: ops.flip(x, torch.tensor([True, False])),
    "scale": lambda x: ops.scale(x, torch.tensor([[1.15, 0.9], [0.85, 1.1]])),
    "rotate": lambda x: ops.rotate(x, torch.tensor([0.2, -0.25])),
}


@pytest.mark.parametrize("name", list(OP_CASES))
def test_gradcheck_each_op(name: str) -> None:
    x = images(2, 2, 5, 4, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(OP_CASES[name], (x,), eps=1e-6, atol=1e-5)


def test_gradient_flows_through_full_strategy_both_modes() -> None:
    for mode in "SM":
        x = images(4).requires_grad_(True)
        DSA(mode=mode)(x, gen(3)).square().sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()


# ------------------------------------------------------------------------------------------------------ siamese


@pytest.mark.parametrize("family", FAMILIES)
def test_siamese_params_give_same_transform_for_any_batch_size(family: str) -> None:
    aug = single(family)
    p = aug.sample(1, gen(2))
    real = images(7, seed=1)
    syn = real[:2].clone()  # a smaller batch whose rows equal the first real rows
    y_real, y_syn = aug.apply(real, p), aug.apply(syn, p)
    assert torch.allclose(y_real[:2], y_syn, atol=1e-6)
    assert torch.allclose(aug.apply(real, p), y_real)  # same params, same input -> same output


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_params_equal_expanded_per_sample_params(family: str) -> None:
    """Leading dim 1 means 'the same values for every image', exactly as if they were repeated."""
    aug = single(family)
    p1 = aug.sample(1, gen(4))
    x = images(5)
    expanded = {k: v.expand(5, *v.shape[1:]) for k, v in p1.items()}
    assert torch.allclose(aug.apply(x, p1), aug.apply(x, expanded), atol=1e-6)


def test_mode_s_siamese_uses_same_family_for_real_and_syn() -> None:
    aug = DSA()
    real, syn = images(6, seed=1), images(2, seed=2)
    for seed in range(12):
        p = aug.sample(1, gen(seed))
        both = aug.apply(torch.cat([real, syn]), p)
        assert torch.allclose(both[:6], aug.apply(real, p), atol=1e-6)
        assert torch.allclose(both[6:], aug.apply(syn, p), atol=1e-6)


@pytest.mark.parametrize("family", ["color", "crop", "cutout", "scale", "rotate", "flip"])
def test_per_sample_params_differ_across_batch(family: str) -> None:
    aug = single(family)
    x = images(1, seed=5).expand(16, -1, -1, -1).contiguous()
    y = aug(x, gen(6))
    distinct = {tuple(row.flatten().tolist()) for row in y}
    assert len(distinct) > 1
    p = aug.sample(16, gen(6))
    assert all(v.shape[0] == 16 for v in p.values())


# ------------------------------------------------------------------------------------------ randomness hygiene


def test_same_seed_same_output_and_different_seed_differs() -> None:
    for mode in "SM":
        aug = DSA(mode=mode)
        x = images(8)
        a, b = aug(x, gen(11)), aug(x, gen(11))
        assert torch.equal(a, b)
        assert not torch.equal(a, aug(x, gen(12)))


def test_global_rng_is_untouched() -> None:
    state = torch.get_rng_state()
    x = images(4)
    for mode in "SM":
        aug = DSA(mode=mode)
        for seed in range(4):
            p = aug.sample(1, gen(seed))
            aug.apply(x, p)
            aug(x, gen(seed))
    assert torch.equal(torch.get_rng_state(), state)


# ------------------------------------------------------------------------------------------------------- modes


def test_mode_s_samples_one_family_and_m_samples_all() -> None:
    s, m = DSA(mode="S"), DSA(mode="M")
    pm = m.sample(3, gen(0))
    assert "family" not in pm
    assert set(pm) == {"brightness", "saturation", "contrast", "crop", "cutout", "flip", "scale", "rotate"}
    counts = {name: 0 for name in FAMILY_NAMES}
    for seed in range(600):
        ps = s.sample(3, gen(seed))
        name = FAMILY_NAMES[int(ps["family"])]
        counts[name] += 1
        assert set(ps) - {"family"} == set(single(name).sample(1, gen(0)))
    assert all(60 <= c <= 140 for c in counts.values()), counts  # uniform: 100 each expected


def test_mode_s_draws_only_from_the_strategy() -> None:
    aug = DSA("flip_rotate", mode="S")
    seen = {FAMILY_NAMES[int(aug.sample(1, gen(seed))["family"])] for seed in range(40)}
    assert seen == {"flip", "rotate"}


def test_mode_m_applies_every_family_in_strategy_order() -> None:
    aug = DSA(mode="M")
    x = images(4)
    p = aug.sample(4, gen(9))
    expected = x
    for name in aug.families:
        expected = single(name).apply(expected, p)
    assert torch.allclose(aug.apply(x, p), expected)


def test_mode_s_apply_equals_the_chosen_family() -> None:
    aug = DSA()
    x = images(4)
    p = aug.sample(4, gen(21))
    name = FAMILY_NAMES[int(p["family"])]
    assert torch.equal(aug.apply(x, p), single(name).apply(x, p))


# ------------------------------------------------------------------------------------------- names and config


def test_unknown_op_names_token_and_suggests_close_match() -> None:
    with pytest.raises(UnknownNameError, match=r"'rotat'.*'rotate'"):
        DSA("color_rotat")
    with pytest.raises(ValueError):  # UnknownNameError is a ValueError for generic callers
        DSA("noise")


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ConfigError):
        DSA("flip_flip")
    with pytest.raises(ConfigError):
        DSA("flip", mode="X")
    with pytest.raises(ConfigError):
        DSAParams(prob_flip=1.5)
    with pytest.raises(ConfigError):
        DSAParams(ratio_scale=0.5)
    with pytest.raises(ConfigError):
        DSA("flip").apply(images(2), {"flip": torch.ones(2, dtype=torch.bool)})  # mode S params lack 'family'


def test_param_batch_mismatch_is_rejected() -> None:
    aug = single("rotate")
    with pytest.raises(ValueError, match="leading dim"):
        aug.apply(images(4), aug.sample(3, gen(0)))


@pytest.mark.parametrize("strategy", [None, "", "none", "None", " NONE "])
def test_identity_strategy(strategy: str | None) -> None:
    aug = DSA.from_strategy(strategy)
    x = images(3)
    assert aug.is_identity
    assert aug.sample(3, gen(0)) == {}
    assert aug.apply(x, {}) is x
    assert aug(x, gen(0)) is x
    assert not DSA.from_strategy("flip").is_identity


def test_default_params_are_the_official_ones() -> None:
    hp = DSAParams()
    assert (hp.ratio_scale, hp.ratio_rotate, hp.ratio_crop_pad, hp.ratio_cutout) == (1.2, 15.0, 0.125, 0.5)
    assert (hp.prob_flip, hp.brightness, hp.saturation, hp.contrast) == (0.5, 1.0, 2.0, 0.5)
    assert DSA().mode == "S" and DSA().families == ("color", "crop", "cutout", "flip", "scale", "rotate")


# ------------------------------------------------------------------------------------------ shapes and dtypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 1, 28, 28), (2, 3, 9, 13)])
@pytest.mark.parametrize("mode", ["S", "M"])
def test_shape_dtype_device_preserved(dtype: torch.dtype, shape: tuple[int, ...], mode: str) -> None:
    x = torch.rand(*shape, generator=gen(0), dtype=dtype)
    aug = DSA(mode=mode)
    for seed in range(6):
        y = aug(x, gen(seed))
        assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    p = aug.sample(1, gen(1), device="cpu")
    assert all(v.device.type == "cpu" for v in p.values())


# ----------------------------------------------------------------------------------------- op semantics checks


def test_flip_with_probability_one_is_torch_flip_and_zero_is_identity() -> None:
    x = images(5)
    assert torch.equal(single("flip", prob_flip=1.0)(x, gen(0)), torch.flip(x, dims=[3]))
    assert torch.equal(single("flip", prob_flip=0.0)(x, gen(0)), x)


def test_rotate_zero_and_scale_one_are_identity() -> None:
    x = images(4)
    assert torch.allclose(ops.rotate(x, torch.zeros(4)), x, atol=1e-5)
    assert torch.allclose(ops.scale(x, torch.ones(4, 2)), x, atol=1e-5)
    assert torch.allclose(single("rotate", ratio_rotate=0.0)(x, gen(0)), x, atol=1e-5)
    assert torch.allclose(single("scale", ratio_scale=1.0)(x, gen(0)), x, atol=1e-5)


def test_rotate_sign_and_scale_axes_follow_the_official_matrices() -> None:
    """A 90-degree official rotation maps output (u, v) to input (-v, u); scale (2, 1) only widens x."""
    x = images(1, 1, 8, 8)
    rotated = ops.rotate(x, torch.tensor([math.pi / 2]))  # out[i, j] = in[j, W - 1 - i]
    assert torch.allclose(rotated, torch.rot90(x, k=1, dims=(2, 3)), atol=1e-5)
    widened = ops.scale(x, torch.tensor([[2.0, 1.0]]))
    assert torch.allclose(widened[..., :2], torch.zeros(1, 1, 8, 2))  # samples beyond the left edge
    assert widened[..., 2:6].abs().sum() > 0


def test_affine_matches_torch_affine_grid_and_grid_sample() -> None:
    """ops.affine builds its grid by hand for speed; it must equal F.affine_grid + F.grid_sample."""
    x = images(3, 2, 9, 13, dtype=torch.float64)
    theta = torch.randn(3, 2, 3, generator=gen(7), dtype=torch.float64) * 0.5
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    expected = torch.nn.functional.grid_sample(x, grid, align_corners=False)
    assert torch.allclose(ops.affine(x, theta), expected, atol=1e-12)


def test_translate_reads_shifted_pixels_with_zero_fill() -> None:
    x = images(2, 1, 6, 7)
    y = ops.translate(x, torch.tensor([[1, 0], [0, -2]]))
    assert torch.equal(y[0, :, :-1], x[0, :, 1:]) and torch.equal(y[0, :, -1], torch.zeros_like(y[0, :, -1]))
    assert torch.equal(y[1, :, :, 2:], x[1, :, :, :-2]) and not y[1, :, :, :2].any()
    assert torch.equal(ops.translate(x, torch.zeros(1, 2, dtype=torch.long)), x)


def test_crop_shifts_cover_official_range() -> None:
    """Official: shift ~ randint(-s, s), s = int(28 * 0.125 + 0.5) = 4; recover shifts from a one-hot image."""
    x = torch.zeros(1, 1, 28, 28)
    x[..., 14, 14] = 1.0
    aug = single("crop")
    y = aug(x.expand(400, -1, -1, -1), gen(0))
    pos = y.flatten(1).argmax(dim=1)
    dy, dx = 14 - pos // 28, 14 - pos % 28
    assert set(dy.tolist()) == set(range(-4, 5)) and set(dx.tolist()) == set(range(-4, 5))


def test_cutout_zeroes_official_square_clipped_to_image() -> None:
    x = torch.ones(500, 1, 28, 28)
    y = single("cutout")(x, gen(1))
    zeroed = (y == 0).sum(dim=(1, 2, 3))
    assert zeroed.max() == 14 * 14  # side int(28 * 0.5 + 0.5) = 14
    assert zeroed.min() >= 7 * 7  # centre in 0..28: at worst a corner quarter survives clipping
    assert torch.equal(ops.cutout(x[:1], torch.tensor([[7, 7]]), (14, 14))[0, 0, :14, :14], torch.zeros(14, 14))


def test_color_matches_official_formulas() -> None:
    x = images(3, 3, 5, 5)
    b, s, c = torch.tensor([0.1, -0.4, 0.2]), torch.tensor([0.5, 1.9, 1.0]), torch.tensor([0.7, 1.2, 1.5])
    expected = x + b.view(-1, 1, 1, 1)
    m = expected.mean(dim=1, keepdim=True)
    expected = (expected - m) * s.view(-1, 1, 1, 1) + m
    m = expected.mean(dim=(1, 2, 3), keepdim=True)
    expected = (expected - m) * c.view(-1, 1, 1, 1) + m
    got = single("color").apply(x, {"brightness": b, "saturation": s, "contrast": c})
    assert torch.allclose(got, expected, atol=1e-6)


def test_sampled_values_lie_in_official_ranges() -> None:
    p = DSA(mode="M").sample(2000, gen(0))
    assert p["brightness"].abs().max() <= 0.5
    assert 0 <= p["saturation"].min() and p["saturation"].max() <= 2.0
    assert 0.5 <= p["contrast"].min() and p["contrast"].max() <= 1.5
    assert (1 / 1.2 <= p["scale"].min()) and (p["scale"].max() <= 1.2)
    assert p["rotate"].abs().max() <= math.radians(15.0)
    assert 0.4 < p["flip"].float().mean() < 0.6
