"""Pieces shared by the stage modules: optimizers, epoch schedules, batch augmentation, real-data evaluation,
the non-finite loss guard."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ddkit.errors import DDKitError

OPTIMIZERS = ("sgd", "adamw", "adam")
SCHEDULES = ("cosine", "step", "constant")
AUGMENTS = ("none", "flip", "crop_flip", "dsa")


def build_optimizer(name: str, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                    nesterov: bool = False) -> torch.optim.Optimizer:
    """``sgd`` (momentum, nesterov), ``adamw`` or ``adam``; bad names and non-positive lr are DDKitErrors."""
    if not lr > 0:
        raise DDKitError(f"lr: must be > 0, got {lr!r}")
    if weight_decay < 0:
        raise DDKitError(f"weight_decay: must be >= 0, got {weight_decay!r}")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=nesterov and momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise DDKitError(f"optimizer: must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def check_nonfinite_streak(streak: int, max_nonfinite: int, what: str, where: str, hint: str,
                           keep: Callable[[], str], value: float) -> None:
    """The non-finite guard's stop (recover, matching): a step with a non-finite loss is skipped and counted; after
    ``max_nonfinite`` such steps in a row the run stops. ``keep()`` writes (or names) the last good artifact and
    returns where it is; the error reads ``<what>: non-finite for <streak> <where>; <hint>; <kept>, got <value>``.
    """
    if streak < max_nonfinite:
        return
    kept = keep()
    raise DDKitError(f"{what}: non-finite for {streak} {where}; {hint}; {kept}, got {value!r}")


def decay_split(net: nn.Module) -> list[dict]:
    """Parameter groups with weight decay only on weights of dim > 1 (convs, linears), as SRe2L's KD does."""
    decay = [p for p in net.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in net.parameters() if p.requires_grad and p.dim() <= 1]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def epoch_lr_factor(schedule: str, epoch: int, total_epochs: int, milestones: Iterable[float] = (0.5,),
                    gamma: float = 0.1, warmup_epochs: int = 0) -> float:
    """Multiplier of the base learning rate at ``epoch`` (0-based).

    ``cosine``: 0.5 * (1 + cos(pi * e / E)); ``step``: gamma ** (number of milestones m with e >= int(m * E)),
    milestones given as fractions of E (DC/DSA: x0.1 at half); ``constant``: 1. A linear warm-up over
    ``warmup_epochs`` multiplies the first epochs.
    """
    if schedule == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * epoch / max(1, total_epochs)))
    elif schedule == "step":
        f = gamma ** sum(epoch >= int(m * total_epochs) for m in milestones)
    elif schedule == "constant":
        f = 1.0
    else:
        raise DDKitError(f"schedule: must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if warmup_epochs > 0 and epoch < warmup_epochs:
        f *= (epoch + 1) / (warmup_epochs + 1)
    return f


def epoch_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_epochs: int, milestones=(0.5,),
                    gamma: float = 0.1, warmup_epochs: int = 0) -> dict:
    """A Lightning ``lr_scheduler`` config stepping :func:`epoch_lr_factor` once per epoch."""
    epoch_lr_factor(schedule, 0, total_epochs, milestones, gamma, warmup_epochs)  # validates the name early
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: epoch_lr_factor(schedule, e, total_epochs, milestones, gamma, warmup_epochs))
    return {"scheduler": sched, "interval": "epoch"}


class BatchAugment(nn.Module):
    """Per-sample augmentation of a batch on its device, driven by a CPU generator that is checkpointed.

    Kinds: ``none``; ``flip`` (horizontal, p=0.5); ``crop_flip`` (random crop after zero-padding by ``padding``
    pixels in the normalized space, then flip); ``dsa`` (DSA, one op group per call, reference constants).
    """

    def __init__(self, kind: str = "none", padding: int = 4, seed: int = 0) -> None:
        super().__init__()
        if kind not in AUGMENTS:
            raise DDKitError(f"augment: must be one of {', '.join(AUGMENTS)}, got {kind!r}")
        self.kind = kind
        self.padding = padding
        self.generator = torch.Generator().manual_seed(seed)

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return x
        if self.kind == "dsa":
            from ddkit.ops.dsa import dsa

            return dsa(x, self.generator)
        if self.kind == "crop_flip":
            x = random_crop(x, self.padding, self.generator)
        return random_flip(x, self.generator)


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image horizontally with probability 0.5."""
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``padding`` and crop back to the input size at a random offset per image."""
    n, _, h, w = x.shape
    xp = torch.nn.functional.pad(x, (padding,) * 4)
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None]
    return xp.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


class RealDataEvaluation:
    """Mixin for a LightningModule whose ``forward`` classifies: validation and test steps on real labelled batches.

    Logs ``{val,test}/loss`` (cross-entropy) and ``{val,test}/acc`` (the module's ``val_acc`` / ``test_acc``
    torchmetrics, synchronised across DDP ranks by torchmetrics itself).
    """

    def _eval_step(self, batch, metric, prefix: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{prefix}/loss", F.cross_entropy(logits.float(), y), sync_dist=True, batch_size=x.shape[0])
        metric(logits, y)
        self.log(f"{prefix}/acc", metric, prog_bar=True, batch_size=x.shape[0])

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_acc, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_acc, "test")
