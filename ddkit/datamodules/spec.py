"""What a stage needs to know about its data, passed from the datamodule to the module by the CLI."""

from __future__ import annotations

from dataclasses import asdict, dataclass


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
    def from_dict(cls, d: dict) -> DataSpec:
        d = dict(d)
        d["mean"] = tuple(d["mean"])
        d["std"] = tuple(d["std"])
        d["class_names"] = tuple(d.get("class_names", ()))
        return cls(**d)


def as_spec(value: DataSpec | dict | None) -> DataSpec:
    """Accept a DataSpec or its dict form (as stored in checkpoints); None is a clear error."""
    from ddkit.errors import DDKitError

    if value is None:
        raise DDKitError("data_spec: required (the CLI links it from the datamodule), got None")
    return value if isinstance(value, DataSpec) else DataSpec.from_dict(value)
