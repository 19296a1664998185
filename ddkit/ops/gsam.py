"""GSAM: surrogate-gap guided sharpness-aware minimization [1], as FTD [2] and DATM [3] train their experts.

One step, with ``g`` the gradient at ``w`` and every norm taken over all parameters together:

1. ``g = grad L(w)``.
2. ``e = rho * g / (||w * g|| + eps) * w**2`` (adaptive, ``*`` elementwise) or ``e = rho * g / (||g|| + eps)``;
   ``w <- w + e``.
3. ``g' = grad L(w + e)``.
4. ``cos = <g, g'> / (||g|| ||g'|| + eps)``; ``d = g' - alpha * (g - cos * ||g|| * g' / (||g'|| + eps))``.
5. ``w <- w - e``; the base optimizer steps with ``d`` as the gradient.

This is ``GSAM.step`` of the official code (``juntang-zhuang/GSAM``, copied into DATM's ``buffer/gsam/gsam.py``)
with a constant ``rho`` (DATM's ``ProportionScheduler`` with ``rho_max == rho_min``). The reference also sets BN
momentum to 0 during the second pass; that is the caller's business (the closure), see
``ddkit.modules.buffer.ExpertTraining``. Two forward/backward passes per step.

References:
    [1] Zhuang et al., "Surrogate Gap Minimization Improves Sharpness-Aware Training", ICLR 2022.
    [2] Du et al., "Minimizing the Accumulated Trajectory Error to Improve Dataset Distillation", CVPR 2023.
    [3] Guo et al., "Towards Lossless Dataset Distillation via Difficulty-Aligned Trajectory Matching",
        ICLR 2024.

Example:
    >>> opt = GSAM(net.parameters(), lambda groups: torch.optim.SGD(groups, lr=0.01), rho=0.01, alpha=0.3)
    >>> def closure():
    ...     opt.zero_grad()
    ...     loss = F.cross_entropy(net(x), y)
    ...     loss.backward()
    ...     return loss
    >>> loss = opt.step(closure)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from ddkit.errors import check


def _norm(tensors: list[Tensor]) -> Tensor:
    """L2 norm of the concatenation of ``tensors``."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


class GSAM(Optimizer):
    """GSAM around a base optimizer (plain SGD in FTD/DATM).

    The base optimizer shares this optimizer's ``param_groups`` and ``state``, so learning-rate schedulers,
    ``state_dict`` and checkpointing see the base optimizer's state (e.g. SGD momentum buffers). Nothing else is
    kept between steps.

    Args:
        params: parameters or parameter groups.
        base_optimizer: builds the base optimizer from parameter groups, e.g.
            ``lambda groups: torch.optim.SGD(groups, lr=0.01)``; default plain SGD with lr 0.01.
        rho: perturbation radius (0.01 in DATM).
        alpha: weight of the removed ascent component (0.3 in DATM).
        adaptive: scale the perturbation by ``w**2`` and the norm by ``|w|`` (on in DATM; its flag cannot be
            switched off from the command line).
        eps: added to the norms in the denominators (1e-12 as in the reference).

    Raises:
        DDKitError: ``rho < 0`` or ``eps < 0``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        base_optimizer: Callable[[list[dict]], Optimizer] | None = None,
        rho: float = 0.01,
        alpha: float = 0.3,
        adaptive: bool = True,
        eps: float = 1e-12,
    ) -> None:
        check(rho >= 0, "gsam_rho", "must be >= 0", rho)
        check(eps >= 0, "gsam_eps", "must be >= 0", eps)
        super().__init__(params, {})
        self.rho, self.alpha, self.adaptive, self.eps = float(rho), float(alpha), bool(adaptive), float(eps)
        build = base_optimizer or (lambda groups: torch.optim.SGD(groups, lr=0.01))
        self.base_optimizer = build(self.param_groups)
        self._link()

    def _link(self) -> None:
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults = self.base_optimizer.defaults

    def load_state_dict(self, state_dict: dict) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self._link()

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        """One GSAM step.

        Args:
            closure: zeroes the gradients, computes the loss, calls ``backward`` and returns the loss; it is called
                twice (at ``w`` and at ``w + e``).

        Returns:
            The loss of the first call (at the unperturbed ``w``).

        Raises:
            DDKitError: no closure.
        """
        check(closure is not None, "closure", "GSAM needs a closure that recomputes loss and gradients", closure)
        with torch.enable_grad():
            loss = closure()
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return loss
        g = [p.grad.detach().clone() for p in params]
        scale = self.rho / (_norm([p.abs() * gi if self.adaptive else gi for p, gi in zip(params, g)]) + self.eps)
        e = [gi * scale * p.pow(2) if self.adaptive else gi * scale for p, gi in zip(params, g)]
        for p, ei in zip(params, e):
            p.add_(ei)
        with torch.enable_grad():
            closure()
        g2 = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        g_norm, g2_norm = _norm(g), _norm(g2)
        cos = sum((a * b).sum() for a, b in zip(g, g2)) / (g_norm * g2_norm + self.eps)
        for p, gi, g2i, ei in zip(params, g, g2, e):
            vertical = gi - cos * g_norm * g2i / (g2_norm + self.eps)
            p.grad = g2i.add(vertical, alpha=-self.alpha)
            p.sub_(ei)
        self.base_optimizer.step()
        return loss
