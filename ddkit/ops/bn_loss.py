"""BatchNorm statistics matching loss of SRe2L recovery.

Reference: Yin, Xing, Shen, "Squeeze, Recover and Relabel: Dataset Condensation at ImageNet Scale From
A New Perspective", NeurIPS 2023 (SRe2L), recover stage; reused unchanged by SC-DD (Zhou et al. 2024)
and CDA (Yin & Shen, TMLR 2024).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ddkit.errors import DDKitError, check


def bn_layer_loss(a: Tensor, running_mean: Tensor, running_var: Tensor) -> Tensor:
    """One BN layer's term ``r = ||running_var - var||_2 + ||running_mean - mu||_2``.

    ``mu`` and ``var`` are the per-channel mean and *biased* variance of the BN layer's **input** over
    every dimension but the channel one (N, H, W for ``BatchNorm2d``). The two norms are plain Euclidean
    norms over the channel vector: not squared, not divided by the channel count (SRe2L's
    ``BNFeatureHook``). The statistics are computed in at least float32 (bf16/fp16 inputs are upcast,
    float64 stays float64), so the loss does not lose precision under mixed-precision autocast.

    Args:
        a: BN input, ``[N, C, *]`` (``[N, C, H, W]`` for ``BatchNorm2d``).
        running_mean: the layer's running mean, ``[C]``.
        running_var: the layer's running variance, ``[C]``.

    Returns:
        A scalar (float32, or float64 for a float64 ``a``), differentiable with respect to ``a``.

    Raises:
        DDKitError: if ``a`` has fewer than 2 dimensions or its channel count differs from the stats'.

    Example:
        >>> a = torch.tensor([[[[1.0, 3.0]]]])  # N=1, C=1, H=1, W=2: mu=2, var=1
        >>> float(bn_layer_loss(a, torch.zeros(1), torch.ones(1)))
        2.0
    """
    check(a.dim() >= 2, "a", "must have shape [N, C, ...]", tuple(a.shape))
    check(a.shape[1] == running_mean.numel(), "a", f"must have {running_mean.numel()} channels",
          tuple(a.shape))
    dtype = torch.promote_types(a.dtype, torch.float32)
    a = a.to(dtype)
    dims = [0, *range(2, a.dim())]
    mu = a.mean(dim=dims)
    var = a.var(dim=dims, correction=0)
    var_term = torch.linalg.vector_norm(running_var.to(dtype) - var)
    mean_term = torch.linalg.vector_norm(running_mean.to(dtype) - mu)
    return var_term + mean_term


def total_bn_loss(layer_losses: Sequence[Tensor], first_bn_multiplier: float = 10.0) -> Tensor:
    """SRe2L's ``R_BN = first_bn_multiplier * r_1 + sum_{l >= 2} r_l``.

    Args:
        layer_losses: per-layer scalars ``r_l`` from :func:`bn_layer_loss`, in the teacher's
            ``modules()`` order (the first one is the stem BN).
        first_bn_multiplier: weight of the first layer (10 in every SRe2L / SC-DD / CDA script).

    Returns:
        A scalar.

    Raises:
        DDKitError: if ``layer_losses`` is empty.
    """
    if len(layer_losses) == 0:
        raise DDKitError("layer_losses: must not be empty, got []")
    first, *rest = layer_losses
    return sum(rest, first_bn_multiplier * first)
