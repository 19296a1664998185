"""Named evaluation protocols. Each is a frozen record, stored next to every number it produces.

A protocol turns (training images, training targets, data spec, net) into a LightningModule and says how long to
train and with which batch size; the evaluator does the rest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, ClassVar

import lightning as L
from torch.utils.data import DataLoader

from ddkit.datamodules.spec import DataSpec
from ddkit.errors import DDKitError
from ddkit.formats.distilled import DistilledSet


@dataclass(frozen=True)
class Protocol:
    """Base: how a fresh network is trained on a (distilled or subset) training set."""

    name: ClassVar[str] = ""
    epochs: int = 300
    batch_size: int = 256

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}

    def validate(self) -> None:
        if self.epochs <= 0:
            raise DDKitError(f"{self.name}.epochs: must be > 0, got {self.epochs!r}")
        if self.batch_size <= 0:
            raise DDKitError(f"{self.name}.batch_size: must be > 0, got {self.batch_size!r}")

    def targets(self, ds: DistilledSet):
        """The training targets this protocol uses for ``ds``."""
        raise NotImplementedError

    def without_augmentation(self) -> Protocol:
        """The same protocol with its data augmentation off (DD-Ranking's "naug" runs)."""
        raise NotImplementedError

    def make_module(self, spec: DataSpec, net: str, net_kwargs: dict, ds: DistilledSet) -> L.LightningModule:
        raise NotImplementedError

    def train_loader(self, ds: DistilledSet) -> DataLoader | None:
        """The training loader for ``ds``: shuffled batches of (images, targets). ``None`` means the module made by
        :meth:`make_module` samples the set itself (its ``train_dataloader`` hook), as the ``kd`` protocol does."""
        from ddkit.datamodules.distilled import ImagesAndTargets

        return DataLoader(ImagesAndTargets(ds.images, self.targets(ds)), batch_size=min(self.batch_size, len(ds)),
                          shuffle=True)


@dataclass(frozen=True)
class HardProtocol(Protocol):
    """DC/DSA/MTT evaluation: CE on hard labels, SGD momentum 0.9, wd 5e-4, lr x0.1 at half, DSA (Zhao et al. 2021)."""

    name: ClassVar[str] = "hard"
    epochs: int = 300
    batch_size: int = 256
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: str = "dsa"

    def targets(self, ds: DistilledSet):
        return ds.labels

    def without_augmentation(self) -> Protocol:
        return replace(self, augment="none")

    def learning_rate(self, ds: DistilledSet) -> float:
        return self.lr

    def make_module(self, spec, net, net_kwargs, ds):
        from ddkit.modules.classifier import Classifier

        return Classifier(spec, net, net_kwargs, optimizer="sgd", lr=self.learning_rate(ds), momentum=self.momentum,
                          weight_decay=self.weight_decay, schedule="step", milestones=[0.5], augment=self.augment)


@dataclass(frozen=True)
class SoftProtocol(HardProtocol):
    """DATM evaluation: soft-target CE on softmax(learned label logits), SGD at the learned step size (``lr`` when the
    set has none), momentum 0.9, wd 5e-4, x0.1 at half, DSA (Guo et al. ICLR 2024)."""

    name: ClassVar[str] = "soft"
    epochs: int = 1000
    batch_size: int = 128
    use_learned_lr: bool = True

    def targets(self, ds: DistilledSet):
        return ds.soft_targets()

    def learning_rate(self, ds: DistilledSet) -> float:
        return ds.step_size if (self.use_learned_lr and ds.step_size is not None) else self.lr


@dataclass(frozen=True)
class KDProtocol(Protocol):
    """SRe2L / SC-DD evaluation: KL(batchmean) to a teacher's soft labels at temperature T (no T^2, no CE by
    default), AdamW (wd on weights only) with a per-epoch cosine, RandomResizedCrop or RandomCrop + flip per image,
    CutMix or Mixup on every batch; teacher online (SC-DD) or stored labels written by a relabel pass (SRe2L FKD).

    Fields: ``teacher`` (teacher checkpoint path; required), ``temperature``, ``mix`` (cutmix | mixup | none),
    ``augment`` (``auto``: rrc_flip for images of 64 px and more, else crop_flip), ``labels`` (online | stored),
    ``soft_labels`` (root directory of the stores for ``stored``, one per set and seed, kept; default: temporary
    stores, deleted after each run), ``soft_label_topk`` (stored labels keep only the top-k logits per view),
    ``teacher_mode``, ``t2_scale``, ``ce_weight``.
    """

    name: ClassVar[str] = "kd"
    teacher: str | None = None
    temperature: float = 20.0
    mix: str = "cutmix"
    epochs: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    augment: str = "auto"
    labels: str = "online"
    soft_labels: str | None = None
    soft_label_topk: int | None = None
    teacher_mode: str = "eval"
    t2_scale: bool = False
    ce_weight: float = 0.0

    def validate(self) -> None:
        super().validate()
        from ddkit.modules.kd import check_kd_options

        if self.teacher is None:
            raise DDKitError("kd.teacher: required (path of a teacher checkpoint), got None")
        check_kd_options(temperature=self.temperature, mix=self.mix, labels=self.labels,
                         augment="rrc_flip" if self.augment == "auto" else self.augment,
                         teacher_mode=self.teacher_mode, ce_weight=self.ce_weight, lr=self.lr,
                         weight_decay=self.weight_decay, prefix="kd.")

    def targets(self, ds: DistilledSet):
        return ds.labels

    def without_augmentation(self) -> Protocol:
        return replace(self, augment="none", mix="none")

    def resolved_augment(self, spec: DataSpec) -> str:
        if self.augment != "auto":
            return self.augment
        return "rrc_flip" if spec.image_size >= 64 else "crop_flip"

    def make_module(self, spec, net, net_kwargs, ds):
        import torch

        from ddkit.formats.soft_labels import images_fingerprint
        from ddkit.modules.kd import KDStudent, temporary_store

        store, keep = None, True
        if self.labels == "stored":
            if self.soft_labels is None:
                store, keep = temporary_store(), False
            else:  # one store per training set and seed (the evaluator seeds each run just before)
                from pathlib import Path

                seed = torch.initial_seed()
                store = str(Path(self.soft_labels) / f"{images_fingerprint(ds.images)[:16]}-seed{seed}")
        module = KDStudent(spec, net, net_kwargs, teacher=self.teacher, teacher_mode=self.teacher_mode,
                           temperature=self.temperature, t2_scale=self.t2_scale, ce_weight=self.ce_weight,
                           mix=self.mix, augment=self.resolved_augment(spec), lr=self.lr,
                           weight_decay=self.weight_decay, labels=self.labels, soft_labels=store,
                           keep_soft_labels=keep, soft_label_topk=self.soft_label_topk)
        module.attach_train_set(ds.images, ds.labels, batch_size=min(self.batch_size, len(ds)))
        return module

    def train_loader(self, ds: DistilledSet) -> DataLoader | None:
        return None  # KDStudent draws views and mixes per batch (and reads stored labels) in its own loader


PROTOCOLS: dict[str, type[Protocol]] = {"hard": HardProtocol, "soft": SoftProtocol, "kd": KDProtocol}


def get_protocol(name: str, **overrides: Any) -> Protocol:
    """The protocol ``name`` with its defaults, some of them overridden (``None`` values are ignored).

    Raises:
        DDKitError: an unknown protocol name, or an override that is not an option of the protocol (a misspelt key
            would otherwise be dropped without a word).
    """
    if name not in PROTOCOLS:
        raise DDKitError(f"protocol: unknown name (known: {', '.join(PROTOCOLS)}), got {name!r}")
    cls = PROTOCOLS[name]
    known = {f.name for f in fields(cls)}
    for key, value in overrides.items():
        if key not in known:
            raise DDKitError(f"protocol_options.{name}.{key}: unknown option of the {name} protocol (known: "
                             f"{', '.join(sorted(known))}), got {value!r}")
    kwargs = {k: v for k, v in overrides.items() if v is not None}
    protocol = cls(**kwargs)
    protocol.validate()
    return protocol

