"""CutMix and Mixup with recorded parameters, so a mixed batch can be replayed exactly.

References:
    [1] Yun et al., "CutMix: Regularization Strategy to Train Strong Classifiers with Localizable
        Features", ICCV 2019.
    [2] Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018.
    [3] Yin, Xing, Shen, "Squeeze, Recover and Relabel", NeurIPS 2023 (SRe2L): the relabel stage mixes
        every batch (CutMix Beta(1, 1) or Mixup Beta(0.8, 0.8)) and its FKD variant stores the
        permutation, lambda and box of each batch beside the teacher logits to replay them in training.

:func:`draw_mix` draws the parameters from an explicit CPU ``torch.Generator``; :func:`apply_mix` is
deterministic, so storing a :class:`MixParams` is enough to rebuild the mixed batch on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ddkit.errors import check

MIX_KINDS = ("cutmix", "mixup", "none")
DEFAULT_ALPHA = {"cutmix": 1.0, "mixup": 0.8}


@dataclass(frozen=True)
class MixParams:
    """The recorded parameters of one mixed batch.

    Attributes:
        kind: ``"cutmix"``, ``"mixup"`` or ``"none"``.
        permutation: ``[N]`` int64 (CPU): image ``i`` is mixed with image ``permutation[i]``.
        lam: weight of the original image: the mixup coefficient, or for cutmix the fraction of the
            image area outside the box (1.0 for ``"none"``).
        box: cutmix box ``(y0, y1, x0, x1)``, rows ``y0:y1`` and columns ``x0:x1``; ``None`` otherwise.

    Raises:
        DDKitError: for an unknown ``kind``, or a box given for anything but cutmix (or missing for it).
    """

    kind: str
    permutation: Tensor
    lam: float
    box: tuple[int, int, int, int] | None = None

    def __post_init__(self) -> None:
        check(self.kind in MIX_KINDS, "kind", f"must be one of {MIX_KINDS}", self.kind)
        check((self.box is not None) == (self.kind == "cutmix"), "box", f"must be set iff kind is cutmix "
              f"(kind {self.kind!r})", self.box)


def draw_mix(
    kind: str,
    batch_size: int,
    height: int,
    width: int,
    generator: torch.Generator,
    alpha: float | None = None,
) -> MixParams:
    """Draw the parameters of one batch's CutMix [1] or Mixup [2].

    Draw order: the permutation, then ``lam ~ Beta(alpha, alpha)``, then (cutmix) the box centre row and
    column. The cutmix box has sides ``int(H * sqrt(1 - lam))`` by ``int(W * sqrt(1 - lam))`` around a
    uniform centre, clipped to the image, and ``lam`` is recomputed from the clipped area. ``"none"``
    draws nothing.

    Args:
        kind: ``"cutmix"``, ``"mixup"`` or ``"none"``.
        batch_size: N.
        height: image height H.
        width: image width W.
        generator: CPU generator.
        alpha: Beta parameter; default 1.0 for cutmix and 0.8 for mixup (SRe2L / SC-DD relabel [3]).

    Raises:
        DDKitError: for an unknown ``kind`` or ``alpha <= 0``.
    """
    check(kind in MIX_KINDS, "kind", f"must be one of {MIX_KINDS}", kind)
    if kind == "none":
        return MixParams("none", torch.arange(batch_size), 1.0)
    alpha = DEFAULT_ALPHA[kind] if alpha is None else alpha
    check(alpha > 0, "alpha", "must be > 0", alpha)
    permutation = torch.randperm(batch_size, generator=generator)
    lam = _sample_beta(alpha, generator)
    if kind == "mixup":
        return MixParams("mixup", permutation, lam)
    box = _cutmix_box(lam, height, width, generator)
    y0, y1, x0, x1 = box
    return MixParams("cutmix", permutation, 1.0 - (y1 - y0) * (x1 - x0) / (height * width), box)


def apply_mix(x: Tensor, params: MixParams) -> Tensor:
    """Mix a batch with recorded parameters; differentiable in ``x``.

    Mixup: ``lam * x + (1 - lam) * x[perm]``. CutMix: ``x`` with the box region taken from ``x[perm]``.

    Args:
        x: images ``[N, C, H, W]``.
        params: from :func:`draw_mix` (or loaded from storage).

    Returns:
        ``[N, C, H, W]`` (``x`` itself for ``"none"``).

    Raises:
        DDKitError: if the permutation does not have N entries.
    """
    if params.kind == "none":
        return x
    check(params.permutation.numel() == x.shape[0], "params.permutation", f"must have {x.shape[0]} entries",
          params.permutation.numel())
    other = x[params.permutation.to(x.device)]
    if params.box is None:  # mixup: MixParams holds a box exactly for cutmix
        return params.lam * x + (1.0 - params.lam) * other
    y0, y1, x0, x1 = params.box
    inside = torch.zeros(x.shape[-2:], dtype=torch.bool, device=x.device)
    inside[y0:y1, x0:x1] = True
    return torch.where(inside, other, x)


def _sample_beta(alpha: float, generator: torch.Generator) -> float:
    """``Beta(alpha, alpha)`` from a seed drawn with ``generator`` (torch has no seeded Beta sampler)."""
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator).item())
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def _cutmix_box(lam: float, height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """CutMix's box [1]: cut ratio ``sqrt(1 - lam)``, uniform centre, clipped; ``(y0, y1, x0, x1)``."""
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy = int(torch.randint(0, height, (1,), generator=generator).item())
    cx = int(torch.randint(0, width, (1,), generator=generator).item())
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return y0, y1, x0, x1
