"""A DistilledSet as the training set, with the real dataset's validation and test splits."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader, Dataset

from ddkit.datamodules.real import RealDataModule
from ddkit.errors import DDKitError
from ddkit.formats.distilled import DistilledSet, load_distilled

LABEL_MODES = ("auto", "hard", "soft")


def check_compatible(ds: DistilledSet, data: RealDataModule, where: str = "distilled") -> None:
    """A distilled set must have been made for the same dataset shape and preprocessing as ``data``."""
    a, b = ds.spec, data.spec
    for name in ("dataset", "num_classes", "in_chans", "image_size", "zca"):
        if getattr(a, name) != getattr(b, name):
            raise DDKitError(f"{where}: made for {name}={getattr(a, name)!r} but the data has "
                             f"{name}={getattr(b, name)!r}, got {where}.{name}={getattr(a, name)!r}")


class ImagesAndTargets(Dataset):
    """``(images[i], targets[i])`` pairs; ``images`` may be a tensor or a lazy reader (read per sample)."""

    def __init__(self, images, targets: torch.Tensor) -> None:
        if len(images) != len(targets):
            raise DDKitError(f"targets: one per image ({len(images)}), got {len(targets)}")
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.targets[i]


def training_targets(ds: DistilledSet, labels: str) -> torch.Tensor:
    """Hard labels [N] (int64) or soft targets softmax(label_logits) [N, K] (float32)."""
    if labels not in LABEL_MODES:
        raise DDKitError(f"labels: must be one of {', '.join(LABEL_MODES)}, got {labels!r}")
    if labels == "soft" or (labels == "auto" and ds.label_logits is not None):
        return ds.soft_targets()
    return ds.labels


class DistilledDataModule(RealDataModule):
    """Train on a DistilledSet; validate and test on the real dataset.

    Args:
        distilled: path of the DistilledSet directory, or of an image folder with one sub-folder per class (recover's
            SRe2L export ``images/``, or SRe2L's released images), which is read lazily.
        labels: ``hard`` (CE on hard labels), ``soft`` (soft-target CE on softmax of the learned label logits, or
            one-hot when there are none) or ``auto`` (soft when the set has learned logits).
        lazy: read the images per sample from disk (a DataLoader worker or DDP rank reads only its batches' images)
            instead of loading the set; for sets larger than memory.
        **kwargs: the real dataset's options (see RealDataModule); ``batch_size`` applies to the distilled set.
    """

    def __init__(self, distilled: str, labels: str = "auto", lazy: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if labels not in LABEL_MODES:
            raise DDKitError(f"labels: must be one of {', '.join(LABEL_MODES)}, got {labels!r}")
        self.distilled_path = distilled
        self.labels = labels
        self.distilled = load_distilled(distilled, lazy=lazy, folder_spec=self.spec)
        check_compatible(self.distilled, self)
        if self.distilled.zca is not None:
            from ddkit.ops.zca import ZCA

            self.zca = ZCA.from_state_dict(self.distilled.zca)

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        targets = training_targets(self.distilled, self.labels)
        self.train_set = ImagesAndTargets(self.distilled.images, targets)

    def train_dataloader(self) -> DataLoader:
        # A stage that samples the distilled set itself (KD: per-batch views and mixes, stored teacher labels) says
        # so by defining train_dataloader; Lightning would otherwise always take the datamodule's loader.
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is not None and is_overridden("train_dataloader", module):
            return module.train_dataloader()
        return super().train_dataloader()
