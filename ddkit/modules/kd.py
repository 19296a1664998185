"""Relabel + KD post-training (SRe2L / SC-DD): a fresh student learns a teacher's soft labels on a distilled set.

References:
    [1] Yin, Xing, Shen, "Squeeze, Recover and Relabel", NeurIPS 2023 (SRe2L): relabel with precomputed FKD soft
        labels (per epoch and batch: crop boxes, flips, mix parameters, fp16 teacher logits).
    [2] Zhou, Yin, Shao, Shen, "Self-supervised Dataset Distillation: A Good Compression Is All You Need",
        arXiv 2404.07976 (SC-DD): online KD, KL(batchmean) at temperature T, no T^2, no hard-label CE,
        AdamW 1e-3 / wd 0.01 with a per-epoch cosine; CutMix (ImageNet, T=20) or Mixup 0.8 (CIFAR, T=30).
    [3] Shen & Xing, "A Fast Knowledge Distillation Framework for Visual Recognition", ECCV 2022 (FKD).

How a batch is made (both label sources): the sampler yields ``(epoch, batch)`` keys for this process; the dataset
turns a key into a batch *config* (image indices, one crop box and flip per image, the batch's mix permutation /
lambda / box) and renders the mixed views on the CPU. With ``labels: online`` the config is drawn from a generator
seeded by ``(seed, epoch, batch)`` and the teacher runs on the mixed views in ``training_step``; with
``labels: stored`` it is read from a soft-label store (:mod:`ddkit.formats.soft_labels`) together with the
teacher's logits, which a relabel pass wrote beforehand with the very same drawing and rendering code. The two
sources therefore see the same views for the same seed, and no PyTorch internals are patched.

DDP: the batch plan of an epoch does not depend on the number of processes. Training: process ``r`` of ``W``
takes batches ``r, r + W, ...`` (padded by wrapping, like DistributedSampler). Relabel pass (``on_fit_start``):
process ``r`` writes the shards of epochs ``r, r + W, ...``; rank 0 writes ``meta.json`` before (``complete:
false``) and after (bytes on disk, ``complete: true``), with barriers between. So a store written with one process
replays with any number, and an interrupted pass resumes by skipping the shards that exist.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from torchmetrics.classification import MulticlassAccuracy

from ddkit.datamodules.spec import DataSpec, as_spec
from ddkit.errors import DDKitError
from ddkit.formats.images import is_lazy
from ddkit.formats.soft_labels import (
    SoftLabelReader,
    begin_soft_labels,
    check_soft_labels,
    check_topk,
    finish_soft_labels,
    images_fingerprint,
    num_batches,
    read_soft_label_meta,
    remove_soft_labels,
    save_shard,
    shard_exists,
    topk_logits,
)
from ddkit.modules.common import RealDataEvaluation, build_optimizer, decay_split, epoch_scheduler
from ddkit.nets import build_net
from ddkit.ops.mixing import DEFAULT_ALPHA, MIX_KINDS, MixParams, apply_mix, draw_mix
from ddkit.ops.recover_aug import sample_crop_box

KD_AUGMENTS = ("rrc_flip", "crop_flip", "none")
LABEL_SOURCES = ("online", "stored")
TEACHER_MODES = ("eval", "train")
KD_OPTIMIZERS = ("adamw", "sgd")


# ---------------------------------------------------------------------------------------------- losses


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float, t2_scale: bool = False) -> Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch ("batchmean") [2].

    Args:
        student_logits: ``[N, K]``.
        teacher_logits: ``[N, K]`` (no gradient flows into them).
        temperature: T > 0.
        t2_scale: multiply by T^2 (Hinton et al.); SRe2L / SC-DD do not.

    Returns:
        A scalar: ``sum_ik p_ik (log p_ik - log q_ik) / N`` with ``p = softmax(teacher / T)``,
        ``q = softmax(student / T)``, times ``T^2`` if ``t2_scale``.
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=1)
    p = F.softmax(teacher_logits.detach().float() / temperature, dim=1)
    loss = F.kl_div(log_q, p, reduction="batchmean")
    return loss * temperature**2 if t2_scale else loss


def mixed_ce(logits: Tensor, targets: Tensor, permutation: Tensor, lam: Tensor | float) -> Tensor:
    """Hard-label CE of a mixed batch: ``lam * CE(logits, y) + (1 - lam) * CE(logits, y[perm])`` (CutMix / Mixup)."""
    lam = lam.float() if isinstance(lam, Tensor) else torch.tensor(float(lam), device=logits.device)
    return lam * F.cross_entropy(logits.float(), targets) + (1 - lam) * F.cross_entropy(logits.float(),
                                                                                         targets[permutation])


# ---------------------------------------------------------------------------------------------- batch plan


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (numpy SeedSequence: no collisions in practice, independent of order)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


@dataclass(frozen=True)
class ViewPlan:
    """How the views of a batch are drawn and rendered.

    Args:
        augment: ``rrc_flip`` (RandomResizedCrop to ``view_size`` with area in ``crop_scale``, then flip; ImageNet,
            Tiny-ImageNet), ``crop_flip`` (RandomCrop after padding by ``padding``, then flip; CIFAR-like) or ``none``.
        view_size: side of the rendered views.
        crop_scale: area range of ``rrc_flip``.
        padding: padding of ``crop_flip``, filled with ``pad_value`` (per channel; black in the normalized space, as
            torchvision's RandomCrop pads the image before normalization).
        mix: ``cutmix``, ``mixup`` or ``none``, on every batch.
        mix_alpha: Beta parameter (1.0 for cutmix, 0.8 for mixup when None).
        pad_value: per-channel fill of the padding.
    """

    augment: str = "rrc_flip"
    view_size: int = 32
    crop_scale: tuple[float, float] = (0.08, 1.0)
    padding: int = 4
    mix: str = "cutmix"
    mix_alpha: float | None = None
    pad_value: tuple[float, ...] = (0.0,)

    def alpha(self) -> float:
        return float(self.mix_alpha if self.mix_alpha is not None else DEFAULT_ALPHA.get(self.mix, 0.0))


def draw_batch_config(plan: ViewPlan, index: Tensor, height: int, width: int, generator: torch.Generator) -> dict:
    """Draw one batch's config: per image a crop box and a flip, then the batch's mix [1].

    Draw order: the boxes (image by image), the flips, then :func:`ddkit.ops.mixing.draw_mix` on the views.

    Returns:
        ``index`` int64 [n], ``boxes`` int32 [n, 4] (top, left, h, w), ``flips`` uint8 [n], ``mix_perm`` int64 [n],
        ``mix_lam`` float64 [], ``mix_box`` int32 [4] (y0, y1, x0, x1; zeros unless cutmix).
    """
    n = index.numel()
    if plan.augment == "rrc_flip":
        boxes = torch.tensor([sample_crop_box(height, width, generator, tuple(plan.crop_scale)) for _ in range(n)],
                             dtype=torch.int32).view(n, 4)
    elif plan.augment == "crop_flip":
        offsets = torch.randint(0, 2 * plan.padding + 1, (n, 2), generator=generator)
        boxes = torch.cat([offsets, torch.tensor([height, width]).expand(n, 2)], dim=1).to(torch.int32)
    else:
        boxes = torch.tensor([0, 0, height, width], dtype=torch.int32).expand(n, 4).clone()
    if plan.augment == "none":
        flips = torch.zeros(n, dtype=torch.uint8)
    else:
        flips = (torch.rand(n, generator=generator) < 0.5).to(torch.uint8)
    mix = draw_mix(plan.mix, n, plan.view_size, plan.view_size, generator, plan.mix_alpha)
    return {
        "index": index.to(torch.int64),
        "boxes": boxes,
        "flips": flips,
        "mix_perm": mix.permutation.to(torch.int64),
        "mix_lam": torch.tensor(mix.lam, dtype=torch.float64),
        "mix_box": torch.tensor(mix.box if mix.box is not None else (0, 0, 0, 0), dtype=torch.int32),
    }


def mix_params(kind: str, config: dict) -> MixParams:
    """The :class:`MixParams` recorded in a batch config."""
    box = tuple(int(v) for v in config["mix_box"].tolist()) if kind == "cutmix" else None
    return MixParams(kind, config["mix_perm"].to(torch.int64), float(config["mix_lam"]), box)


def render_views(images: Tensor, config: dict, plan: ViewPlan) -> Tensor:
    """The un-mixed views of a batch config: crop (+ resize for ``rrc_flip``), then flip. Deterministic.

    Args:
        images: ``[N, C, H, W]`` source images (CPU).
        config: from :func:`draw_batch_config` or a soft-label store.
        plan: the plan the config was drawn with.

    Returns:
        ``[n, C, S, S]`` with ``S = plan.view_size`` (``H`` for ``crop_flip`` / ``none``).
    """
    index = config["index"].to(torch.int64)
    x = images[index]
    if plan.augment == "crop_flip":
        p = plan.padding
        n, c, h, w = x.shape
        fill = torch.tensor(plan.pad_value, dtype=x.dtype).view(1, -1, 1, 1).expand(n, c, h + 2 * p, w + 2 * p)
        canvas = fill.clone()
        canvas[:, :, p:p + h, p:p + w] = x
        x = torch.stack([canvas[i, :, t:t + bh, l:l + bw] for i, (t, l, bh, bw) in enumerate(config["boxes"].tolist())])
    elif plan.augment == "rrc_flip":
        s = plan.view_size
        x = torch.cat([
            F.interpolate(x[i:i + 1, :, t:t + bh, l:l + bw], size=(s, s), mode="bilinear", align_corners=False,
                          antialias=True)
            for i, (t, l, bh, bw) in enumerate(config["boxes"].tolist())
        ]) if len(index) else x
    flips = config["flips"].to(torch.bool).view(-1, 1, 1, 1)
    return torch.where(flips, x.flip(-1), x)


class KDViewDataset(Dataset):
    """Map-style dataset whose items are whole batches: ``dataset[(epoch, b)]`` is batch ``b`` of ``epoch``.

    Each item holds ``x`` (mixed views [n, C, S, S]), ``y`` (hard labels [n]), ``perm`` (mix permutation [n]),
    ``lam`` (float32 scalar), ``index`` (image indices [n]) and, from a store, ``logits`` ([n, K] float16).
    Batches are consecutive chunks of a per-epoch permutation drawn from ``(seed, epoch)``; the views and mix of a
    batch come from a generator seeded by ``(seed, epoch, b)`` (online), or from the store (stored).

    Args:
        images: ``[N, C, H, W]`` float32 (CPU), or a lazy reader (:mod:`ddkit.formats.images`): a batch then reads
            only its own images.
        labels: ``[N]`` int64 hard labels.
        plan: how views are drawn and rendered.
        batch_size: images per batch (the last batch may be smaller).
        seed: seed of the order and the per-batch draws (ignored when reading a store: its configs are used).
        soft_labels: a soft-label store to read configs and logits from (None: draw them).
    """

    def __init__(self, images: Tensor, labels: Tensor, plan: ViewPlan, batch_size: int, seed: int,
                 soft_labels: str | None = None) -> None:
        if batch_size <= 0:
            raise DDKitError(f"batch_size: must be > 0, got {batch_size!r}")
        self.images = images if is_lazy(images) else images.detach().cpu().float().contiguous()
        self.labels = labels.detach().cpu().long()
        self.plan = plan
        self.batch_size = batch_size
        self.seed = int(seed)
        self.reader = SoftLabelReader(soft_labels) if soft_labels is not None else None
        if self.reader is not None and (self.reader.batch_size, self.reader.num_images) != (batch_size, len(images)):
            raise DDKitError(f"soft_labels.batch_size: stored for batch size {self.reader.batch_size} and "
                             f"{self.reader.num_images} images, got batch size {batch_size} and {len(images)} images")
        self._order: tuple[int, Tensor] | None = None

    def __len__(self) -> int:
        return num_batches(len(self.images), self.batch_size)

    def order(self, epoch: int) -> Tensor:
        """The epoch's permutation of the image indices (cached for the current epoch)."""
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(derive_seed(self.seed, 0, epoch))
            self._order = (epoch, torch.randperm(len(self.images), generator=g))
        return self._order[1]

    def config(self, epoch: int, b: int) -> dict:
        """Batch ``b``'s config (see :func:`draw_batch_config`; plus ``logits`` from a store)."""
        if self.reader is not None:
            return self.reader.batch(epoch, b)
        lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, len(self.images))
        g = torch.Generator().manual_seed(derive_seed(self.seed, 1, epoch, b))
        return draw_batch_config(self.plan, self.order(epoch)[lo:hi], *self.images.shape[-2:], generator=g)

    def render(self, config: dict) -> Tensor:
        """The mixed views of a config."""
        return apply_mix(render_views(self.images, config, self.plan), mix_params(self.plan.mix, config))

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Tensor]:
        epoch, b = key
        cfg = self.config(int(epoch), int(b))
        index = cfg["index"].to(torch.int64)
        item = {"x": self.render(cfg), "y": self.labels[index], "perm": cfg["mix_perm"].to(torch.int64),
                "lam": cfg["mix_lam"].to(torch.float32), "index": index}
        if "logits" in cfg:
            item["logits"] = cfg["logits"]
        return item


class KDBatchSampler(DistributedSampler):
    """Yields ``(epoch, batch)`` keys of this process for a :class:`KDViewDataset` (DataLoader ``batch_size=None``).

    It is a DistributedSampler over the batch ids of an epoch (no shuffling: the dataset's epoch permutation already
    is the shuffle), so process ``r`` of ``W`` gets batches ``r, r + W, ...`` padded by wrapping, and Lightning
    leaves it as it is under DDP. Lightning calls :meth:`set_epoch` at the start of every epoch.
    """

    def __init__(self, num_images: int, batch_size: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(num_batches(num_images, batch_size)), num_replicas=num_replicas, rank=rank,
                         shuffle=False, drop_last=False)

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch
        for b in super().__iter__():
            yield epoch, int(b)


class _WithConfig(Dataset):
    """A :class:`KDViewDataset` whose items also carry their config (for the relabel pass)."""

    def __init__(self, dataset: KDViewDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Tensor]:
        cfg = self.dataset.config(*key)
        return {**cfg, "x": self.dataset.render(cfg)}


@torch.no_grad()
def relabel_epochs(teacher: nn.Module, dataset: KDViewDataset, path: str | Path, epochs: Iterable[int],
                   device: torch.device | str = "cpu", context=contextlib.nullcontext, on_epoch=None,
                   num_workers: int = 0, topk: int | None = None, temperature: float = 1.0) -> list[int]:
    """The relabel pass [1]: for each epoch (skipping shards that exist), draw every batch's config, render its
    mixed views, run the teacher and write the shard (configs + fp16 logits) atomically.

    Args:
        teacher: the teacher, in the mode it should label in.
        dataset: an online :class:`KDViewDataset` (its seed, plan and batch size define the store).
        path: the store directory (its meta.json written by :func:`ddkit.formats.soft_labels.begin_soft_labels`).
        epochs: the epochs this process writes.
        device: where the teacher runs.
        context: a context-manager factory around the teacher forward (e.g. the Trainer's autocast).
        on_epoch: called with the epoch after each written shard.
        num_workers: DataLoader workers rendering the views (the order of the batches is kept).
        topk: keep only the k largest logits per view (:func:`ddkit.formats.soft_labels.topk_logits`).
        temperature: the KD temperature the top-k rest value is computed for.

    Returns:
        The epochs written.
    """
    if dataset.reader is not None:
        raise DDKitError("soft_labels: the relabel pass draws its own configs, got a dataset reading a store")
    todo = [e for e in epochs if not shard_exists(path, e)]
    nb = len(dataset)
    keys = [(e, b) for e in todo for b in range(nb)]
    loader = DataLoader(_WithConfig(dataset), sampler=keys, batch_size=None, num_workers=num_workers)
    names = ("order", "boxes", "flips", "mix_perm", "mix_lam", "mix_box", "logits",
             *(("logit_index", "logit_rest") if topk else ()))
    parts: dict[str, list[Tensor]] = {k: [] for k in names}
    for (epoch, b), item in zip(keys, loader):
        with context():
            logits = teacher(item["x"].to(device))
        parts["order"].append(item["index"])
        if topk:
            for k, v in topk_logits(logits, topk, temperature).items():
                parts[k].append(v)
        else:
            parts["logits"].append(logits.detach().float().cpu().to(torch.float16))
        for k in ("boxes", "flips", "mix_perm"):
            parts[k].append(item[k])
        parts["mix_lam"].append(item["mix_lam"].view(1))
        parts["mix_box"].append(item["mix_box"].view(1, 4))
        if b == nb - 1:
            save_shard(path, epoch, {k: torch.cat(v) for k, v in parts.items()})
            parts = {k: [] for k in names}
            if on_epoch is not None:
                on_epoch(epoch)
    return todo


# ---------------------------------------------------------------------------------------------- module


class KDStudent(RealDataEvaluation, L.LightningModule):
    """Train a fresh ``build_net(net)`` on a distilled set with a teacher's soft labels (relabel / KD post-train).

    Loss: ``kd_loss(student(x), teacher(x), temperature, t2_scale) + ce_weight * mixed_ce`` on the mixed views ``x``.
    The training data is a DistilledDataModule's distilled set (or :meth:`attach_train_set`); validation and test
    use the datamodule's real splits. AdamW (or SGD) with weight decay on weights of dim > 1 only, per-epoch cosine.

    Args:
        data_spec: the dataset's shape and preprocessing (linked from the datamodule by the CLI).
        net: student architecture for :func:`ddkit.nets.build_net`.
        net_kwargs: student architecture options.
        teacher: teacher checkpoint (ddkit teacher safetensors). Required for ``labels: online`` and to write a
            store; a complete store replays without it.
        teacher_mode: ``eval`` (frozen BN statistics) or ``train``: the teacher's BN uses batch statistics and its
            running statistics drift, as in the reference CIFAR-100 code (SRe2L and SC-DD); outputs stay detached.
        temperature: softmax temperature T of the KL (SC-DD / SRe2L: 20 for ImageNet, 30 for CIFAR).
        t2_scale: multiply the KL by T^2 (Hinton); the reference does not.
        ce_weight: weight of an added hard-label CE on the mixed batch (the reference: 0).
        mix: ``cutmix`` (Beta(1, 1)), ``mixup`` (Beta(0.8, 0.8)) or ``none``, applied to every batch.
        mix_alpha: Beta parameter, overriding 1.0 (cutmix) / 0.8 (mixup).
        augment: per-image views: ``rrc_flip`` (RandomResizedCrop + flip; ImageNet-like data), ``crop_flip``
            (RandomCrop with padding + flip; small images) or ``none``.
        crop_scale: area range of ``rrc_flip``'s crop.
        crop_padding: padding of ``crop_flip`` (black in the normalized space).
        optimizer: ``adamw`` (SC-DD / SRe2L ImageNet and CIFAR) or ``sgd`` (momentum ``momentum``; SC-DD's
            Tiny-ImageNet row: 500 epochs, lr 0.2).
        lr: learning rate.
        momentum: SGD momentum.
        weight_decay: weight decay (on conv / linear weights only).
        cosine_epochs: length of the per-epoch cosine ``0.5 * (1 + cos(pi * epoch / cosine_epochs))`` (default: the
            Trainer's max_epochs). The SC-DD CIFAR-100 code effectively uses 600 for 200 epochs, so its LR only
            falls to 0.75x.
        labels: ``online`` (the teacher labels each mixed batch; SC-DD) or ``stored`` (FKD: a relabel pass writes
            views, mixes and fp16 logits for every epoch, then training replays them; SRe2L ImageNet).
        soft_labels: the store directory for ``labels: stored`` (default: ``<distilled>_soft_labels`` beside the
            datamodule's distilled set). Reused when it matches, written when absent, resumed when unfinished.
        keep_soft_labels: keep the store after fit (False: delete it at the end, e.g. for a temporary one).
        soft_label_topk: store only the k largest teacher logits per view (FKD's top-k, with the other classes'
            total probability at ``temperature`` kept and spread evenly over them); None stores all K. The store's
            meta.json records k and the bytes it saves.
        seed: seed of the batch order, views and mixes (default: the run's global seed, from ``seed_everything``).
    """

    def __init__(
        self,
        data_spec: DataSpec | dict | None = None,
        net: str = "resnet18",
        net_kwargs: dict[str, Any] | None = None,
        teacher: str | None = None,
        teacher_mode: str = "eval",
        temperature: float = 20.0,
        t2_scale: bool = False,
        ce_weight: float = 0.0,
        mix: str = "cutmix",
        mix_alpha: float | None = None,
        augment: str = "rrc_flip",
        crop_scale: tuple[float, float] = (0.08, 1.0),
        crop_padding: int = 4,
        optimizer: str = "adamw",
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.01,
        cosine_epochs: int | None = None,
        labels: str = "online",
        soft_labels: str | None = None,
        keep_soft_labels: bool = True,
        soft_label_topk: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        check_kd_options(temperature=temperature, mix=mix, mix_alpha=mix_alpha, augment=augment, labels=labels,
                         teacher_mode=teacher_mode, ce_weight=ce_weight, optimizer=optimizer, lr=lr,
                         weight_decay=weight_decay, crop_scale=crop_scale, crop_padding=crop_padding,
                         cosine_epochs=cosine_epochs)
        if labels == "online" and teacher is None:
            raise DDKitError("teacher: required for labels=online (path of a teacher checkpoint), got None")
        self.spec = data_spec = as_spec(data_spec)
        check_topk(soft_label_topk, data_spec.num_classes)
        self.save_hyperparameters(ignore=["data_spec"])
        self.hparams["data_spec"] = data_spec.to_dict()  # plain types: checkpoints load with weights_only=True
        self.hparams["crop_scale"] = tuple(float(v) for v in crop_scale)
        self.net = build_net(net, data_spec.num_classes, data_spec.in_chans, data_spec.image_size,
                             **(net_kwargs or {}))
        self.teacher: nn.Module | None = None
        self.teacher_ref: dict[str, str] | None = None
        if teacher is not None:
            self.teacher = load_kd_teacher(teacher, data_spec)
            from ddkit.formats.teacher import teacher_reference

            self.teacher_ref = teacher_reference(teacher)
        k = data_spec.num_classes
        self.train_acc = MulticlassAccuracy(k, average="micro")
        self.val_acc = MulticlassAccuracy(k, average="micro")
        self.test_acc = MulticlassAccuracy(k, average="micro")
        self._train: dict[str, Any] | None = None
        self.soft_label_meta: dict[str, Any] | None = None
        self.train(True)

    # -- data ------------------------------------------------------------------------------------------------

    def attach_train_set(self, images: Tensor, labels: Tensor, batch_size: int, num_workers: int = 0,
                         source: str | None = None) -> None:
        """Train on these images (the evaluator's path; with ``ddkit fit`` the DistilledDataModule provides them).

        Args:
            images: ``[N, C, H, W]`` in the training input space.
            labels: ``[N]`` hard labels.
            batch_size: images per batch (per process under DDP).
            num_workers: DataLoader workers rendering the views.
            source: path of the distilled set, to place the default soft-label store beside it.
        """
        if batch_size <= 0:
            raise DDKitError(f"batch_size: must be > 0, got {batch_size!r}")
        want = (self.spec.in_chans, self.spec.image_size, self.spec.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != want:
            raise DDKitError(f"images: shape must be [N, {', '.join(map(str, want))}], got {list(images.shape)}")
        self._train = {"images": images, "labels": labels, "batch_size": int(batch_size),
                       "num_workers": int(num_workers), "source": source}

    def view_plan(self) -> ViewPlan:
        hp, s = self.hparams, self.spec
        pad = tuple(0.0 for _ in s.mean) if s.zca else tuple(-m / d for m, d in zip(s.mean, s.std))
        return ViewPlan(augment=hp.augment, view_size=s.image_size, crop_scale=tuple(hp.crop_scale),
                        padding=hp.crop_padding, mix=hp.mix, mix_alpha=hp.mix_alpha, pad_value=pad)

    def soft_label_plan(self) -> dict[str, Any]:
        """The fields a store must share with this run (see ``ddkit.formats.soft_labels.PLAN_FIELDS``)."""
        plan, t = self.view_plan(), self._train
        return {"num_images": len(t["images"]), "num_classes": self.spec.num_classes,
                "image_shape": list(t["images"].shape[1:]), "images_sha256": images_fingerprint(t["images"]),
                "batch_size": t["batch_size"], "seed": self.hparams.seed, "augment": plan.augment,
                "view_size": plan.view_size, "crop_scale": list(plan.crop_scale), "padding": plan.padding,
                "mix": plan.mix, "mix_alpha": plan.alpha(), **self._topk_plan()}

    def _topk_plan(self) -> dict[str, Any]:
        k = self.hparams.get("soft_label_topk")
        return {"topk": k, "topk_temperature": float(self.hparams.temperature) if k else None}

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        if self._train is None:
            dm = self.trainer.datamodule if self.trainer is not None else None
            ds = getattr(dm, "distilled", None)
            if ds is None:
                raise DDKitError(f"data: KDStudent trains on a distilled set (DistilledDataModule, or "
                                 f"attach_train_set()), got {type(dm).__name__}")
            self.attach_train_set(ds.images, ds.labels, dm.batch_size, dm.num_workers, dm.distilled_path)
        # One batch plan for all processes: the seed Lightning set is the same on every rank.
        self._seed = int(self.hparams.seed if self.hparams.seed is not None else torch.initial_seed())
        if self.hparams.labels == "stored":
            self._store = self._store_path()

    def _store_path(self) -> str:
        if self.hparams.soft_labels is not None:
            return str(self.hparams.soft_labels)
        source = self._train["source"]
        if source is None:
            raise DDKitError("soft_labels: required for labels=stored (no distilled path to put it beside), got None")
        src = Path(source)
        return str(src.with_name(src.name + "_soft_labels"))

    def _epochs(self) -> int:
        epochs = self.trainer.max_epochs if self.trainer is not None else None
        if epochs is None or epochs <= 0:
            raise DDKitError(f"trainer.max_epochs: labels=stored needs a positive number of epochs, got {epochs!r}")
        return int(epochs)

    def on_fit_start(self) -> None:
        # The teacher is in eval mode on purpose; Lightning would warn about it at the start of training.
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        if self.hparams.labels == "stored":
            self.prepare_soft_labels()

    def prepare_soft_labels(self) -> dict[str, Any]:
        """Reuse, resume or write the store (all processes take part; see the module docstring for DDP)."""
        path, epochs = self._store, self._epochs()
        strategy = self.trainer.strategy
        rank, world = self.global_rank, self.trainer.world_size
        plan = self.soft_label_plan()
        status = check_soft_labels(path, plan, epochs, self.teacher_ref)
        if status != "complete":
            if self.teacher is None:
                raise DDKitError(f"teacher: required to write stored labels (no complete store at "
                                 f"{path!r}), got None")
            if status == "partial":  # resume with the seed the unfinished pass started with
                self._seed = int(read_soft_label_meta(path)["seed"])
            plan["seed"] = self._seed
            if status == "absent" and rank == 0:
                begin_soft_labels(path, plan, epochs, self.teacher_ref,
                                  extra={"teacher_mode": self.hparams.teacher_mode})
            strategy.barrier("kd_relabel_begin")
            dataset = KDViewDataset(self._train["images"], self._train["labels"], self.view_plan(),
                                    self._train["batch_size"], self._seed)
            self.teacher.train(self.hparams.teacher_mode == "train")
            every = max(1, epochs // 10)

            def progress(e: int) -> None:
                if rank == 0 and (e // world) % every == 0:
                    self.print(f"relabel: epoch {e + 1}/{epochs} written to {path}")

            relabel_epochs(self.teacher, dataset, path, range(rank, epochs, world), device=self.device,
                           context=self.trainer.precision_plugin.forward_context, on_epoch=progress,
                           num_workers=self._train["num_workers"], topk=self._topk_plan()["topk"],
                           temperature=self.hparams.temperature)
            strategy.barrier("kd_relabel_written")
            if rank == 0:
                finish_soft_labels(path, self._image_bytes())
            strategy.barrier("kd_relabel_done")
            self.train(self.training)
        meta = read_soft_label_meta(path)
        if not meta.get("bytes"):  # an older complete store without sizes: nothing to report
            meta["bytes"] = {}
        self.soft_label_meta = meta
        self._report_bytes(meta)
        return meta

    def _image_bytes(self) -> dict[str, int]:
        n = self._train["images"].numel()
        return {"float32": 4 * n, "uint8": n}

    def _report_bytes(self, meta: dict[str, Any]) -> None:
        b = meta["bytes"]
        if "labels" not in b:
            return
        images = self._image_bytes()
        ratio32, ratio8 = b["labels"] / images["float32"], b["labels"] / images["uint8"]
        topk = (f"; top-{meta['topk']} logits save {format_bytes(b['logits_saved'])} of "
                f"{format_bytes(b['logits_full'])}" if meta.get("topk") and "logits_saved" in b else "")
        self.print(f"soft labels: {format_bytes(b['labels'])} for {meta['epochs']} epochs "
                   f"({format_bytes(b['per_epoch'])} per epoch) = {ratio32:.2f}x the images as float32 "
                   f"({format_bytes(images['float32'])}), {ratio8:.2f}x as uint8 pixels "
                   f"({format_bytes(images['uint8'])}){topk}")
        if self.logger is not None and self.trainer.is_global_zero:
            self.logger.log_metrics({"soft_labels/bytes": float(b["labels"]),
                                     "soft_labels/bytes_per_epoch": float(b["per_epoch"]),
                                     "soft_labels/over_images_float32": ratio32,
                                     "soft_labels/over_images_uint8": ratio8}, step=0)

    def train_dataloader(self) -> DataLoader:
        """Batches of mixed views for this process (see :class:`KDViewDataset` and :class:`KDBatchSampler`)."""
        t = self._train
        if t is None:
            raise DDKitError("data: no training set attached (call attach_train_set or use DistilledDataModule), got None")
        store = self._store if self.hparams.labels == "stored" else None
        dataset = KDViewDataset(t["images"], t["labels"], self.view_plan(), t["batch_size"], self._seed, store)
        world = self.trainer.world_size if self.trainer is not None else 1
        rank = self.global_rank if self.trainer is not None else 0
        sampler = KDBatchSampler(len(t["images"]), t["batch_size"], num_replicas=world, rank=rank)
        return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=t["num_workers"],
                          persistent_workers=t["num_workers"] > 0)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["kd_seed"] = self._seed  # the batch plan: (seed, epoch, batch) fixes order, views and mixes

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Runs after setup() and before the loaders are built: a resumed run continues the same plan.
        if "kd_seed" in checkpoint:
            self._seed = int(checkpoint["kd_seed"])

    def on_fit_end(self) -> None:
        if self.hparams.labels == "stored" and not self.hparams.keep_soft_labels:
            self.trainer.strategy.barrier("kd_cleanup")
            if self.trainer.is_global_zero:
                remove_soft_labels(self._store)

    # -- training --------------------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> KDStudent:
        """Trainer.fit calls ``train()``; the teacher stays in eval mode unless ``teacher_mode`` is ``train``."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.train(mode and self.hparams.teacher_mode == "train")
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def teacher_logits(self, batch: dict[str, Tensor]) -> Tensor:
        if self.hparams.labels == "stored":
            return batch["logits"].float()
        with torch.no_grad():
            return self.teacher(batch["x"]).float()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        hp = self.hparams
        x, y = batch["x"], batch["y"]
        logits = self.net(x)
        kl = kd_loss(logits, self.teacher_logits(batch), hp.temperature, hp.t2_scale)
        loss = kl
        n = x.shape[0]
        if hp.ce_weight > 0:
            ce = mixed_ce(logits, y, batch["perm"], batch["lam"])
            loss = kl + hp.ce_weight * ce
            self.log("train/ce", ce, on_step=False, on_epoch=True, sync_dist=True, batch_size=n)
        self.log("train/kl", kl, on_step=False, on_epoch=True, sync_dist=True, batch_size=n)
        self.log("train/loss", loss, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True, batch_size=n)
        self.train_acc(logits, y)  # against the un-mixed hard labels, for logging only (as the reference)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=n)
        return loss

    def on_train_epoch_start(self) -> None:
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=False, on_epoch=True)

    def configure_optimizers(self):
        hp = self.hparams
        opt = build_optimizer(hp.optimizer, decay_split(self.net), hp.lr, momentum=hp.momentum,
                              weight_decay=hp.weight_decay)
        total = hp.cosine_epochs or max(1, self.trainer.max_epochs or 1)
        return {"optimizer": opt, "lr_scheduler": epoch_scheduler(opt, "cosine", total)}


# ---------------------------------------------------------------------------------------------- helpers


def check_kd_options(temperature: float = 1.0, mix: str = "cutmix", mix_alpha: float | None = None,
                     augment: str = "rrc_flip", labels: str = "online", teacher_mode: str = "eval",
                     ce_weight: float = 0.0, optimizer: str = "adamw", lr: float = 1e-3, weight_decay: float = 0.0,
                     crop_scale: tuple[float, float] = (0.08, 1.0), crop_padding: int = 4,
                     cosine_epochs: int | None = None, prefix: str = "") -> None:
    """Raise one DDKitError for the first bad KD option (shared by :class:`KDStudent` and the ``kd`` protocol)."""
    def bad(field: str, message: str, value: object) -> DDKitError:
        return DDKitError(f"{prefix}{field}: {message}, got {value!r}")

    if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
        raise bad("temperature", "must be a finite number > 0", temperature)
    if mix not in MIX_KINDS:
        raise bad("mix", f"must be one of {', '.join(MIX_KINDS)}", mix)
    if mix_alpha is not None and not mix_alpha > 0:
        raise bad("mix_alpha", "must be > 0", mix_alpha)
    if augment not in KD_AUGMENTS:
        raise bad("augment", f"must be one of {', '.join(KD_AUGMENTS)}", augment)
    if labels not in LABEL_SOURCES:
        raise bad("labels", f"must be one of {', '.join(LABEL_SOURCES)}", labels)
    if teacher_mode not in TEACHER_MODES:
        raise bad("teacher_mode", f"must be one of {', '.join(TEACHER_MODES)}", teacher_mode)
    if not ce_weight >= 0:
        raise bad("ce_weight", "must be >= 0", ce_weight)
    if optimizer not in KD_OPTIMIZERS:
        raise bad("optimizer", f"must be one of {', '.join(KD_OPTIMIZERS)}", optimizer)
    if not lr > 0:
        raise bad("lr", "must be > 0", lr)
    if not weight_decay >= 0:
        raise bad("weight_decay", "must be >= 0", weight_decay)
    lo, hi = crop_scale
    if not 0 < lo <= hi <= 1:
        raise bad("crop_scale", "must satisfy 0 < low <= high <= 1", tuple(crop_scale))
    if crop_padding < 0:
        raise bad("crop_padding", "must be >= 0", crop_padding)
    if cosine_epochs is not None and cosine_epochs <= 0:
        raise bad("cosine_epochs", "must be > 0", cosine_epochs)


def load_kd_teacher(path: str, spec: DataSpec) -> nn.Module:
    """Load a teacher checkpoint, check that it fits ``spec``, freeze it and put it in eval mode."""
    from ddkit.formats.teacher import load_teacher

    teacher, meta = load_teacher(path)
    t = meta.data_spec
    for name in ("num_classes", "in_chans", "image_size", "zca"):
        if getattr(t, name) != getattr(spec, name):
            raise DDKitError(f"teacher: made for {name}={getattr(t, name)!r} but the data has "
                             f"{name}={getattr(spec, name)!r}, got {path!r}")
    if not t.zca and not (np.allclose(t.mean, spec.mean, atol=1e-4) and np.allclose(t.std, spec.std, atol=1e-4)):
        raise DDKitError(f"teacher: trained with normalization mean={t.mean} std={t.std} but the data uses "
                         f"mean={spec.mean} std={spec.std}, got {path!r}")
    return teacher.eval().requires_grad_(False)


def format_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            break
        n /= 1024
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


def temporary_store(prefix: str = "ddkit-soft-labels-") -> str:
    """A fresh, empty directory for a temporary store (pair it with ``keep_soft_labels=False``)."""
    return tempfile.mkdtemp(prefix=prefix)


__all__ = ["KDBatchSampler", "KDStudent", "KDViewDataset", "ViewPlan", "check_kd_options", "derive_seed",
           "draw_batch_config", "kd_loss", "load_kd_teacher", "mix_params", "mixed_ce", "relabel_epochs",
           "render_views", "temporary_store"]
