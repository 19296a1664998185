"""Per-step augmentation and schedules of SRe2L / CDA recovery, replayable from an explicit generator.

References:
    [1] Yin, Xing, Shen, "Squeeze, Recover and Relabel: Dataset Condensation at ImageNet Scale From A New
        Perspective", NeurIPS 2023 (SRe2L): "multi-crop optimization" = RandomResizedCrop + flip + circular
        shift each step, cosine LR without warm-up, clamp to the pixel range after each step.
    [2] Yin & Shen, "Dataset Distillation via Curriculum Data Synthesis in Large Data Era", TMLR 2024 (CDA):
        the RandomResizedCrop minimum scale follows an easy-to-hard curriculum.

Random draws use the given CPU ``torch.Generator`` and are moved to ``x.device``, so a step replays
exactly on any device from the same generator state. Every op is differentiable in ``x``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ddkit.errors import check

CURRICULUM_MODES = ("step", "linear", "cosine")


def sample_crop_box(
    height: int,
    width: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """Draw a crop box with torchvision's ``RandomResizedCrop.get_params`` rule.

    Up to 10 tries of (area fraction ~ U(scale), log aspect ratio ~ U(log ratio)); the first box that fits
    is placed uniformly. If none fits, a centre crop clamped to the ratio range. With a generator in the
    same state as torch's default one, the box equals torchvision's.

    Returns:
        ``(top, left, box_height, box_width)``, inside ``[0, height) x [0, width)``.
    """
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator).item())
            return top, left, h, w
    return _centre_box(height, width, ratio)


def _centre_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's fallback: the largest centred box whose aspect ratio lies in ``ratio``."""
    in_ratio = width / height
    h, w = height, width
    if in_ratio < min(ratio):
        h = round(w / min(ratio))
    elif in_ratio > max(ratio):
        w = round(h * max(ratio))
    return (height - h) // 2, (width - w) // 2, h, w


def _crop_resize(x: Tensor, box: tuple[int, int, int, int], size: int) -> Tensor:
    """Crop ``x [N, C, H, W]`` to ``box``, resize bilinearly (no antialias) to ``[N, C, size, size]``."""
    top, left, h, w = box
    crop = x[..., top : top + h, left : left + w]
    return F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)


def random_resized_crop(
    x: Tensor,
    generator: torch.Generator,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    shared: bool = True,
) -> Tensor:
    """RandomResizedCrop of a batch, differentiable in ``x`` (gradients reach the full-resolution images).

    The box follows :func:`sample_crop_box`; the crop is resized with bilinear interpolation,
    ``align_corners=False`` and no antialiasing (torchvision on tensors at the reference version; the same
    as antialiasing whenever the box is not larger than ``size``).

    Args:
        x: images ``[N, C, H, W]``.
        generator: CPU generator for the box draws.
        size: output height and width.
        scale: range of the box area as a fraction of the image area ([2] moves its lower end).
        ratio: range of the box aspect ratio (width / height).
        shared: one box for the whole batch, as SRe2L applies the transform to the batch tensor [1];
            ``False`` draws one box per image, in batch order.

    Returns:
        ``[N, C, size, size]``.
    """
    height, width = x.shape[-2:]
    if shared:
        return _crop_resize(x, sample_crop_box(height, width, generator, scale, ratio), size)
    boxes = [sample_crop_box(height, width, generator, scale, ratio) for _ in range(x.shape[0])]
    return torch.cat([_crop_resize(x[i : i + 1], box, size) for i, box in enumerate(boxes)])


def random_flip(x: Tensor, generator: torch.Generator, shared: bool = True) -> Tensor:
    """Horizontal flip with probability 0.5 (SRe2L's ``RandomHorizontalFlip`` on the batch [1]).

    Args:
        x: images ``[N, C, H, W]``.
        generator: CPU generator; one ``U(0, 1)`` draw for the batch (``shared``) or one per image.
        shared: one decision for the whole batch (the reference) or one per image.

    Returns:
        ``[N, C, H, W]``; flipped where the draw is below 0.5.
    """
    if shared:
        return x.flip(-1) if torch.rand(1, generator=generator).item() < 0.5 else x
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def random_shift(x: Tensor, generator: torch.Generator, jitter: int, symmetric: bool = False) -> Tensor:
    """Circular shift ``torch.roll`` of the whole batch by ``(dy, dx)`` pixels on (H, W) [1].

    Args:
        x: images ``[N, C, H, W]``.
        generator: CPU generator; draws ``dy`` then ``dx``.
        jitter: largest shift in pixels (32 for ImageNet, 4 for CIFAR and Tiny-ImageNet).
        symmetric: shifts uniform in ``[-jitter, jitter]`` (SRe2L's Tiny-ImageNet script) instead of
            ``[0, jitter]`` (every other SRe2L / SC-DD / CDA script).

    Returns:
        ``[N, C, H, W]``.
    """
    check(jitter >= 0, "jitter", "must be >= 0", jitter)
    low = -jitter if symmetric else 0
    dy, dx = torch.randint(low, jitter + 1, (2,), generator=generator).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


def crop_scale_curriculum(
    step: int,
    total_steps: int,
    milestone: float = 1.0,
    mode: str = "cosine",
    start: float = 1.0,
    end: float = 0.08,
) -> float:
    """CDA's easy-to-hard lower bound of the RandomResizedCrop scale [2].

    For ``step < milestone * total_steps``, with ``t = step / (milestone * total_steps)``:
    ``"step"`` gives ``start``; ``"linear"`` gives ``end + (start - end) * (1 - t)``; ``"cosine"`` gives
    ``end + (start - end) * (1 + cos(pi * t)) / 2``. From then on (and always for ``milestone = 0``) it is
    ``end``. Use it as ``scale=(crop_scale_curriculum(...), 1.0)``.

    Raises:
        DDKitError: for an unknown ``mode``, ``milestone`` outside [0, 1] or ``total_steps <= 0``.
    """
    check(mode in CURRICULUM_MODES, "mode", f"must be one of {CURRICULUM_MODES}", mode)
    check(0.0 <= milestone <= 1.0, "milestone", "must be in [0, 1]", milestone)
    check(total_steps > 0, "total_steps", "must be > 0", total_steps)
    horizon = milestone * total_steps
    if step >= horizon:
        return end
    t = step / horizon
    if mode == "step":
        return start
    if mode == "linear":
        return end + (start - end) * (1.0 - t)
    return end + (start - end) * (1.0 + math.cos(math.pi * t)) / 2.0


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """SRe2L's ``lr_cosine_policy`` without warm-up [1].

    ``0.5 * (1 + cos(pi * step / total_steps)) * base_lr``, set every step ``0 .. total_steps - 1``;
    the last step's rate is small but not 0.

    Raises:
        DDKitError: if ``total_steps <= 0``.
    """
    check(total_steps > 0, "total_steps", "must be > 0", total_steps)
    return 0.5 * (1.0 + math.cos(math.pi * step / total_steps)) * base_lr


@torch.no_grad()
def clamp_to_pixel_range_(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """In place: clamp channel ``c`` of normalized images to ``[-m_c / s_c, (1 - m_c) / s_c]`` [1].

    That is pixels in ``[0, 1]`` after denormalization; SRe2L applies it after every optimizer step.

    Args:
        x: normalized images ``[N, C, H, W]`` (may be a leaf requiring grad; no graph is recorded).
        mean: per-channel normalization mean, length ``C``.
        std: per-channel normalization std, length ``C``.

    Returns:
        ``x`` itself.

    Raises:
        DDKitError: if ``mean`` or ``std`` does not have ``C`` entries.
    """
    channels = x.shape[1]
    check(len(mean) == channels, "mean", f"must have {channels} entries", tuple(mean))
    check(len(std) == channels, "std", f"must have {channels} entries", tuple(std))
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return x.clamp_(min=-m / s, max=(1 - m) / s)
