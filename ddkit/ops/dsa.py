"""Differentiable Siamese Augmentation (DSA) as MTT and DATM use it.

The op set, the constants and the single-group mode ("S": one group per call, parameters drawn per sample)
follow ``ParamDiffAug`` / ``DiffAugment`` of the MTT code [2], which DATM [3] reuses unchanged; DSA itself is
[1]. Unlike the reference, every random number comes from an explicit CPU ``torch.Generator``: it is drawn on the
CPU in float32 (the reference's dtype) and then moved to ``x``'s device and dtype, so a draw does not depend on
the device or dtype of ``x``, and two calls with generators in the same state give bit-identical outputs on a
given device. Every op is differentiable w.r.t. ``x``.

References:
    [1] Zhao & Bilen, "Dataset Condensation with Differentiable Siamese Augmentation", ICML 2021.
    [2] Cazenavette et al., "Dataset Distillation by Matching Training Trajectories", CVPR 2022.
    [3] Guo et al., "Towards Lossless Dataset Distillation via Difficulty-Aligned Trajectory Matching",
        ICLR 2024.

Example:
    >>> x = torch.randn(8, 3, 32, 32)
    >>> y = dsa(x, seeded_generator(0))
    >>> torch.equal(y, dsa(x, seeded_generator(0)))
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ddkit.errors import check


@dataclass(frozen=True)
class DSAParams:
    """Constants of the DSA ops (MTT's ``ParamDiffAug``; ``ratio_noise`` is unused there and omitted here).

    Args:
        strategy: op groups joined by ``_``; one group is chosen uniformly per call.
        brightness: brightness offset range, ``x + (u - 0.5) * brightness``.
        saturation: saturation factor range, ``(x - mean_c) * (u * saturation) + mean_c``.
        contrast: contrast factor offset, ``(x - mean) * (u + contrast) + mean``.
        ratio_crop_pad: maximal integer shift as a fraction of the image side (``int(ratio * H + 0.5)``).
        ratio_cutout: side of the zeroed square as a fraction of the image side (``int(ratio * H + 0.5)``).
        prob_flip: probability of a horizontal flip.
        ratio_scale: per-axis scale factor drawn from ``U(1 / ratio_scale, ratio_scale)``.
        ratio_rotate: rotation angle in degrees drawn from ``U(-ratio_rotate, ratio_rotate)``.

    Raises:
        DDKitError: if ``strategy`` names a group that is not in ``DSA_OPS``.
    """

    strategy: str = "color_crop_cutout_flip_scale_rotate"
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0

    def __post_init__(self) -> None:
        for group in self.groups:
            check(
                group in DSA_OPS, "strategy", f"every group must be one of {sorted(DSA_OPS)}", self.strategy
            )

    @property
    def groups(self) -> tuple[str, ...]:
        """The op groups of ``strategy``, in order."""
        return tuple(self.strategy.split("_"))


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed``."""
    return torch.Generator(device="cpu").manual_seed(seed)


def _uniform(n: int, generator: torch.Generator) -> Tensor:
    """``[n]`` float32 draws from U(0, 1) on the CPU."""
    return torch.rand(n, generator=generator)


def _randint(low: int, high: int, n: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """``[n]`` integers from ``{low, ..., high - 1}``, drawn on the CPU, returned on ``device``."""
    return torch.randint(low, high, (n,), generator=generator).to(device)


def _per_sample(values: Tensor, x: Tensor) -> Tensor:
    """``[N]`` CPU values as an ``[N, 1, 1, 1]`` tensor on ``x``'s device and dtype."""
    return values.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def dsa_color(x: Tensor, generator: torch.Generator, params: DSAParams) -> Tensor:
    """Brightness, then saturation, then contrast, each with its own per-sample factor.

    Args:
        x: ``[N, C, H, W]`` images.
        generator: CPU generator; three ``[N]`` uniform draws (brightness, saturation, contrast).
        params: uses ``brightness``, ``saturation`` and ``contrast``.

    Returns:
        ``[N, C, H, W]``.
    """
    n = x.shape[0]
    x = x + _per_sample(_uniform(n, generator) - 0.5, x) * params.brightness
    channel_mean = x.mean(dim=1, keepdim=True)
    x = (x - channel_mean) * (_per_sample(_uniform(n, generator), x) * params.saturation) + channel_mean
    image_mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - image_mean) * (_per_sample(_uniform(n, generator), x) + params.contrast) + image_mean


def _translate(x: Tensor, shift_rows: Tensor, shift_cols: Tensor) -> Tensor:
    """``out[n, :, i, j] = x[n, :, i + shift_rows[n], j + shift_cols[n]]``, 0 where that index is outside.

    Indexes a 1-pixel zero-padded copy with clamped indices, as the reference does.
    """
    n, _, h, w = x.shape
    rows = (torch.arange(h, device=x.device) + shift_rows[:, None] + 1).clamp(0, h + 1)
    cols = (torch.arange(w, device=x.device) + shift_cols[:, None] + 1).clamp(0, w + 1)
    batch = torch.arange(n, device=x.device)[:, None, None]
    padded = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)
    return padded[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def dsa_crop(x: Tensor, generator: torch.Generator, params: DSAParams) -> Tensor:
    """Per-sample integer translation in ``[-s, s]`` per axis, ``s = int(ratio_crop_pad * side + 0.5)``.

    Pixels shifted in from outside the image are 0.

    Args:
        x: ``[N, C, H, W]`` images.
        generator: CPU generator; two ``[N]`` integer draws (row shift, then column shift).
        params: uses ``ratio_crop_pad``.

    Returns:
        ``[N, C, H, W]``.
    """
    n, _, h, w = x.shape
    s_h, s_w = int(h * params.ratio_crop_pad + 0.5), int(w * params.ratio_crop_pad + 0.5)
    shift_rows = _randint(-s_h, s_h + 1, n, generator, x.device)
    shift_cols = _randint(-s_w, s_w + 1, n, generator, x.device)
    return _translate(x, shift_rows, shift_cols)


def dsa_cutout(x: Tensor, generator: torch.Generator, params: DSAParams) -> Tensor:
    """Zero a per-sample square of side ``int(ratio_cutout * side + 0.5)``, clipped at the image border.

    The centre is uniform over ``{0, ..., H - 1}`` (``{0, ..., H}`` for an even side, as in the reference);
    the square spans ``[centre - side // 2, centre - side // 2 + side)``.

    Args:
        x: ``[N, C, H, W]`` images.
        generator: CPU generator; two ``[N]`` integer draws (row centre, then column centre).
        params: uses ``ratio_cutout``.

    Returns:
        ``[N, C, H, W]``.
    """
    n, _, h, w = x.shape
    side_h, side_w = int(h * params.ratio_cutout + 0.5), int(w * params.ratio_cutout + 0.5)
    top = _randint(0, h + 1 - side_h % 2, n, generator, x.device)[:, None] - side_h // 2
    left = _randint(0, w + 1 - side_w % 2, n, generator, x.device)[:, None] - side_w // 2
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_rows = (rows >= top) & (rows < top + side_h)
    in_cols = (cols >= left) & (cols < left + side_w)
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])
    return x * keep[:, None].to(x.dtype)


def dsa_flip(x: Tensor, generator: torch.Generator, params: DSAParams) -> Tensor:
    """Reverse the last (width) dimension of each sample with probability ``prob_flip``.

    Args:
        x: ``[N, C, H, W]`` images.
        generator: CPU generator; one ``[N]`` uniform draw, sample ``n`` is flipped when ``u[n] < prob_flip``.
        params: uses ``prob_flip``.

    Returns:
        ``[N, C, H, W]``.
    """
    flip = (_uniform(x.shape[0], generator) < params.prob_flip).to(x.device).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(3), x)


def _warp(x: Tensor, theta: Tensor) -> Tensor:
    """Bilinear affine warp with ``theta`` ``[N, 2, 3]`` (CPU), zero padding, ``align_corners=True``."""
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def dsa_scale(x: Tensor, generator: torch.Generator, params: DSAParams) -> Tensor:
    """Per-sample, per-axis scaling of the sampling grid by factors from ``U(1 / ratio_scale, ratio_scale)``.

    Args:
        x: ``[N, C, H, W]`` images.
        generator: CPU generator; two ``[N]`` uniform draws (x-axis factor, then y-axis factor).
        params: uses ``ratio_scale``.

    Returns:
        ``[N, C, H, W]``.
    """
    n, low = x.shape[0], 1.0 / params.ratio_scale
    sx = _uniform(n, generator) * (params.ratio_scale - low) + low
    sy = _uniform(n, generator) * (params.ratio_scale - low) + low
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = sx, sy
    return _warp(x, theta)


def dsa_rotate(x: Tensor, generator: torch.Generator, params: DSAParams) -> Tensor:
    """Per-sample rotation about the image centre by an angle from ``U(-ratio_rotate, ratio_rotate)`` degrees.

    Args:
        x: ``[N, C, H, W]`` images.
        generator: CPU generator; one ``[N]`` uniform draw.
        params: uses ``ratio_rotate``.

    Returns:
        ``[N, C, H, W]``.
    """
    n = x.shape[0]
    angle = (_uniform(n, generator) - 0.5) * 2 * params.ratio_rotate / 180 * math.pi
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros(n)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    return _warp(x, theta)


DSA_OPS: dict[str, Callable[[Tensor, torch.Generator, DSAParams], Tensor]] = {
    "color": dsa_color,
    "crop": dsa_crop,
    "cutout": dsa_cutout,
    "flip": dsa_flip,
    "scale": dsa_scale,
    "rotate": dsa_rotate,
}
"""Op group name -> op, the names a ``DSAParams.strategy`` may use."""


def dsa(x: Tensor, generator: torch.Generator, params: DSAParams = DSAParams()) -> Tensor:
    """Apply one DSA op group, chosen uniformly from ``params.groups``, with per-sample parameters.

    This is mode "S" of the reference with seed -1, which is how MTT and DATM call it: no parameter sharing
    across the batch. The first draw from ``generator`` picks the group; the op then draws its parameters.

    Args:
        x: ``[N, C, H, W]`` images.
        generator: CPU ``torch.Generator`` (see ``seeded_generator``); it is advanced by the call.
        params: op constants and the strategy.

    Returns:
        ``[N, C, H, W]`` augmented images, differentiable w.r.t. ``x``.

    Raises:
        DDKitError: if ``x`` is not 4-D.
    """
    check(x.dim() == 4, "x", "must be a [N, C, H, W] tensor", tuple(x.shape))
    groups = params.groups
    group = groups[int(torch.randint(len(groups), (1,), generator=generator))]
    return DSA_OPS[group](x, generator, params).contiguous()
