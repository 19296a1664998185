"""ZCA whitening as MTT and DATM use it: kornia's fit, eps 0.1, unbiased covariance, fitted on the train set.

With ``X`` the ``[N, D]`` flattened images (``D = C * H * W``), ``mu`` their mean and
``Sigma = (X - mu)^T (X - mu) / (N - 1) = U diag(S) U^T``, the whitening transform is
``T = U diag((S + eps)^-1/2) U^T`` and ``x -> (x - mu) T``; the inverse is ``z -> z T^-1 + mu`` with
``T^-1 = U diag((S + eps)^1/2) U^T`` (kornia's ``ZCAWhitening(eps=0.1, compute_inv=True)`` in MTT's
``get_dataset`` [1], reused by DATM [2]).

References:
    [1] Cazenavette et al., "Dataset Distillation by Matching Training Trajectories", CVPR 2022.
    [2] Guo et al., "Towards Lossless Dataset Distillation via Difficulty-Aligned Trajectory Matching",
        ICLR 2024.

Example:
    >>> train = torch.rand(100, 1, 4, 4)
    >>> zca = fit_zca(train)
    >>> white = apply_zca(train, zca)
    >>> torch.allclose(invert_zca(white, zca), train, atol=1e-4)
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import kornia
import torch
from torch import Tensor

from ddkit.errors import check

_KEYS = ("mean", "transform", "inverse")


@dataclass(eq=False)
class ZCA:
    """A fitted ZCA whitening, float32 on the CPU.

    Args:
        mean: ``[D]`` mean of the flattened training images.
        transform: ``[D, D]`` whitening matrix ``T`` (symmetric), applied as ``(x - mean) @ T``.
        inverse: ``[D, D]`` its inverse, applied as ``z @ inverse + mean``.
    """

    mean: Tensor
    transform: Tensor
    inverse: Tensor

    @property
    def dim(self) -> int:
        """``D``, the number of features per image."""
        return self.mean.numel()

    def state_dict(self) -> dict[str, Tensor]:
        """``{"mean", "transform", "inverse"}`` as contiguous CPU float32 tensors (safetensors-ready)."""
        return {key: getattr(self, key).detach().to("cpu", torch.float32).contiguous() for key in _KEYS}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> ZCA:
        """Rebuild a ``ZCA`` from ``state_dict()`` output.

        Raises:
            DDKitError: if a key is missing or the shapes are not ``[D]``, ``[D, D]``, ``[D, D]``.
        """
        check(set(_KEYS) <= set(state), "zca", f"state must have keys {list(_KEYS)}", sorted(state))
        d = state["mean"].numel()
        shapes = tuple(tuple(state[key].shape) for key in _KEYS)
        check(shapes == ((d,), (d, d), (d, d)), "zca", "shapes must be [D], [D, D], [D, D]", shapes)
        return cls(**{key: state[key].to("cpu", torch.float32) for key in _KEYS})


def fit_zca(x: Tensor, eps: float = 0.1) -> ZCA:
    """Fit ZCA whitening on a whole training set with kornia's ``zca_mean`` (unbiased covariance).

    The fit runs in ``x``'s dtype and device (the reference fits float32 images on the GPU); the result is
    stored as float32 on the CPU.

    Args:
        x: ``[N, C, H, W]`` training images, ``N >= 2`` (MTT/DATM: ``ToTensor()`` images in [0, 1]).
        eps: added to the covariance eigenvalues (0.1 in MTT and DATM).

    Returns:
        The fitted ``ZCA`` with ``D = C * H * W``.

    Raises:
        DDKitError: if ``x`` is not 4-D or has fewer than 2 samples.
    """
    check(x.dim() == 4 and x.shape[0] >= 2, "x", "must be a [N, C, H, W] tensor with N >= 2", tuple(x.shape))
    transform, mean, inverse = kornia.enhance.zca_mean(
        x.detach(), dim=0, unbiased=True, eps=float(eps), return_inverse=True
    )
    return ZCA(*(t.detach().to("cpu", torch.float32) for t in (mean.reshape(-1), transform, inverse)))


def _flat(x: Tensor, zca: ZCA) -> Tensor:
    """``[N, D]`` view of ``x``; raises ``DDKitError`` unless each sample has ``D`` elements."""
    check(
        x.dim() >= 2 and math.prod(x.shape[1:]) == zca.dim,
        "x",
        f"must have C*H*W = {zca.dim} per sample",
        tuple(x.shape),
    )
    return x.reshape(x.shape[0], -1)


def apply_zca(x: Tensor, zca: ZCA) -> Tensor:
    """Whiten: ``(x - mean) @ T`` per flattened sample.

    Args:
        x: ``[N, C, H, W]`` images in the space ``zca`` was fitted on.
        zca: the fitted whitening; moved to ``x``'s device and dtype for the product.

    Returns:
        ``[N, C, H, W]`` whitened images, differentiable w.r.t. ``x``.
    """
    mean, transform = zca.mean.to(x), zca.transform.to(x)
    return ((_flat(x, zca) - mean) @ transform).reshape(x.shape)


def invert_zca(x: Tensor, zca: ZCA) -> Tensor:
    """Undo ``apply_zca``: ``x @ T^-1 + mean`` per flattened sample (for viewing and saving images).

    Args:
        x: ``[N, C, H, W]`` whitened images.
        zca: the fitted whitening.

    Returns:
        ``[N, C, H, W]`` images in the original space.
    """
    mean, inverse = zca.mean.to(x), zca.inverse.to(x)
    return (_flat(x, zca) @ inverse + mean).reshape(x.shape)
