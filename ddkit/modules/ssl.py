"""Self-supervised pretraining of a ``build_net`` backbone (the SC-DD squeeze), assembled from lightly's parts.

One base class, :class:`SSLPretrain` (backbone without its classifier, optimizer and per-step warm-up + cosine lr,
validation features for the kNN monitor), one for momentum encoders, :class:`MomentumSSL` (the EMA update with a
cosine momentum schedule, run once per optimizer step), and one small class per method: :class:`MoCoV2`,
:class:`MoCoV3`, :class:`SwAV`, :class:`DINO`, :class:`SimCLR`, :class:`BYOL`. Losses, heads, transforms, memory
banks, batch shuffling and momentum updates are lightly's.

References:
    [0] SC-DD: Zhou et al., "Self-supervised Dataset Distillation: A Good Compression Is All You Need", 2024.
    [1] MoCo v2: Chen et al., arXiv 2003.04297.  [2] MoCo v3: Chen, Xie, He, ICCV 2021.
    [3] SwAV: Caron et al., NeurIPS 2020.  [4] DINO: Caron et al., ICCV 2021.
    [5] SimCLR: Chen et al., ICML 2020.  [6] BYOL: Grill et al., NeurIPS 2020.

Checkpoint contract (read by :mod:`ddkit.modules.probe`): the state dict holds the online backbone under
``backbone.`` and, for momentum methods, the EMA backbone under ``momentum_backbone.``; the hyper-parameters hold
``net``, ``net_kwargs`` and ``data_spec`` (a dict); ``checkpoint["ddkit_ssl"]`` holds ``method``, ``eval_encoder``
(``online`` or ``momentum``) and ``feature_dim``.
The backbone's keys are those of ``build_net(net, ...)`` minus its classifier.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddkit.datamodules.spec import DataSpec, as_spec
from ddkit.errors import DDKitError
from ddkit.nets import build_net
from ddkit.nets.convnet import ConvNet

SSL_OPTIMIZERS = ("sgd", "lars", "adamw")


# ---------------------------------------------------------------------------------------------- backbone helpers


def strip_head(net: nn.Module) -> nn.Module:
    """Remove the classifier of a ``build_net`` network in place (replaced by ``nn.Identity``) and return it."""
    from ddkit.nets.registry import TimmNet

    if isinstance(net, TimmNet):
        net.model.reset_classifier(0)
        return net
    head = net.head
    for name, child in net.named_children():
        if child is head:
            setattr(net, name, nn.Identity())
            return net
    raise DDKitError(f"net: cannot find the classifier module of {type(net).__name__}, got {type(head).__name__}")


def head_keys(net: nn.Module) -> set[str]:
    """State-dict keys of ``net``'s classifier (what a headless backbone lacks)."""
    head = net.head
    for name, module in net.named_modules():
        if module is head:
            return {f"{name}.{k}" for k in head.state_dict()}
    raise DDKitError(f"net: cannot find the classifier module of {type(net).__name__}, got {type(head).__name__}")


def backbone_features(net: nn.Module, x: Tensor, pool: bool) -> Tensor:
    """``net.forward_features(x)`` ``[N, D]``; with ``pool`` a ConvNet's flattened ``[C, H, W]`` map is averaged over
    space instead (``[N, C]``, independent of the input size). Nets whose features are pooled ignore ``pool``."""
    if pool and isinstance(net, ConvNet):
        return net.features(x).mean(dim=(2, 3))
    return net.forward_features(x)


def contrastive_loss(q: Tensor, k: Tensor, temperature: float, gather_distributed: bool = True) -> Tensor:
    """MoCo v3's InfoNCE of queries ``q`` [N, D] against keys ``k`` [N, D] (no gradient to ``k``), with the keys of
    every rank as negatives; scaled by ``2 * temperature`` as in the reference ``moco-v3`` code.
    """
    from lightly.models.utils import concat_all_gather
    from lightly.utils import dist

    q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1)
    offset = 0
    if gather_distributed and dist.world_size() > 1:
        offset = dist.rank() * q.shape[0]
        k = concat_all_gather(k)
    logits = q @ k.t() / temperature
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, labels) * (2 * temperature)


# ---------------------------------------------------------------------------------------------- base classes


class SSLPretrain(L.LightningModule):
    """What every SSL method shares. Subclasses build their heads and losses and implement :meth:`ssl_loss`.

    Args:
        data_spec: the dataset's shape and preprocessing (linked from the datamodule by the CLI).
        net: backbone architecture for :func:`ddkit.nets.build_net` (its classifier is removed), e.g. ``convnet_bn``,
            ``resnet18``, ``resnet50`` or a timm name.
        net_kwargs: architecture options (``{depth: 3, width: 64}``, ``{stem: imagenet}``, ...).
        pool_features: for ConvNet backbones (whose ``forward_features`` is a flattened ``C x H x W`` map), use the
            spatial average (``C`` dims) as the representation; needed for multi-crop with smaller local crops.
            Pooled nets (ResNet, timm) ignore it.
        optimizer: ``sgd``, ``lars`` (lightly's) or ``adamw``.
        lr: base learning rate (not rescaled by the batch size: put the scaled value in the config).
        momentum: SGD / LARS momentum.
        weight_decay: weight decay, not applied to biases and normalization parameters.
        warmup_epochs: linear warm-up of the lr (fractions allowed), then cosine decay per step.
        min_lr_ratio: final lr as a fraction of ``lr``.
        gather_distributed: under DDP, gather negatives / Sinkhorn sums across ranks (lightly's flags).
        knn_k: neighbours of the online kNN monitor on the validation loaders; 0 disables it.
        knn_temperature: kNN vote weights ``exp(cos / t)`` (InstDisc); ``None`` = plain majority vote.
    """

    METHOD = "ssl"
    EVAL_ENCODER = "online"
    NUM_VIEWS: tuple[int, int] = (2, 2)  # (min, max) views per image

    def __init__(
        self,
        data_spec: DataSpec | dict | None = None,
        net: str = "convnet_bn",
        net_kwargs: dict[str, Any] | None = None,
        pool_features: bool = True,
        optimizer: str = "sgd",
        lr: float = 0.06,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        warmup_epochs: float = 0.0,
        min_lr_ratio: float = 0.0,
        gather_distributed: bool = True,
        knn_k: int = 20,
        knn_temperature: float | None = 0.1,
    ) -> None:
        super().__init__()
        if optimizer not in SSL_OPTIMIZERS:
            raise DDKitError(f"optimizer: must be one of {', '.join(SSL_OPTIMIZERS)}, got {optimizer!r}")
        if not lr > 0:
            raise DDKitError(f"lr: must be > 0, got {lr!r}")
        if weight_decay < 0:
            raise DDKitError(f"weight_decay: must be >= 0, got {weight_decay!r}")
        if warmup_epochs < 0:
            raise DDKitError(f"warmup_epochs: must be >= 0, got {warmup_epochs!r}")
        if not 0 <= min_lr_ratio <= 1:
            raise DDKitError(f"min_lr_ratio: must be in [0, 1], got {min_lr_ratio!r}")
        if knn_k < 0:
            raise DDKitError(f"knn_k: must be >= 0, got {knn_k!r}")
        self.spec = data_spec = as_spec(data_spec)
        self.save_hyperparameters(ignore=["data_spec"])
        self.hparams["data_spec"] = data_spec.to_dict()  # plain types: checkpoints load with weights_only=True
        self.backbone = strip_head(build_net(net, data_spec.num_classes, data_spec.in_chans, data_spec.image_size,
                                             **(net_kwargs or {})))
        self.feature_dim = self._probe_dim(data_spec.image_size)
        self.momentum_pairs: list[tuple[nn.Module, nn.Module]] = []
        self._sizes_ok = {data_spec.image_size}

    # -- representation --------------------------------------------------------------------------------------

    @torch.no_grad()
    def _probe_dim(self, size: int) -> int:
        was_training = self.backbone.training
        self.backbone.eval()  # a dummy forward in eval mode leaves the BN running statistics alone
        x = torch.zeros(2, self.spec.in_chans, size, size, device=next(self.backbone.parameters()).device)
        dim = backbone_features(self.backbone, x, self.hparams.pool_features).shape[1]
        self.backbone.train(was_training)
        return int(dim)

    def check_crop_size(self, size: int, field: str) -> None:
        """Raise if views of ``size`` px give a representation of another size than the global views'."""
        if size != self.spec.image_size and self._probe_dim(size) != self.feature_dim:
            raise DDKitError(f"{field}: backbone {self.hparams.net!r} gives {self._probe_dim(size)}-d features at "
                             f"{size} px but {self.feature_dim}-d at {self.spec.image_size} px (set pool_features "
                             f"or use full-size crops), got {size}")

    def embed(self, x: Tensor) -> Tensor:
        """The online backbone's representation ``[N, feature_dim]``."""
        return backbone_features(self.backbone, x, self.hparams.pool_features)

    def momentum_embed(self, x: Tensor) -> Tensor:
        return backbone_features(self.momentum_backbone, x, self.hparams.pool_features)

    @property
    def eval_backbone(self) -> nn.Module:
        """The encoder used for evaluation (kNN monitor, probe): the EMA one for DINO, the online one otherwise."""
        return self.momentum_backbone if self.EVAL_ENCODER == "momentum" else self.backbone

    # -- steps -----------------------------------------------------------------------------------------------

    def ssl_loss(self, views: list[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The method's loss for one batch of views (global views first) and extra values to log."""
        raise NotImplementedError

    def training_step(self, batch, batch_idx: int) -> Tensor:
        views = batch[0]
        lo, hi = self.NUM_VIEWS
        if not isinstance(views, (list, tuple)) or not lo <= len(views) <= hi:
            n = len(views) if isinstance(views, (list, tuple)) else "a tensor, not a list of"
            raise DDKitError(f"data.views: {self.METHOD} needs {lo}-{hi} views per image, got {n}")
        for v in views:
            if v.shape[-1] not in self._sizes_ok:
                self.check_crop_size(v.shape[-1], "data.view_kwargs")
                self._sizes_ok.add(v.shape[-1])
        loss, extra = self.ssl_loss(list(views))
        bs = views[0].shape[0]
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True, batch_size=bs)
        for name, value in extra.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=False, batch_size=bs)
        return loss

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Features of a plain labelled batch for the kNN monitor (index 0: bank, 1: queries); no gradient, and
        the backbone is in eval mode here, so its BN statistics are not touched."""
        x, y = batch
        return {"features": backbone_features(self.eval_backbone, x, self.hparams.pool_features).detach(),
                "labels": y}

    def configure_callbacks(self):
        if self.hparams.knn_k > 0:
            from ddkit.callbacks.knn import KNNMonitor

            return [KNNMonitor(k=self.hparams.knn_k, temperature=self.hparams.knn_temperature)]
        return []

    # -- optimization ----------------------------------------------------------------------------------------

    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (decay if p.dim() > 1 else no_decay).append(p)
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        elif hp.optimizer == "lars":
            from lightly.utils.lars import LARS

            opt = LARS(groups, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = max(1, self.trainer.max_epochs or 1)
        warmup = min(total, round(hp.warmup_epochs * total / epochs))

        def factor(step: int) -> float:
            from lightly.utils.scheduler import cosine_warmup_schedule

            return cosine_warmup_schedule(min(step, total), total, 1.0, hp.min_lr_ratio, warmup, 0.0)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- memory banks (lightly keeps them out of the state dict) ---------------------------------------------

    def _banks(self) -> dict[str, nn.Module]:
        from lightly.models.modules.memory_bank import MemoryBankModule

        return {n: m for n, m in self.named_modules() if isinstance(m, MemoryBankModule) and len(m.size) == 2}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ddkit_ssl"] = {"method": self.METHOD, "eval_encoder": self.EVAL_ENCODER,
                                   "feature_dim": self.feature_dim}
        checkpoint["ssl_memory_banks"] = {n: {"bank": m.bank.cpu(), "ptr": m.bank_ptr.cpu()}
                                          for n, m in self._banks().items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        for name, module in self._banks().items():
            state = checkpoint.get("ssl_memory_banks", {}).get(name)
            if state is not None and state["bank"].shape == module.bank.shape:
                module.bank.copy_(state["bank"])
                module.bank_ptr.copy_(state["ptr"])


class MomentumSSL(SSLPretrain):
    """An SSL method with momentum (EMA) encoders; subclasses append ``(online, ema)`` to ``momentum_pairs``.

    The EMA update runs in ``on_train_batch_end`` once per optimizer step (safe under gradient accumulation), with
    the momentum following lightly's cosine schedule from ``base_momentum`` to ``final_momentum`` over all steps
    (equal values give a constant momentum, as in MoCo v2).

    Args:
        base_momentum: EMA momentum at the first step.
        final_momentum: EMA momentum at the last step.
        **kwargs: :class:`SSLPretrain` options.
    """

    def __init__(self, base_momentum: float = 0.996, final_momentum: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for field, value in (("base_momentum", base_momentum), ("final_momentum", final_momentum)):
            if not 0 <= value <= 1:
                raise DDKitError(f"{field}: must be in [0, 1], got {value!r}")
        self._ema_step = -1

    def make_momentum(self, online: nn.Module, ema: nn.Module | None = None) -> nn.Module:
        """A frozen copy of ``online`` registered for the EMA update. Pass a freshly built twin as ``ema`` for
        modules that cannot be deep-copied (weight-normalized layers); it gets ``online``'s weights."""
        from lightly.models.utils import deactivate_requires_grad

        if ema is None:
            ema = copy.deepcopy(online)
        else:
            ema.load_state_dict(online.state_dict())
        deactivate_requires_grad(ema)
        self.momentum_pairs.append((online, ema))
        return ema

    def current_momentum(self) -> float:
        from lightly.utils.scheduler import cosine_schedule

        total = max(1, int(self.trainer.estimated_stepping_batches))
        return cosine_schedule(min(self.global_step, total), total, self.hparams.base_momentum,
                               self.hparams.final_momentum)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        from lightly.models.utils import update_momentum

        if self.global_step == self._ema_step or self.global_step == 0:
            return  # no optimizer step since the last update
        self._ema_step = self.global_step
        m = self.current_momentum()
        for online, ema in self.momentum_pairs:
            update_momentum(online, ema, m)
        self.log("train/ema_momentum", m, on_step=True, on_epoch=False)


# ---------------------------------------------------------------------------------------------- methods


class MoCoV2(MomentumSSL):
    """MoCo v2 [1]: a query encoder and an EMA key encoder (constant momentum by default), InfoNCE against a
    queue of past keys (lightly's ``NTXentLoss`` with a memory bank, keys gathered across ranks before enqueueing),
    and shuffled BN for the keys (lightly's ``batch_shuffle``, across ranks under DDP).

    Args:
        proj_hidden_dim: hidden size of the 2-layer MLP projection head.
        proj_output_dim: embedding size.
        temperature: InfoNCE temperature.
        queue_size: negatives in the queue (65536 on ImageNet, 4096 on CIFAR).
        shuffle_bn: shuffle the key batch (across ranks under DDP) before the key encoder's BN.
        symmetric: also use view 2 as the query and view 1 as the key (symmetrized loss, 2x the signal per step).
        base_momentum: EMA momentum at the first step (0.999 in MoCo v2).
        final_momentum: EMA momentum at the last step (0.999: constant, as in MoCo v2).
        **kwargs: :class:`SSLPretrain` options.
    """

    METHOD = "mocov2"

    def __init__(self, proj_hidden_dim: int = 2048, proj_output_dim: int = 128, temperature: float = 0.2,
                 queue_size: int = 65536, shuffle_bn: bool = True, symmetric: bool = False,
                 base_momentum: float = 0.999, final_momentum: float = 0.999, **kwargs: Any) -> None:
        super().__init__(base_momentum=base_momentum, final_momentum=final_momentum, **kwargs)
        from lightly.loss import NTXentLoss
        from lightly.models.modules import MoCoProjectionHead

        if queue_size < 0:
            raise DDKitError(f"queue_size: must be >= 0, got {queue_size!r}")
        self.projection_head = MoCoProjectionHead(self.feature_dim, proj_hidden_dim, proj_output_dim)
        self.momentum_backbone = self.make_momentum(self.backbone)
        self.momentum_projection_head = self.make_momentum(self.projection_head)
        self.criterion = NTXentLoss(temperature=temperature,
                                    memory_bank_size=(queue_size, proj_output_dim) if queue_size else 0,
                                    gather_distributed=self.hparams.gather_distributed)

    @torch.no_grad()
    def keys(self, x: Tensor) -> Tensor:
        from lightly.models.utils import batch_shuffle, batch_unshuffle
        from lightly.utils import dist

        distributed = dist.world_size() > 1
        if self.hparams.shuffle_bn:
            x, order = batch_shuffle(x, distributed=distributed)
        k = self.momentum_projection_head(self.momentum_embed(x))
        return batch_unshuffle(k, order, distributed=distributed) if self.hparams.shuffle_bn else k

    def ssl_loss(self, views):
        x0, x1 = views
        if self.hparams.symmetric:  # one call: both directions against the queue as it was before this batch
            q = self.projection_head(self.embed(torch.cat([x0, x1])))
            return self.criterion(q, torch.cat([self.keys(x1), self.keys(x0)])), {}
        return self.criterion(self.projection_head(self.embed(x0)), self.keys(x1)), {}


class MoCoV3(MomentumSSL):
    """MoCo v3 [2]: BN-MLP projector (3 layers) and predictor (2 layers) on the online encoder, an EMA encoder with a
    cosine momentum schedule, and the symmetric InfoNCE :func:`contrastive_loss` with in-batch keys of all ranks.

    Args:
        proj_hidden_dim: hidden size of the projector (4096 in MoCo v3).
        proj_output_dim: embedding size (256).
        pred_hidden_dim: hidden size of the predictor (4096).
        temperature: InfoNCE temperature (1.0 for ResNets, 0.2 for ViTs in MoCo v3).
        base_momentum: EMA momentum at the first step (0.99).
        final_momentum: EMA momentum at the last step (1.0).
        **kwargs: :class:`SSLPretrain` options.
    """

    METHOD = "mocov3"

    def __init__(self, proj_hidden_dim: int = 4096, proj_output_dim: int = 256, pred_hidden_dim: int = 4096,
                 temperature: float = 1.0, base_momentum: float = 0.99, final_momentum: float = 1.0,
                 **kwargs: Any) -> None:
        super().__init__(base_momentum=base_momentum, final_momentum=final_momentum, **kwargs)
        from lightly.models.modules import BYOLPredictionHead, MoCoProjectionHead

        if not temperature > 0:
            raise DDKitError(f"temperature: must be > 0, got {temperature!r}")
        self.projection_head = MoCoProjectionHead(self.feature_dim, proj_hidden_dim, proj_output_dim,
                                                  num_layers=3, batch_norm=True)
        self.prediction_head = BYOLPredictionHead(proj_output_dim, pred_hidden_dim, proj_output_dim)
        self.momentum_backbone = self.make_momentum(self.backbone)
        self.momentum_projection_head = self.make_momentum(self.projection_head)

    def ssl_loss(self, views):
        x0, x1 = views
        q0 = self.prediction_head(self.projection_head(self.embed(x0)))
        q1 = self.prediction_head(self.projection_head(self.embed(x1)))
        with torch.no_grad():
            k0 = self.momentum_projection_head(self.momentum_embed(x0))
            k1 = self.momentum_projection_head(self.momentum_embed(x1))
        t, g = self.hparams.temperature, self.hparams.gather_distributed
        return contrastive_loss(q0, k1, t, g) + contrastive_loss(q1, k0, t, g), {}


class SimCLR(SSLPretrain):
    """SimCLR [5]: BN-MLP projection head and lightly's ``NTXentLoss`` with negatives gathered across ranks.

    Args:
        proj_hidden_dim: hidden size of the projection head.
        proj_output_dim: embedding size.
        temperature: NT-Xent temperature (0.5 for CIFAR, 0.1-0.2 for ImageNet in SimCLR).
        **kwargs: :class:`SSLPretrain` options.
    """

    METHOD = "simclr"

    def __init__(self, proj_hidden_dim: int = 2048, proj_output_dim: int = 128, temperature: float = 0.5,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        self.projection_head = SimCLRProjectionHead(self.feature_dim, proj_hidden_dim, proj_output_dim)
        self.criterion = NTXentLoss(temperature=temperature, gather_distributed=self.hparams.gather_distributed)

    def ssl_loss(self, views):
        x0, x1 = views
        return self.criterion(self.projection_head(self.embed(x0)), self.projection_head(self.embed(x1))), {}


class BYOL(MomentumSSL):
    """BYOL [6]: online projector + predictor, EMA target (cosine momentum 0.996 -> 1), symmetric negative cosine
    similarity (lightly's ``NegativeCosineSimilarity``). No negatives, so nothing is gathered across ranks.

    Args:
        proj_hidden_dim: hidden size of the projector (4096).
        proj_output_dim: embedding size (256).
        pred_hidden_dim: hidden size of the predictor (4096).
        base_momentum: EMA momentum at the first step (0.996).
        final_momentum: EMA momentum at the last step (1.0).
        **kwargs: :class:`SSLPretrain` options.
    """

    METHOD = "byol"

    def __init__(self, proj_hidden_dim: int = 4096, proj_output_dim: int = 256, pred_hidden_dim: int = 4096,
                 base_momentum: float = 0.996, final_momentum: float = 1.0, **kwargs: Any) -> None:
        super().__init__(base_momentum=base_momentum, final_momentum=final_momentum, **kwargs)
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead

        self.projection_head = BYOLProjectionHead(self.feature_dim, proj_hidden_dim, proj_output_dim)
        self.prediction_head = BYOLPredictionHead(proj_output_dim, pred_hidden_dim, proj_output_dim)
        self.momentum_backbone = self.make_momentum(self.backbone)
        self.momentum_projection_head = self.make_momentum(self.projection_head)
        self.criterion = NegativeCosineSimilarity()

    def ssl_loss(self, views):
        x0, x1 = views
        p0 = self.prediction_head(self.projection_head(self.embed(x0)))
        p1 = self.prediction_head(self.projection_head(self.embed(x1)))
        with torch.no_grad():
            z0 = self.momentum_projection_head(self.momentum_embed(x0))
            z1 = self.momentum_projection_head(self.momentum_embed(x1))
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0)), {}


class SwAV(SSLPretrain):
    """SwAV [3]: multi-crop, prototypes re-normalized to the unit sphere before every step and frozen for the first
    ``freeze_prototypes_steps`` steps, Sinkhorn codes from the high-resolution crops (sums all-reduced across ranks),
    and an optional queue of past high-resolution embeddings (lightly's ``MemoryBankModule``, one per crop).

    Args:
        proj_hidden_dim: hidden size of the projection head.
        proj_output_dim: embedding size.
        n_prototypes: number of prototypes (3000 on ImageNet).
        temperature: temperature of the swapped prediction.
        sinkhorn_iterations: Sinkhorn-Knopp iterations.
        sinkhorn_epsilon: Sinkhorn temperature (0.05; 0.03 with a queue on ImageNet).
        num_high_res_views: how many of the views (first in the list) are high-resolution crops.
        freeze_prototypes_steps: optimizer steps during which the prototypes' gradients are dropped.
        queue_length: embeddings per process and per high-resolution crop in the queue (0: no queue; SwAV uses 3840
            in total across GPUs).
        start_queue_at_epoch: the queue is filled from the start but used in the codes only from this epoch.
        **kwargs: :class:`SSLPretrain` options.
    """

    METHOD = "swav"
    NUM_VIEWS = (2, 64)

    def __init__(self, proj_hidden_dim: int = 2048, proj_output_dim: int = 128, n_prototypes: int = 3000,
                 temperature: float = 0.1, sinkhorn_iterations: int = 3, sinkhorn_epsilon: float = 0.05,
                 num_high_res_views: int = 2, freeze_prototypes_steps: int = 313, queue_length: int = 0,
                 start_queue_at_epoch: int = 15, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        from lightly.loss import SwaVLoss
        from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes
        from lightly.models.modules.memory_bank import MemoryBankModule

        if num_high_res_views < 1:
            raise DDKitError(f"num_high_res_views: must be >= 1, got {num_high_res_views!r}")
        if queue_length < 0:
            raise DDKitError(f"queue_length: must be >= 0, got {queue_length!r}")
        self.projection_head = SwaVProjectionHead(self.feature_dim, proj_hidden_dim, proj_output_dim)
        self.prototypes = SwaVPrototypes(proj_output_dim, n_prototypes)
        self.criterion = SwaVLoss(temperature=temperature, sinkhorn_iterations=sinkhorn_iterations,
                                  sinkhorn_epsilon=sinkhorn_epsilon,
                                  sinkhorn_gather_distributed=self.hparams.gather_distributed)
        self.queues = nn.ModuleList(
            [MemoryBankModule(size=(queue_length, proj_output_dim)) for _ in range(num_high_res_views)]
            if queue_length else [])

    def project(self, x: Tensor) -> Tensor:
        return F.normalize(self.projection_head(self.embed(x)), dim=1)

    def ssl_loss(self, views):
        n_high = self.hparams.num_high_res_views
        if len(views) < n_high:
            raise DDKitError(f"num_high_res_views: more than the {len(views)} views per image, got {n_high}")
        self.prototypes.normalize()
        high = [self.project(x) for x in views[:n_high]]
        low = [self.project(x) for x in views[n_high:]]
        queue_out = None
        if len(self.queues):
            with torch.no_grad():
                stored = [q(z.detach(), update=True)[1].t() for q, z in zip(self.queues, high)]
            if self.current_epoch >= self.hparams.start_queue_at_epoch:
                queue_out = [self.prototypes(z) for z in stored]
        loss = self.criterion([self.prototypes(z) for z in high], [self.prototypes(z) for z in low], queue_out)
        return loss, {}

    def on_after_backward(self) -> None:
        if self.global_step < self.hparams.freeze_prototypes_steps:
            for p in self.prototypes.parameters():
                p.grad = None


class DINO(MomentumSSL):
    """DINO [4]: student = backbone + DINO head on all views, teacher = EMA copy (cosine momentum) on the global
    views, lightly's ``DINOLoss`` (teacher centering, whose batch mean is all-reduced across ranks), the teacher
    temperature warmed up linearly per epoch, and the head's last layer frozen for the first epochs.
    The teacher is the encoder evaluated (kNN monitor, probe), as in DINO.

    Args:
        proj_hidden_dim: hidden size of the head MLP (2048).
        bottleneck_dim: bottleneck size before the weight-normalized last layer (256).
        output_dim: prototypes of the last layer (65536).
        head_batch_norm: BN in the head MLP.
        norm_last_layer: keep the last layer weight-normalized with a fixed norm.
        freeze_last_layer: epochs during which the last layer's gradients are dropped.
        warmup_teacher_temp: teacher temperature at epoch 0.
        teacher_temp: teacher temperature after the warm-up.
        warmup_teacher_temp_epochs: epochs of the linear warm-up (DINO: 30; 0 = none).
        student_temp: student temperature.
        center_momentum: momentum of the teacher center.
        base_momentum: EMA momentum at the first step (0.996).
        final_momentum: EMA momentum at the last step (1.0).
        **kwargs: :class:`SSLPretrain` options.
    """

    METHOD = "dino"
    EVAL_ENCODER = "momentum"
    NUM_VIEWS = (2, 64)

    def __init__(self, proj_hidden_dim: int = 2048, bottleneck_dim: int = 256, output_dim: int = 65536,
                 head_batch_norm: bool = False, norm_last_layer: bool = True, freeze_last_layer: int = 1,
                 warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.04, warmup_teacher_temp_epochs: int = 0,
                 student_temp: float = 0.1, center_momentum: float = 0.9, base_momentum: float = 0.996,
                 final_momentum: float = 1.0, **kwargs: Any) -> None:
        super().__init__(base_momentum=base_momentum, final_momentum=final_momentum, **kwargs)
        from lightly.loss import DINOLoss
        from lightly.models.modules import DINOProjectionHead

        if warmup_teacher_temp_epochs < 0:
            raise DDKitError(f"warmup_teacher_temp_epochs: must be >= 0, got {warmup_teacher_temp_epochs!r}")
        def head() -> nn.Module:
            return DINOProjectionHead(self.feature_dim, proj_hidden_dim, bottleneck_dim, output_dim,
                                      batch_norm=head_batch_norm, freeze_last_layer=freeze_last_layer,
                                      norm_last_layer=norm_last_layer)

        self.projection_head = head()
        self.momentum_backbone = self.make_momentum(self.backbone)
        self.momentum_projection_head = self.make_momentum(self.projection_head, head())  # weight norm: no deepcopy
        self.criterion = DINOLoss(output_dim=output_dim, teacher_temp=teacher_temp, student_temp=student_temp,
                                  center_momentum=center_momentum, warmup_teacher_temp_epochs=0)

    def teacher_temperature(self, epoch: int) -> float:
        """DINO's schedule: ``linspace(warmup_teacher_temp, teacher_temp, W)[epoch]`` for epoch < W, then constant."""
        hp = self.hparams
        w = hp.warmup_teacher_temp_epochs
        if epoch >= w:
            return hp.teacher_temp
        if w == 1:
            return hp.warmup_teacher_temp
        return hp.warmup_teacher_temp + (hp.teacher_temp - hp.warmup_teacher_temp) * epoch / (w - 1)

    def ssl_loss(self, views):
        with torch.no_grad():
            teacher = [self.momentum_projection_head(self.momentum_embed(x)) for x in views[:2]]
        student = [self.projection_head(self.embed(x)) for x in views]
        temp = self.teacher_temperature(self.current_epoch)
        loss = self.criterion(teacher, student, teacher_temp=temp)
        return loss, {"teacher_temp": torch.tensor(temp)}

    def on_after_backward(self) -> None:
        self.projection_head.cancel_last_layer_gradients(self.current_epoch)


METHODS = {cls.METHOD: cls for cls in (MoCoV2, MoCoV3, SwAV, DINO, SimCLR, BYOL)}
