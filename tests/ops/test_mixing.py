"""CutMix / Mixup with recorded parameters: hand values and exact replay."""

import pytest
import torch

from ddkit.errors import DDKitError
from ddkit.ops.mixing import MixParams, apply_mix, draw_mix


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch() -> torch.Tensor:
    """[3, 1, 2, 2]: image i is (i + 1) * [[1, 10], [100, 1000]]."""
    pattern = torch.tensor([[1.0, 10.0], [100.0, 1000.0]]).view(1, 1, 2, 2)
    return pattern * torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1)


def test_mixup_by_hand() -> None:
    x = torch.tensor([1.0, 2.0, 4.0]).view(3, 1, 1, 1)
    params = MixParams("mixup", torch.tensor([2, 0, 1]), 0.25)
    # 0.25 * (1, 2, 4) + 0.75 * (4, 1, 2) = (3.25, 1.25, 2.5)
    assert apply_mix(x, params).flatten().tolist() == [3.25, 1.25, 2.5]


def test_mixup_matches_formula_for_drawn_params() -> None:
    x = torch.randn(6, 3, 4, 4, generator=_gen(0))
    p = draw_mix("mixup", 6, 4, 4, _gen(1))
    assert p.box is None and 0.0 <= p.lam <= 1.0
    torch.testing.assert_close(apply_mix(x, p), p.lam * x + (1 - p.lam) * x[p.permutation])


def test_cutmix_pastes_the_box_by_hand() -> None:
    x = _batch()
    params = MixParams("cutmix", torch.tensor([1, 2, 0]), 0.5, box=(0, 2, 1, 2))  # right column from x[perm]
    out = apply_mix(x, params)
    assert out[0, 0].tolist() == [[1.0, 20.0], [100.0, 2000.0]]
    assert out[1, 0].tolist() == [[2.0, 30.0], [200.0, 3000.0]]
    assert out[2, 0].tolist() == [[3.0, 10.0], [300.0, 1000.0]]


@pytest.mark.parametrize("seed", range(10))
def test_cutmix_draw_box_and_lam(seed: int) -> None:
    x = torch.randn(5, 2, 16, 12, generator=_gen(seed))
    p = draw_mix("cutmix", 5, 16, 12, _gen(seed))
    assert p.box is not None
    y0, y1, x0, x1 = p.box
    assert 0 <= y0 <= y1 <= 16 and 0 <= x0 <= x1 <= 12
    assert p.lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / (16 * 12))
    out = apply_mix(x, p)
    assert torch.equal(out[..., y0:y1, x0:x1], x[p.permutation][..., y0:y1, x0:x1])
    outside = torch.ones(16, 12, dtype=torch.bool)
    outside[y0:y1, x0:x1] = False
    assert torch.equal(out[..., outside], x[..., outside])


@pytest.mark.parametrize("kind", ["cutmix", "mixup", "none"])
def test_replay_is_exact(kind: str) -> None:
    x = torch.randn(8, 3, 8, 8, generator=_gen(0))
    p = draw_mix(kind, 8, 8, 8, _gen(42))
    assert torch.equal(apply_mix(x, p), apply_mix(x.clone(), p))
    q = draw_mix(kind, 8, 8, 8, _gen(42))
    assert torch.equal(p.permutation, q.permutation) and p.lam == q.lam and p.box == q.box
    assert sorted(p.permutation.tolist()) == list(range(8))


def test_none_is_identity() -> None:
    x = torch.randn(4, 3, 8, 8, generator=_gen(0))
    p = draw_mix("none", 4, 8, 8, _gen(0))
    assert p.lam == 1.0 and p.box is None
    assert apply_mix(x, p) is x


def test_mixup_lambda_follows_beta_08() -> None:
    g = _gen(0)
    lams = torch.tensor([draw_mix("mixup", 2, 1, 1, g).lam for _ in range(2000)])
    # Beta(0.8, 0.8): mean 0.5, variance 0.64 / (2.56 * 2.6) = 0.0962 (Beta(1, 1) would give 0.0833)
    assert lams.mean().item() == pytest.approx(0.5, abs=0.02)
    assert lams.var().item() == pytest.approx(0.0962, abs=0.006)


def test_cutmix_is_differentiable() -> None:
    x = torch.randn(4, 1, 8, 8, generator=_gen(0), requires_grad=True)
    p = MixParams("cutmix", torch.tensor([1, 0, 3, 2]), 0.75, box=(0, 4, 0, 4))
    apply_mix(x, p).sum().backward()
    assert x.grad is not None
    assert torch.equal(x.grad, torch.ones_like(x))  # every pixel is used exactly once


def test_bad_inputs() -> None:
    with pytest.raises(DDKitError, match="^kind: must be one of"):
        draw_mix("mosaic", 4, 8, 8, _gen(0))
    with pytest.raises(DDKitError, match="^alpha: must be > 0, got 0.0$"):
        draw_mix("mixup", 4, 8, 8, _gen(0), alpha=0.0)
    with pytest.raises(DDKitError, match="^box: must be set iff kind is cutmix"):
        MixParams("cutmix", torch.arange(4), 0.5)
    with pytest.raises(DDKitError, match="^params.permutation: must have 3 entries, got 4$"):
        apply_mix(torch.zeros(3, 1, 2, 2), MixParams("mixup", torch.arange(4), 0.5))
