"""What a stage needs to know about its data, passed from the datamodule to the module by the CLI."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from ddkit.errors import DDKitError, check_finite_numbers, check_int

# Upper bounds on sizes read from files and checkpoints, checked before anything is allocated (a 10-byte edit
# must not ask for petabytes). Far above every dataset ddkit knows (ImageNet-21k has 21,841 classes).
MAX_CLASSES = 100_000
MAX_IN_CHANS = 1_024
MAX_IMAGE_SIZE = 4_096


@dataclass(frozen=True)
class DataSpec:
    """Shape and preprocessing of a dataset's training inputs.

    Args:
        dataset: registry name of the real dataset (``digits``, ``fashion_mnist``, ``cifar10``, ...).
        num_classes: number of classes.
        in_chans: image channels.
        image_size: image height = width in pixels, as fed to the network.
        mean: per-channel mean used to normalize inputs (ignored for the pixel range when ``zca`` is set).
        std: per-channel std used to normalize inputs.
        zca: inputs are ZCA-whitened [0, 1] images instead of mean/std-normalized ones.
        class_names: one name per class, in label order.
    """

    dataset: str
    num_classes: int
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    zca: bool = False
    class_names: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = "data_spec") -> DataSpec:
        """The spec stored as a dict (in an artifact or a checkpoint), every field checked; one DDKitError naming
        ``<where>.<field>`` otherwise."""
        if not isinstance(d, dict):
            raise DDKitError(f"{where}: must be a mapping, got {d!r}"[:300])
        names = [f.name for f in fields(cls)]
        missing = [n for n in names[:6] if n not in d]
        unknown = sorted(set(d) - set(names))
        if missing:
            raise DDKitError(f"{where}: missing fields {missing}, got fields {sorted(d)}")
        if unknown:
            raise DDKitError(f"{where}: unknown fields {unknown}, got fields {sorted(d)}")
        if not isinstance(d["dataset"], str):
            raise DDKitError(f"{where}.dataset: must be a name, got {d['dataset']!r}")
        num_classes = check_int(d["num_classes"], f"{where}.num_classes", 1, MAX_CLASSES)
        in_chans = check_int(d["in_chans"], f"{where}.in_chans", 1, MAX_IN_CHANS)
        image_size = check_int(d["image_size"], f"{where}.image_size", 1, MAX_IMAGE_SIZE)
        zca = d.get("zca", False)
        if not isinstance(zca, bool):
            raise DDKitError(f"{where}.zca: must be true or false, got {zca!r}")
        class_names = d.get("class_names", ())
        if (not isinstance(class_names, (list, tuple)) or not all(isinstance(c, str) for c in class_names)
                or len(class_names) not in (0, num_classes)):
            raise DDKitError(f"{where}.class_names: must be a list of {num_classes} names, got {class_names!r}"[:300])
        return cls(
            dataset=d["dataset"],
            num_classes=num_classes,
            in_chans=in_chans,
            image_size=image_size,
            mean=check_finite_numbers(d["mean"], f"{where}.mean", in_chans),
            std=check_finite_numbers(d["std"], f"{where}.std", in_chans, positive=True),
            zca=zca,
            class_names=tuple(class_names),
        )


def as_spec(value: DataSpec | dict | None) -> DataSpec:
    """Accept a DataSpec or its dict form (as stored in checkpoints); None is a clear error."""
    if value is None:
        raise DDKitError("data_spec: required (the CLI links it from the datamodule), got None")
    return value if isinstance(value, DataSpec) else DataSpec.from_dict(value)
