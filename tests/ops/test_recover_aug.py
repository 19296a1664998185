"""SRe2L / CDA recover augmentation and schedules: hand values, exactness, replay."""

import math

import pytest
import torch
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2.functional import resized_crop

from ddkit.errors import DDKitError
from ddkit.ops.recover_aug import (
    clamp_to_pixel_range_,
    cosine_lr,
    crop_scale_curriculum,
    random_flip,
    random_resized_crop,
    random_shift,
    sample_crop_box,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int = 4, c: int = 3, h: int = 8, w: int = 8) -> torch.Tensor:
    return torch.randn(n, c, h, w, generator=_gen(123))


# --- clamp ---------------------------------------------------------------------------------------------


def test_clamp_by_hand_in_place() -> None:
    # mean/std (0.5, 0.25) / (0.5, 0.25): channel 0 in [-1, 1], channel 1 in [-1, 3]
    x = torch.tensor([-5.0, 0.0, 5.0]).view(1, 1, 1, 3).repeat(1, 2, 1, 1).requires_grad_()
    out = clamp_to_pixel_range_(x, (0.5, 0.25), (0.5, 0.25))
    assert out is x
    assert x.tolist() == [[[[-1.0, 0.0, 1.0]], [[-1.0, 0.0, 3.0]]]]


def test_clamp_imagenet_constants() -> None:
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = clamp_to_pixel_range_(torch.full((2, 3, 2, 2), 100.0), mean, std)
    assert x[:, 0].unique().item() == pytest.approx((1 - 0.485) / 0.229)
    x = clamp_to_pixel_range_(torch.full((2, 3, 2, 2), -100.0), mean, std)
    assert x[0, :, 0, 0].tolist() == pytest.approx([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225])


def test_clamp_rejects_wrong_channel_count() -> None:
    with pytest.raises(DDKitError, match=r"^mean: must have 3 entries, got \(0.5,\)$"):
        clamp_to_pixel_range_(torch.zeros(1, 3, 2, 2), (0.5,), (0.5, 0.5, 0.5))


# --- schedules -----------------------------------------------------------------------------------------


def test_cosine_lr_values() -> None:
    assert cosine_lr(0.25, 0, 4) == pytest.approx(0.25)
    assert cosine_lr(0.25, 2, 4) == pytest.approx(0.125)
    assert cosine_lr(0.25, 3, 4) == pytest.approx(0.5 * (1 - math.sqrt(0.5)) * 0.25)  # 0.036612
    with pytest.raises(DDKitError, match="^total_steps: must be > 0, got 0$"):
        cosine_lr(0.1, 0, 0)


@pytest.mark.parametrize(
    ("mode", "step", "expected"),
    [
        ("step", 0, 1.0), ("step", 49, 1.0), ("step", 50, 0.08),
        ("linear", 0, 1.0), ("linear", 25, 0.54), ("linear", 49, 0.08 + 0.92 / 50), ("linear", 50, 0.08),
        ("cosine", 0, 1.0), ("cosine", 25, 0.54), ("cosine", 50, 0.08),
        ("cosine", 99, 0.08),
    ],
)
def test_crop_scale_curriculum_values(mode: str, step: int, expected: float) -> None:
    # milestone 0.5 of 100 steps: the curriculum spans steps 0..49, then stays at 0.08
    assert crop_scale_curriculum(step, 100, milestone=0.5, mode=mode) == pytest.approx(expected)


def test_crop_scale_curriculum_edges() -> None:
    assert crop_scale_curriculum(0, 100, milestone=0.0) == 0.08
    assert crop_scale_curriculum(50, 300, milestone=0.5) == pytest.approx(0.77)  # cos(pi / 3) = 0.5
    assert crop_scale_curriculum(10, 40, mode="linear", start=0.5, end=0.1) == pytest.approx(0.4)
    with pytest.raises(DDKitError, match="^mode: must be one of"):
        crop_scale_curriculum(0, 10, mode="exp")
    with pytest.raises(DDKitError, match=r"^milestone: must be in \[0, 1\], got 1.5$"):
        crop_scale_curriculum(0, 10, milestone=1.5)


# --- random resized crop -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_crop_box_matches_torchvision_and_fits(seed: int) -> None:
    img = torch.zeros(3, 12, 20)
    torch.manual_seed(seed)
    expected = RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3])
    top, left, h, w = sample_crop_box(12, 20, _gen(seed))
    assert (top, left, h, w) == expected
    assert 0 < h and 0 < w and top + h <= 12 and left + w <= 20


def test_crop_box_centre_fallback() -> None:
    # an area fraction >= 2 never fits: torchvision's fallback is the largest centred box with ratio <= 4/3
    assert sample_crop_box(4, 16, _gen(0), scale=(2.0, 3.0)) == (0, 5, 4, 5)
    assert sample_crop_box(8, 8, _gen(0), scale=(2.0, 3.0)) == (0, 0, 8, 8)


def test_crop_full_box_is_identity() -> None:
    x = _images()
    assert torch.equal(random_resized_crop(x, _gen(0), 8, scale=(1.0, 1.0), ratio=(1.0, 1.0)), x)


@pytest.mark.parametrize("shared", [True, False])
def test_crop_shape_and_torchvision_resize(shared: bool) -> None:
    x = _images()
    out = random_resized_crop(x, _gen(3), size=16, shared=shared)
    assert out.shape == (4, 3, 16, 16)
    g = _gen(3)
    boxes = [sample_crop_box(8, 8, g) for _ in range(1 if shared else 4)]
    for i in range(4):
        top, left, h, w = boxes[0 if shared else i]
        ref = resized_crop(x[i], top, left, h, w, [16, 16], antialias=False)
        torch.testing.assert_close(out[i], ref)


def test_crop_shared_uses_one_box() -> None:
    # images that differ by a constant keep that difference through a shared crop (bilinear weights sum to 1)
    base = _images(n=1)
    x = base + torch.arange(4.0).view(4, 1, 1, 1)
    out = random_resized_crop(x, _gen(1), size=8)
    torch.testing.assert_close(out - out[:1], torch.arange(4.0).view(4, 1, 1, 1).expand_as(out))


def test_crop_per_image_draws_in_batch_order() -> None:
    x = _images(n=1).repeat(4, 1, 1, 1)
    out = random_resized_crop(x, _gen(5), size=8, shared=False)
    g = _gen(5)
    one_by_one = torch.cat([random_resized_crop(x[i : i + 1], g, size=8) for i in range(4)])
    assert torch.equal(out, one_by_one)
    assert not torch.equal(out[0], out[1])  # identical inputs, different boxes


def test_crop_gradient_reaches_only_the_box() -> None:
    x = _images().requires_grad_()
    random_resized_crop(x, _gen(7), size=8).sum().backward()
    top, left, h, w = sample_crop_box(8, 8, _gen(7))
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[top : top + h, left : left + w] = True
    assert x.grad is not None
    assert (x.grad[..., inside] > 0).all()
    assert (x.grad[..., ~inside] == 0).all()


# --- flip and shift ------------------------------------------------------------------------------------


def test_flip_shared_is_all_or_nothing() -> None:
    x = _images()
    results = set()
    for seed in range(20):
        out = random_flip(x, _gen(seed))
        results.add(torch.equal(out, x.flip(-1)))
        assert torch.equal(out, x) or torch.equal(out, x.flip(-1))
    assert results == {True, False}


def test_flip_per_image() -> None:
    x = _images(n=64)
    out = random_flip(x, _gen(0), shared=False)
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(64)]
    kept = [torch.equal(out[i], x[i]) for i in range(64)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))
    assert 0 < sum(flipped) < 64


def _shift_of(out: torch.Tensor, x: torch.Tensor, jitter: int) -> tuple[int, int]:
    matches = [
        (dy, dx) for dy in range(-jitter, jitter + 1) for dx in range(-jitter, jitter + 1)
        if torch.equal(out, torch.roll(x, (dy, dx), dims=(2, 3)))
    ]
    assert len(matches) == 1
    return matches[0]


@pytest.mark.parametrize("symmetric", [False, True])
def test_shift_is_a_roll_in_range(symmetric: bool) -> None:
    x = _images(h=16, w=16)
    shifts = {_shift_of(random_shift(x, _gen(seed), 3, symmetric=symmetric), x, 3) for seed in range(40)}
    values = {v for pair in shifts for v in pair}
    assert values == (set(range(-3, 4)) if symmetric else set(range(4)))


def test_shift_zero_jitter_and_bad_jitter() -> None:
    x = _images()
    assert torch.equal(random_shift(x, _gen(0), 0), x)
    with pytest.raises(DDKitError, match="^jitter: must be >= 0, got -1$"):
        random_shift(x, _gen(0), -1)


# --- replay --------------------------------------------------------------------------------------------


def _recover_view(x: torch.Tensor, g: torch.Generator, shared: bool) -> torch.Tensor:
    v = random_resized_crop(x, g, size=8, scale=(0.3, 1.0), shared=shared)
    return random_shift(random_flip(v, g, shared=shared), g, jitter=2)


@pytest.mark.parametrize("shared", [True, False])
def test_replay_with_equal_seeds(shared: bool) -> None:
    x = _images()
    first = [_recover_view(x, g, shared) for g in [_gen(11)] for _ in range(3)]
    g = _gen(11)
    again = [_recover_view(x, g, shared) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], first[1])
