"""BNStatisticsMatching: hooks, per-step loss and cleanup, run through a real Trainer on CPU."""

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ddkit.callbacks.bn_matching import BNStatisticsMatching
from ddkit.errors import DDKitError
from ddkit.ops.bn_loss import bn_layer_loss, total_bn_loss


def _two_bn_teacher() -> nn.Sequential:
    """Conv(1->2, 1x1, w=(1,-1)) - BN - ReLU - Conv(2->1, 1x1, w=(2,7)) - BN, eval mode, preset running stats.

    For the input (1, 3) the BN terms are 7 and 7, so R_BN = 10 * 7 + 7 = 77 (worked out in
    tests/ops/test_bn_loss.py).
    """
    net = nn.Sequential(
        nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2, eps=0.0), nn.ReLU(),
        nn.Conv2d(2, 1, 1, bias=False), nn.BatchNorm2d(1, eps=0.0),
    )
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
        net[1].running_mean.copy_(torch.tensor([2.0, 1.0]))
        net[1].running_var.copy_(torch.tensor([1.0, 5.0]))
        net[3].weight.copy_(torch.tensor([2.0, 7.0]).view(1, 2, 1, 1))
        net[4].running_mean.fill_(4.0)
        net[4].running_var.fill_(5.0)
    return net.eval().requires_grad_(False)


def _expected_bn_loss(teacher: nn.Sequential, x: torch.Tensor) -> float:
    """R_BN computed from the ops, layer by layer, without hooks."""
    a1 = teacher[0](x)
    a2 = teacher[3](teacher[2](teacher[1](a1)))
    pairs = ((a1, teacher[1]), (a2, teacher[4]))
    layers = [bn_layer_loss(a, bn.running_mean, bn.running_var) for a, bn in pairs]
    return total_bn_loss(layers).item()


class _Recover(pl.LightningModule):
    """Minimal recover-like module: the images are the parameters, the loss is the BN term alone."""

    def __init__(self, teacher: nn.Module, fail: bool = False) -> None:
        super().__init__()
        self.teacher = teacher
        self.x = nn.Parameter(torch.tensor([1.0, 3.0]).view(2, 1, 1, 1))
        self.fail = fail
        self.seen: list[tuple[torch.Tensor, float, list[float]]] = []

    def train(self, mode: bool = True) -> "_Recover":
        super().train(mode)
        self.teacher.eval()
        return self

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("boom")
        x = self.x.detach().clone()
        self.teacher(self.x)
        loss = self.bn_matching.loss()
        self.seen.append((x, loss.item(), [r.item() for r in self.bn_matching.layer_losses()]))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([self.x], lr=0.05)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.zeros(4)), batch_size=1)


def _fit(module: pl.LightningModule, callback: BNStatisticsMatching) -> None:
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[callback],
    )
    trainer.fit(module)


def _hook_count(teacher: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in teacher.modules())


def test_fit_gives_the_bn_loss_and_cleans_up() -> None:
    teacher = _two_bn_teacher()
    module = _Recover(teacher)
    _fit(module, BNStatisticsMatching())
    assert len(module.seen) == 2
    (x0, loss0, layers0), (x1, loss1, _) = module.seen
    assert loss0 == pytest.approx(77.0)
    assert layers0 == pytest.approx([7.0, 7.0])
    assert not torch.equal(x0, x1)  # the images moved, and the second loss follows them
    assert loss1 == pytest.approx(_expected_bn_loss(teacher, x1))
    assert loss1 < loss0
    assert _hook_count(teacher) == 0
    assert not hasattr(module, "bn_matching")


def test_first_bn_multiplier() -> None:
    module = _Recover(_two_bn_teacher())
    _fit(module, BNStatisticsMatching(first_bn_multiplier=1.0))
    assert module.seen[0][1] == pytest.approx(14.0)


def test_hooks_removed_when_training_step_fails() -> None:
    teacher = _two_bn_teacher()
    module = _Recover(teacher, fail=True)
    with pytest.raises(RuntimeError, match="boom"):
        _fit(module, BNStatisticsMatching())
    assert _hook_count(teacher) == 0
    assert not hasattr(module, "bn_matching")


def test_teacher_without_bn_is_rejected() -> None:
    module = _Recover(nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU()))
    with pytest.raises(DDKitError, match=r"^teacher: has no BatchNorm layers, got Sequential$"):
        _fit(module, BNStatisticsMatching())


def test_loss_requires_a_forward_and_uses_the_latest_one() -> None:
    teacher = _two_bn_teacher()
    module = _Recover(teacher)
    callback = BNStatisticsMatching()
    callback.on_fit_start(None, module)  # type: ignore[arg-type]  # the trainer is not used
    assert _hook_count(teacher) == 2
    with pytest.raises(RuntimeError, match=r"BN layers \[0, 1\]"):
        callback.loss()
    teacher(torch.tensor([5.0, -2.0]).view(2, 1, 1, 1))
    teacher(torch.tensor([1.0, 3.0]).view(2, 1, 1, 1))
    assert callback.loss().item() == pytest.approx(77.0)
    assert [r.item() for r in callback.layer_losses()] == pytest.approx([7.0, 7.0])
    with pytest.raises(RuntimeError, match="have not run since the last loss"):
        callback.loss()
    callback.teardown(None, module, "fit")  # type: ignore[arg-type]
    assert _hook_count(teacher) == 0
    assert not hasattr(module, "bn_matching")
