"""DSA ops against hand-computed expectations (Zhao & Bilen, ICML 2021; MTT's ``DiffAugment``)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from ddkit.errors import DDKitError
from ddkit.ops.dsa import (
    DSA_OPS,
    DSAParams,
    dsa,
    dsa_color,
    dsa_crop,
    dsa_cutout,
    dsa_flip,
    dsa_rotate,
    dsa_scale,
    seeded_generator,
)

P = DSAParams()


def _images(n: int = 6, c: int = 3, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, c, h, w, generator=seeded_generator(seed), dtype=torch.float64)


def _shifted(img: torch.Tensor, dr: int, dc: int) -> torch.Tensor:
    """out[:, i, j] = img[:, i + dr, j + dc], zero outside: written with plain slices."""
    out = torch.zeros_like(img)
    h, w = img.shape[-2:]
    out[:, max(0, -dr) : h - max(0, dr), max(0, -dc) : w - max(0, dc)] = img[
        :, max(0, dr) : h + min(0, dr), max(0, dc) : w + min(0, dc)
    ]
    return out


def test_flip_reverses_width_of_flipped_samples() -> None:
    x = _images(n=8)
    flipped = torch.rand(8, generator=seeded_generator(3)) < 0.5
    assert 0 < flipped.sum() < 8
    out = dsa_flip(x, seeded_generator(3), P)
    for n in range(8):
        assert torch.equal(out[n], x[n].flip(-1) if flipped[n] else x[n])
    assert torch.equal(dsa_flip(x, seeded_generator(3), DSAParams(prob_flip=1.0)), x.flip(-1))
    assert torch.equal(dsa_flip(x, seeded_generator(3), DSAParams(prob_flip=0.0)), x)


def test_crop_is_a_zero_padded_integer_shift() -> None:
    x = _images(n=8)
    s = int(0.125 * 16 + 0.5)
    g = seeded_generator(5)
    dr, dc = torch.randint(-s, s + 1, (8,), generator=g), torch.randint(-s, s + 1, (8,), generator=g)
    out = dsa_crop(x, seeded_generator(5), P)
    for n in range(8):
        assert torch.equal(out[n], _shifted(x[n], int(dr[n]), int(dc[n])))


def test_crop_shifts_cover_exactly_minus_s_to_s() -> None:
    x = torch.zeros(200, 1, 16, 16, dtype=torch.float64)
    x[:, :, 8, 8] = 1.0
    out = dsa_crop(x, seeded_generator(0), P)
    pos = out.flatten(1).argmax(1)
    rows, cols = (pos // 16 - 8).tolist(), (pos % 16 - 8).tolist()
    assert set(rows) == set(cols) == set(range(-2, 3))


def test_cutout_zeroes_the_clipped_square() -> None:
    x = torch.ones(64, 1, 16, 16, dtype=torch.float64)
    side = int(0.5 * 16 + 0.5)
    g = seeded_generator(7)
    cr, cc = torch.randint(0, 17, (64,), generator=g), torch.randint(0, 17, (64,), generator=g)
    out = dsa_cutout(x, seeded_generator(7), P)
    unclamped = 0
    for n in range(64):
        top, left = int(cr[n]) - side // 2, int(cc[n]) - side // 2
        expected = torch.ones(16, 16, dtype=torch.float64)
        expected[max(top, 0) : top + side, max(left, 0) : left + side] = 0
        assert torch.equal(out[n, 0], expected)
        if 0 <= top and top + side <= 16 and 0 <= left and left + side <= 16:
            assert int((out[n] == 0).sum()) == side * side
            unclamped += 1
    assert unclamped > 0


def test_brightness_adds_a_known_offset_to_a_constant_image() -> None:
    # One channel and a constant image: saturation and contrast leave it unchanged.
    x = torch.full((5, 1, 4, 4), 0.3, dtype=torch.float64)
    u = torch.rand(5, generator=seeded_generator(11)).double()
    out = dsa_color(x, seeded_generator(11), P)
    expected = 0.3 + (u - 0.5) * 1.0
    torch.testing.assert_close(out, expected.view(5, 1, 1, 1).expand_as(x), rtol=0, atol=1e-15)


def test_color_is_brightness_saturation_contrast_in_sequence() -> None:
    x = _images(n=4, h=4, w=4)
    g = seeded_generator(2)
    ub, us, uc = (torch.rand(4, generator=g).double() for _ in range(3))
    out = dsa_color(x, seeded_generator(2), P)
    for n in range(4):
        y = x[n] + (ub[n] - 0.5)
        m = y.mean(0, keepdim=True)
        y = (y - m) * (2.0 * us[n]) + m
        y = (y - y.mean()) * (uc[n] + 0.5) + y.mean()
        torch.testing.assert_close(out[n], y, rtol=0, atol=1e-13)


@pytest.mark.parametrize(
    ("op", "identity"),
    [(dsa_scale, DSAParams(ratio_scale=1.0)), (dsa_rotate, DSAParams(ratio_rotate=0.0))],
)
def test_scale_and_rotate_with_identity_params_keep_x(op, identity) -> None:
    x = _images()
    torch.testing.assert_close(op(x, seeded_generator(0), identity), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("op", [dsa_scale, dsa_rotate])
def test_scale_and_rotate_keep_the_centre_pixel(op) -> None:
    # With align_corners=True the centre of an odd-sized image is the fixed point of the affine map.
    x = _images(h=9, w=9)
    out = op(x, seeded_generator(4), P)
    torch.testing.assert_close(out[:, :, 4, 4], x[:, :, 4, 4], rtol=0, atol=1e-12)
    assert not torch.allclose(out, x)


def test_rotate_by_known_angle_moves_a_pixel_where_expected() -> None:
    # Angle a = (u - 0.5) * 2 * 15 deg (about -14.9 deg for seed 3); output grid point g samples the input
    # at R(a) g, so an input pixel at p shows up at R(-a) p.
    x = torch.zeros(1, 1, 41, 41, dtype=torch.float64)
    x[0, 0, 20, 38] = 1.0  # normalized (0.9, 0.0)
    u = float(torch.rand(1, generator=seeded_generator(3)))
    a = (u - 0.5) * 2 * 15 / 180 * math.pi
    out = dsa_rotate(x, seeded_generator(3), P)
    col, row = (0.9 * math.cos(a) + 1) * 20, (-0.9 * math.sin(a) + 1) * 20
    assert abs(row - 20) > 4
    peak = int(out[0, 0].flatten().argmax())
    assert abs(peak // 41 - row) <= 1 and abs(peak % 41 - col) <= 1


@pytest.mark.parametrize("name", sorted(DSA_OPS))
def test_every_op_is_differentiable(name: str) -> None:
    x = _images(n=2, c=2, h=5, w=5).requires_grad_()
    op = DSA_OPS[name]
    assert torch.autograd.gradcheck(lambda t: op(t, seeded_generator(1), P), (x,))


def test_replay_same_seed_same_output_and_fresh_draws_otherwise() -> None:
    x = _images().float()
    for seed in range(12):
        assert torch.equal(dsa(x, seeded_generator(seed)), dsa(x, seeded_generator(seed)))
    g = seeded_generator(0)
    first, second = dsa(x, g), dsa(x, g)
    assert not torch.equal(first, second)


def test_draws_do_not_depend_on_dtype() -> None:
    x = _images()
    for seed in range(12):
        out64 = dsa(x, seeded_generator(seed))
        out32 = dsa(x.float(), seeded_generator(seed))
        torch.testing.assert_close(out32.double(), out64, rtol=1e-5, atol=1e-5)


def test_group_choice_is_uniform(monkeypatch: pytest.MonkeyPatch) -> None:
    chosen: list[str] = []
    for name in DSA_OPS:
        monkeypatch.setitem(DSA_OPS, name, lambda x, g, p, name=name: chosen.append(name) or x)
    x = torch.zeros(1, 1, 4, 4)
    g = seeded_generator(0)
    for _ in range(1200):
        dsa(x, g)
    counts = Counter(chosen)
    assert set(counts) == set(DSA_OPS)
    assert all(150 <= c <= 250 for c in counts.values()), counts


def test_strategy_subset_and_bad_strategy() -> None:
    x = _images()
    params = DSAParams(strategy="flip")
    assert torch.equal(dsa(x, seeded_generator(3), params), dsa_flip(x, _skip_one(3), params))
    with pytest.raises(DDKitError, match="strategy"):
        DSAParams(strategy="color_blur")


def _skip_one(seed: int) -> torch.Generator:
    """A generator past the group draw of ``dsa``."""
    g = seeded_generator(seed)
    torch.randint(1, (1,), generator=g)
    return g
