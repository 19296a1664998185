"""Named evaluation protocols. Each is a frozen record, stored next to every number it produces.

A protocol turns (training images, training targets, data spec, net) into a LightningModule and says how long to
train and with which batch size; the evaluator does the rest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import lightning as L

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

    def make_module(self, spec: DataSpec, net: str, net_kwargs: dict, ds: DistilledSet) -> L.LightningModule:
        raise NotImplementedError


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


PROTOCOLS: dict[str, type[Protocol]] = {"hard": HardProtocol, "soft": SoftProtocol}


def get_protocol(name: str, **overrides: Any) -> Protocol:
    """The protocol ``name`` with its defaults, some of them overridden (``None`` values are ignored)."""
    if name not in PROTOCOLS:
        raise DDKitError(f"protocol: unknown name (known: {', '.join(PROTOCOLS)}), got {name!r}")
    cls = PROTOCOLS[name]
    known = {f.name for f in fields(cls)}
    kwargs = {k: v for k, v in overrides.items() if v is not None and k in known}
    protocol = cls(**kwargs)
    protocol.validate()
    return protocol

