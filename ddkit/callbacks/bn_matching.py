"""BN statistics matching as a callback: forward hooks on the frozen teacher's BN layers.

Reference: Yin, Xing, Shen, "Squeeze, Recover and Relabel", NeurIPS 2023 (SRe2L), recover stage
(``BNFeatureHook``). Unlike the reference, the hooks are owned by a callback instance attached to one
module (not shared by DataParallel replicas) and are removed when fit ends, fails or is torn down.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle

from ddkit.errors import DDKitError
from ddkit.ops.bn_loss import bn_layer_loss, total_bn_loss


class BNStatisticsMatching(pl.Callback):
    """Record SRe2L's per-layer BN term at every teacher forward and hand the step's loss to the module.

    At ``on_fit_start`` a forward hook is registered on every ``_BatchNorm`` layer of
    ``pl_module.teacher``, in ``modules()`` order, and the callback is reachable as
    ``pl_module.bn_matching``. Each hook computes
    :func:`~ddkit.ops.bn_loss.bn_layer_loss` of the layer's input ``[N, C, H, W]`` against the layer's
    running statistics. The module's ``training_step`` runs the teacher and then calls :meth:`loss`.
    The teacher should be in eval mode (as in SRe2L), so its forward normalizes with the running
    statistics and does not update them.

    Args:
        first_bn_multiplier: weight of the first BN layer in module order (10 in SRe2L / SC-DD / CDA).

    Raises:
        DDKitError: at fit start, if the module has no ``teacher`` module, the teacher has no BN layer,
            or a BN layer keeps no running statistics.

    Example:
        >>> # in the LightningModule: logits = self.teacher(x_aug)
        >>> # loss = F.cross_entropy(logits, y) + r_bn * self.bn_matching.loss()
    """

    def __init__(self, first_bn_multiplier: float = 10.0) -> None:
        super().__init__()
        self.first_bn_multiplier = first_bn_multiplier
        self._module: pl.LightningModule | None = None
        self._handles: list[RemovableHandle] = []
        self._latest: list[Tensor | None] = []
        self._fresh: set[int] = set()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()
        bns = batchnorm_layers(getattr(pl_module, "teacher", None))
        self._latest = [None] * len(bns)
        self._handles = [bn.register_forward_hook(self._hook(i)) for i, bn in enumerate(bns)]
        self._module = pl_module
        pl_module.bn_matching = self

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._detach()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._detach()

    def loss(self) -> Tensor:
        """``R_BN`` of the latest teacher forward (first layer weighted); clears the recorded step.

        Returns:
            A float32 scalar carrying the graph back to the teacher's input.

        Raises:
            RuntimeError: if some BN layer has not run since the previous call (or since fit start).
        """
        missing = [i for i in range(len(self._latest)) if i not in self._fresh]
        if missing:
            raise RuntimeError(
                f"BNStatisticsMatching.loss(): BN layers {missing} (of {len(self._latest)}) have not run "
                "since the last loss() call; run the teacher forward first"
            )
        layers = [r for r in self._latest if r is not None]
        total = total_bn_loss(layers, self.first_bn_multiplier)
        self._latest = [r.detach() for r in layers]
        self._fresh.clear()
        return total

    def layer_losses(self) -> list[Tensor]:
        """Per-layer terms ``r_l`` of the latest teacher forward, detached, in ``modules()`` order.

        Meant for logging; still available after :meth:`loss` until the next forward.

        Raises:
            RuntimeError: if some BN layer has not run since fit start.
        """
        if not self._latest or any(r is None for r in self._latest):
            raise RuntimeError("BNStatisticsMatching.layer_losses(): no teacher forward recorded yet")
        return [r.detach() for r in self._latest if r is not None]

    def _hook(self, index: int) -> Callable[[_BatchNorm, tuple[Tensor, ...], Tensor], None]:
        """The forward hook of the ``index``-th BN layer: stores its term for the current step."""

        def record(bn: _BatchNorm, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            self._latest[index] = bn_layer_loss(inputs[0], bn.running_mean, bn.running_var)
            self._fresh.add(index)

        return record

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        if self._module is not None and getattr(self._module, "bn_matching", None) is self:
            del self._module.bn_matching
        self._module = None
        self._handles = []
        self._latest = []
        self._fresh.clear()


def batchnorm_layers(teacher: object) -> list[_BatchNorm]:
    """The teacher's BN layers in ``modules()`` order; DDKitError if there are none or one has no stats."""
    if not isinstance(teacher, nn.Module):
        raise DDKitError(f"teacher: must be an nn.Module on the module, got {type(teacher).__name__}")
    bns = [m for m in teacher.modules() if isinstance(m, _BatchNorm)]
    if not bns:
        raise DDKitError(f"teacher: has no BatchNorm layers, got {type(teacher).__name__}")
    for name, m in teacher.named_modules():
        if isinstance(m, _BatchNorm) and m.running_mean is None:
            raise DDKitError(f"teacher.{name}: must keep running statistics, got track_running_stats=False")
    return bns
