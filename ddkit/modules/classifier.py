"""Supervised training of one network: the SRe2L teacher, an MTT/DATM expert, the full-data baseline, and the
student of the ``hard`` / ``soft`` evaluation protocols."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from ddkit.callbacks.output import ClaimOutput
from ddkit.datamodules.spec import DataSpec, as_spec
from ddkit.errors import DDKitError
from ddkit.formats.common import check_writable
from ddkit.modules.common import AUGMENTS, BatchAugment, RealDataEvaluation, build_optimizer, epoch_scheduler
from ddkit.nets import build_net


class Classifier(RealDataEvaluation, L.LightningModule):
    """Train ``build_net(net, ...)`` with cross-entropy on hard labels, or soft-target cross-entropy when a batch's
    targets are class probabilities ``[N, K]``.

    Args:
        data_spec: the dataset's shape and preprocessing (linked from the datamodule by the CLI).
        net: architecture name for :func:`ddkit.nets.build_net` (ddkit or timm).
        net_kwargs: architecture options, e.g. ``{depth: 3, width: 128, norm: instance}`` for ``convnet``.
        optimizer: ``sgd``, ``adamw`` or ``adam``.
        lr: base learning rate.
        momentum: SGD momentum.
        weight_decay: weight decay.
        nesterov: Nesterov momentum for SGD.
        schedule: per-epoch learning-rate schedule: ``cosine``, ``step`` or ``constant``.
        milestones: for ``step``: fractions of max_epochs where the lr is multiplied by ``gamma``.
        gamma: factor of the ``step`` schedule.
        warmup_epochs: linear warm-up epochs.
        augment: batch augmentation on the device: ``none``, ``flip``, ``crop_flip`` (pad 4), ``dsa``.
        label_smoothing: label smoothing of the hard-label loss.
        export_teacher: write the trained network as a teacher checkpoint (safetensors) here at the end of fit.
        overwrite: replace a teacher file already at ``export_teacher`` (False: refuse it at start).
    """

    def __init__(
        self,
        data_spec: DataSpec | dict | None = None,
        net: str = "convnet",
        net_kwargs: dict[str, Any] | None = None,
        optimizer: str = "sgd",
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        schedule: str = "cosine",
        milestones: list[float] | None = None,
        gamma: float = 0.1,
        warmup_epochs: int = 0,
        augment: str = "none",
        label_smoothing: float = 0.0,
        export_teacher: str | None = None,
        overwrite: bool = False,
    ) -> None:
        super().__init__()
        if not lr > 0:
            raise DDKitError(f"lr: must be > 0, got {lr!r}")
        if augment not in AUGMENTS:
            raise DDKitError(f"augment: must be one of {', '.join(AUGMENTS)}, got {augment!r}")
        if export_teacher:
            check_writable(export_teacher, "export_teacher")
        self.spec = data_spec = as_spec(data_spec)
        self.save_hyperparameters(ignore=["data_spec"])
        self.hparams["data_spec"] = data_spec.to_dict()  # plain types: checkpoints load with weights_only=True
        self.net = build_net(net, data_spec.num_classes, data_spec.in_chans, data_spec.image_size,
                             **(net_kwargs or {}))
        self.augment = BatchAugment(augment)
        k = data_spec.num_classes
        self.train_acc = MulticlassAccuracy(k, average="micro")
        self.val_acc = MulticlassAccuracy(k, average="micro")
        self.test_acc = MulticlassAccuracy(k, average="micro")

    def setup(self, stage: str) -> None:
        # One augmentation stream per rank, derived from the seed Lightning set (seed_everything).
        self.augment.reseed(torch.initial_seed() + 1000003 * self.global_rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.is_floating_point():
            return F.cross_entropy(logits.float(), target.float())
        return F.cross_entropy(logits.float(), target, label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.net(self.augment(x))
        loss = self.loss(logits, y)
        self.log("train/loss", loss, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True)
        if not y.is_floating_point():
            self.train_acc(logits, y)
            self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        opt = build_optimizer(hp.optimizer, self.net.parameters(), hp.lr, hp.momentum, hp.weight_decay, hp.nesterov)
        total = max(1, self.trainer.max_epochs or 1)
        sched = epoch_scheduler(opt, hp.schedule, total, hp.milestones or [0.5], hp.gamma, hp.warmup_epochs)
        return {"optimizer": opt, "lr_scheduler": sched}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["augment_generator"] = self.augment.generator.get_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "augment_generator" in checkpoint:
            self.augment.generator.set_state(checkpoint["augment_generator"])

    def configure_callbacks(self) -> list[L.Callback]:
        hp = self.hparams
        return [ClaimOutput(hp.export_teacher, "export_teacher", "teacher", hp.overwrite)] if hp.export_teacher else []

    def on_fit_end(self) -> None:
        # Not on_train_end: a run resumed from its final checkpoint (killed before this) skips the training loop and
        # its train-end hooks, and must still write its artifact.
        if self.hparams.export_teacher and self.trainer.is_global_zero:
            from ddkit.formats.teacher import TeacherMeta, save_teacher

            meta = TeacherMeta(self.hparams.net, dict(self.hparams.net_kwargs or {}), self.spec,
                               extra={"stage": "classifier", "epochs": self.current_epoch})
            save_teacher(self.hparams.export_teacher, self.net, meta)
