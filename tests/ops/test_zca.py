"""ZCA whitening (MTT/DATM, kornia's fit) against a hand computation with torch.linalg."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load, save

from ddkit.errors import DDKitError
from ddkit.ops.zca import ZCA, apply_zca, fit_zca, invert_zca


def _data(n: int = 40, seed: int = 0) -> torch.Tensor:
    """[n, 2, 2, 3] float64 images with correlated features (D = 12)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.eye(12, dtype=torch.float64) + 0.3 * torch.randn(12, 12, generator=g, dtype=torch.float64)
    flat = torch.randn(n, 12, generator=g, dtype=torch.float64) @ mixing + 0.5
    return flat.reshape(n, 2, 2, 3)


def _hand_fit(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, ...]:
    """mean, T = U diag((S + eps)^-1/2) U^T and T^-1 of the unbiased covariance, in float64."""
    flat = x.reshape(x.shape[0], -1)
    mean = flat.mean(0)
    centred = flat - mean
    cov = centred.T @ centred / (x.shape[0] - 1)
    s, u = torch.linalg.eigh(cov)
    return mean, u @ torch.diag((s + eps) ** -0.5) @ u.T, u @ torch.diag((s + eps) ** 0.5) @ u.T, cov


def test_fit_matches_hand_computation() -> None:
    x = _data()
    zca = fit_zca(x)
    mean, t, t_inv, _ = _hand_fit(x, 0.1)
    for got, want in ((zca.mean, mean), (zca.transform, t), (zca.inverse, t_inv)):
        assert got.dtype == torch.float32 and got.device.type == "cpu"
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_apply_is_centre_then_transform() -> None:
    x = _data()
    zca = fit_zca(x)
    expected = (x.reshape(40, -1) - zca.mean.double()) @ zca.transform.double()
    out = apply_zca(x, zca)
    assert out.shape == x.shape and out.dtype == torch.float64
    torch.testing.assert_close(out.reshape(40, -1), expected, rtol=1e-12, atol=1e-12)


def test_round_trip() -> None:
    x = _data()
    zca = fit_zca(x)
    torch.testing.assert_close(invert_zca(apply_zca(x, zca), zca), x, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(invert_zca(apply_zca(x.float(), zca), zca), x.float(), rtol=1e-4, atol=1e-4)


def test_whitened_covariance_is_s_over_s_plus_eps_and_identity_as_eps_vanishes() -> None:
    x = _data(n=400)
    _, _, _, cov = _hand_fit(x, 0.1)
    s, u = torch.linalg.eigh(cov)
    for eps, expected in (
        (0.1, u @ torch.diag(s / (s + 0.1)) @ u.T),
        (1e-8, torch.eye(12, dtype=torch.float64)),
    ):
        white = apply_zca(x, fit_zca(x, eps=eps)).reshape(400, -1)
        white_cov = torch.cov(white.T)
        torch.testing.assert_close(white_cov, expected, rtol=0, atol=1e-4)


def test_state_dict_round_trip_through_safetensors() -> None:
    zca = fit_zca(_data())
    state = load(save(zca.state_dict()))
    assert set(state) == {"mean", "transform", "inverse"}
    restored = ZCA.from_state_dict(state)
    for key in state:
        assert torch.equal(getattr(restored, key), getattr(zca, key))


def test_bad_input() -> None:
    zca = fit_zca(_data())
    with pytest.raises(DDKitError, match="x: must have C\\*H\\*W = 12"):
        apply_zca(torch.zeros(3, 1, 4, 4), zca)
    with pytest.raises(DDKitError, match="^x: "):
        fit_zca(torch.zeros(1, 1, 2, 2))
    state = zca.state_dict()
    del state["inverse"]
    with pytest.raises(DDKitError, match="^zca: "):
        ZCA.from_state_dict(state)
    with pytest.raises(DDKitError, match="^zca: "):
        ZCA.from_state_dict({"mean": torch.zeros(3), "transform": torch.eye(3), "inverse": torch.eye(4)})
