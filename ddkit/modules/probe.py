"""Linear probe on a frozen self-supervised backbone, exported as the SC-DD teacher.

SC-DD [0] keeps the backbone exactly as SSL left it (weights and BatchNorm running statistics) and trains only a
linear classifier on top, following MoCo's ``main_lincls.py`` [1]: every parameter but the head is frozen, the
network stays in eval mode for the whole fit, the head starts at N(0, 0.01) with zero bias, and SGD lr 30,
momentum 0.9, weight decay 0, lr x0.1 at 60% and 80% of the epochs. The result is written with
:func:`ddkit.formats.teacher.save_teacher` as a full ``build_net`` classifier (backbone + head), which the
recover and KD stages load with :func:`ddkit.formats.teacher.load_teacher`.

[0] Zhou et al., "Self-supervised Dataset Distillation: A Good Compression Is All You Need", 2024.
[1] He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020 (facebookresearch/moco).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from ddkit.callbacks.output import ClaimOutput
from ddkit.datamodules.spec import DataSpec, as_spec
from ddkit.errors import DDKitError
from ddkit.formats.common import check_writable, load_weights_only
from ddkit.modules.common import AUGMENTS, BatchAugment, RealDataEvaluation, build_optimizer, epoch_scheduler
from ddkit.modules.ssl import head_keys
from ddkit.nets import build_net
from ddkit.nets.registry import check_net_kwargs

ENCODERS = ("auto", "online", "momentum")


def load_ssl_backbone(path: str | os.PathLike, encoder: str = "auto") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read an SSL Lightning checkpoint (``torch.load(weights_only=True)``) written by :mod:`ddkit.modules.ssl`.

    Args:
        path: the ``.ckpt`` file.
        encoder: ``online`` (``backbone.*``), ``momentum`` (``momentum_backbone.*``, the EMA encoder) or ``auto``
            (the method's evaluation encoder: the EMA teacher for DINO, the online encoder otherwise).

    Returns:
        ``(hparams, backbone_state)``: the checkpoint's hyper-parameters (``net``, ``net_kwargs``, ``data_spec``, ...)
        merged with its ``ddkit_ssl`` entry (``method``, ``eval_encoder``), and the headless backbone's state dict
        (prefix removed).

    Raises:
        DDKitError: missing or unreadable file, not an SSL checkpoint, or no such encoder in it.
    """
    path = Path(path)
    if not path.is_file():
        raise DDKitError(f"ssl_checkpoint: file not found, got {str(path)!r}")
    if encoder not in ENCODERS:
        raise DDKitError(f"encoder: must be one of {', '.join(ENCODERS)}, got {encoder!r}")
    ckpt = load_weights_only(path, "ssl_checkpoint")
    if not isinstance(ckpt, dict) or "ddkit_ssl" not in ckpt or "state_dict" not in ckpt:
        raise DDKitError(f"ssl_checkpoint: not a ddkit SSL checkpoint (no ddkit_ssl entry), got {str(path)!r}")
    hp = {**dict(ckpt.get("hyper_parameters", {})), **ckpt["ddkit_ssl"]}
    if encoder == "auto":
        encoder = hp.get("eval_encoder", "online")
    prefix = "momentum_backbone." if encoder == "momentum" else "backbone."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise DDKitError(f"encoder: the {hp['method']} checkpoint has no {encoder} backbone, got {encoder!r}")
    return hp, state


class LinearProbe(RealDataEvaluation, L.LightningModule):
    """Train a linear head on a frozen backbone kept in eval mode; export backbone + head as a teacher.

    Args:
        data_spec: the dataset's shape and preprocessing (linked from the datamodule by the CLI).
        ssl_checkpoint: Lightning checkpoint of an SSL pretraining run (:mod:`ddkit.modules.ssl`). ``None``
            probes a randomly initialised ``net`` instead (a baseline).
        encoder: ``auto`` (the method's evaluation encoder), ``online`` or ``momentum``.
        net: architecture when ``ssl_checkpoint`` is None (otherwise read from the checkpoint).
        net_kwargs: its options when ``ssl_checkpoint`` is None.
        optimizer: ``sgd``, ``adamw`` or ``adam`` (for the head only).
        lr: base learning rate (30 in MoCo's probe).
        momentum: SGD momentum.
        weight_decay: weight decay of the head (0 in MoCo's probe).
        schedule: per-epoch schedule: ``step`` (default), ``cosine`` or ``constant``.
        milestones: for ``step``: fractions of max_epochs where the lr is multiplied by ``gamma``.
        gamma: factor of the ``step`` schedule.
        augment: batch augmentation of in-memory data on the device: ``none``, ``flip``, ``crop_flip``, ``dsa``
            (folder datasets are already RandomResizedCrop + flip in the datamodule).
        head_init_std: std of the head's normal initialisation (bias zero).
        export_teacher: write backbone + head as a teacher checkpoint (safetensors) here at the end of fit.
        overwrite: replace a teacher file already at ``export_teacher`` (False: refuse it at start).
    """

    def __init__(
        self,
        data_spec: DataSpec | dict | None = None,
        ssl_checkpoint: str | None = None,
        encoder: str = "auto",
        net: str | None = None,
        net_kwargs: dict[str, Any] | None = None,
        optimizer: str = "sgd",
        lr: float = 30.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        schedule: str = "step",
        milestones: list[float] | None = None,
        gamma: float = 0.1,
        augment: str = "none",
        head_init_std: float = 0.01,
        export_teacher: str | None = None,
        overwrite: bool = False,
    ) -> None:
        super().__init__()
        if augment not in AUGMENTS:
            raise DDKitError(f"augment: must be one of {', '.join(AUGMENTS)}, got {augment!r}")
        if not lr > 0:
            raise DDKitError(f"lr: must be > 0, got {lr!r}")
        if export_teacher:
            check_writable(export_teacher, "export_teacher")
        self.spec = data_spec = as_spec(data_spec)
        method = "random"
        if ssl_checkpoint is not None:
            ssl_hp, state = load_ssl_backbone(ssl_checkpoint, encoder)
            net, method = ssl_hp["net"], ssl_hp["method"]
            net_kwargs = check_net_kwargs(ssl_hp.get("net_kwargs") or {}, "ssl_checkpoint.net_kwargs")
            self._check_spec(ssl_hp.get("data_spec"), data_spec)
        elif net is None:
            raise DDKitError("ssl_checkpoint: required unless net is given (a random-init baseline), got None")
        self.save_hyperparameters(ignore=["data_spec"])
        self.hparams["data_spec"] = data_spec.to_dict()  # plain types: checkpoints load with weights_only=True
        self.hparams["net"], self.hparams["net_kwargs"] = net, net_kwargs or {}
        self.method = method
        try:
            self.net = build_net(net, data_spec.num_classes, data_spec.in_chans, data_spec.image_size,
                                 **(net_kwargs or {}))
        except DDKitError as e:  # with a checkpoint, the net and its options are the checkpoint's; sizes the data's
            from_data = str(e).startswith(("num_classes", "in_chans", "image_size"))
            raise DDKitError(f"ssl_checkpoint.{e}" if ssl_checkpoint and not from_data else str(e)) from None
        if ssl_checkpoint is not None:
            self._load_backbone(state)
        for p in self.net.parameters():
            p.requires_grad_(False)
        torch.nn.init.normal_(self.net.head.weight, std=head_init_std)
        torch.nn.init.zeros_(self.net.head.bias)
        for p in self.net.head.parameters():
            p.requires_grad_(True)
        self.net.eval()
        self.augment = BatchAugment(augment)
        k = data_spec.num_classes
        self.train_acc = MulticlassAccuracy(k, average="micro")
        self.val_acc = MulticlassAccuracy(k, average="micro")
        self.test_acc = MulticlassAccuracy(k, average="micro")

    @staticmethod
    def _check_spec(ssl_spec: dict | None, spec: DataSpec) -> None:
        if ssl_spec is None:
            return
        ssl_spec = DataSpec.from_dict(ssl_spec, "ssl_checkpoint.data_spec") if isinstance(ssl_spec, dict) \
            else as_spec(ssl_spec)
        if ssl_spec.in_chans != spec.in_chans:
            raise DDKitError(f"data_spec.in_chans: the SSL backbone takes {ssl_spec.in_chans} channels, "
                             f"got {spec.in_chans}")
        if tuple(ssl_spec.mean) != tuple(spec.mean) or tuple(ssl_spec.std) != tuple(spec.std):
            warnings.warn(f"probe data normalization {spec.mean}/{spec.std} differs from the SSL run's "
                          f"{ssl_spec.mean}/{ssl_spec.std}", stacklevel=3)

    def _load_backbone(self, state: dict[str, torch.Tensor]) -> None:
        head = head_keys(self.net)
        expected = set(self.net.state_dict()) - head
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            bad = sorted(missing)[:3] + sorted(unexpected)[:3]
            raise DDKitError(f"ssl_checkpoint: backbone weights do not fit net {self.hparams.net!r} "
                             f"({len(missing)} missing, {len(unexpected)} unexpected keys), got {bad}")
        self.net.load_state_dict(state, strict=False)

    def train(self, mode: bool = True):
        """Lightning switches modules to train mode every epoch; the probed network stays in eval mode (its BN
        layers normalize with, and never update, the SSL running statistics)."""
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            f = self.net.forward_features(x)
        return self.net.head(f)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(self.augment(x))
        loss = F.cross_entropy(logits.float(), y)
        self.log("train/loss", loss, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True)
        self.train_acc(logits, y)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def setup(self, stage: str) -> None:
        self.augment.reseed(torch.initial_seed() + 1000003 * self.global_rank)

    def configure_optimizers(self):
        hp = self.hparams
        opt = build_optimizer(hp.optimizer, self.net.head.parameters(), hp.lr, hp.momentum, hp.weight_decay)
        total = max(1, self.trainer.max_epochs or 1)
        sched = epoch_scheduler(opt, hp.schedule, total, hp.milestones or [0.6, 0.8], hp.gamma)
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

            hp = self.hparams
            extra = {"stage": "probe", "method": self.method, "encoder": hp.encoder, "epochs": self.current_epoch,
                     "ssl_checkpoint": str(Path(hp.ssl_checkpoint).resolve()) if hp.ssl_checkpoint else None}
            save_teacher(hp.export_teacher, self.net, TeacherMeta(hp.net, dict(hp.net_kwargs or {}), self.spec,
                                                                  extra=extra))
