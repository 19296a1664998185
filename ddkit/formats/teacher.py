"""Teacher checkpoints: a full classifier (backbone + head) as one safetensors file.

The file's safetensors metadata holds ``ddkit`` = JSON {format, version, net, net_kwargs, data_spec, ...} so that
recover and KD rebuild the network with :func:`ddkit.nets.build_net` and load the weights strictly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import nn

from ddkit.datamodules.spec import DataSpec
from ddkit.errors import DDKitError, check_mapping
from ddkit.formats.common import atomic_file, check_finite, load_tensors, save_tensors, sha256_file
from ddkit.nets import build_net
from ddkit.nets.registry import check_net_kwargs

FORMAT = "ddkit.teacher"
VERSION = 1


@dataclass
class TeacherMeta:
    """What a teacher file says about itself."""

    net: str
    net_kwargs: dict[str, Any]
    data_spec: DataSpec
    extra: dict[str, Any] = field(default_factory=dict)


def save_teacher(path: str | os.PathLike, net: nn.Module, meta: TeacherMeta) -> None:
    """Write ``net``'s parameters and buffers with ``meta``, atomically."""
    header = {
        "format": FORMAT,
        "version": VERSION,
        "net": meta.net,
        "net_kwargs": meta.net_kwargs,
        "data_spec": meta.data_spec.to_dict(),
        "extra": meta.extra,
    }
    with atomic_file(path, field="teacher") as tmp:
        save_tensors(tmp, dict(net.state_dict()), metadata={"ddkit": json.dumps(header, default=str)})


def read_teacher_meta(path: str | os.PathLike) -> TeacherMeta:
    """Read only the header of a teacher file; every field is checked (one DDKitError naming ``teacher.<field>``)."""
    path = Path(path)
    if not path.is_file():
        raise DDKitError(f"teacher: file not found, got {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("ddkit")
    except Exception as e:  # noqa: BLE001 -- safetensors raises several types for corrupt headers
        if _is_torch_checkpoint(path):
            raise DDKitError(f"teacher: a torch/Lightning checkpoint, not a teacher safetensors file (a classifier or "
                             f"linear probe writes one with export_teacher), got {str(path)!r}") from None
        raise DDKitError(f"teacher: not a valid safetensors file ({str(e).splitlines()[0]}), got {str(path)!r}") from None
    if raw is None:
        raise DDKitError(f"teacher: no ddkit header (not a ddkit teacher checkpoint), got {str(path)!r}")
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DDKitError(f"teacher: the ddkit header is not valid JSON ({e.msg}), got {str(path)!r}") from None
    if not isinstance(header, dict):
        raise DDKitError(f"teacher: the ddkit header must be a JSON object, got {str(path)!r}")
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise DDKitError(f"teacher: unsupported format/version, got {header.get('format')!r} v{header.get('version')!r}")
    missing = [k for k in ("net", "net_kwargs", "data_spec") if k not in header]
    if missing:
        raise DDKitError(f"teacher: the ddkit header lacks {missing}, got {str(path)!r}")
    if not isinstance(header["net"], str):
        raise DDKitError(f"teacher.net: must be a net name, got {header['net']!r}"[:300])
    return TeacherMeta(
        net=header["net"],
        net_kwargs=check_net_kwargs(header["net_kwargs"], "teacher.net_kwargs"),
        data_spec=DataSpec.from_dict(header["data_spec"], "teacher.data_spec"),
        extra=check_mapping(header.get("extra", {}), "teacher.extra"),
    )


def _is_torch_checkpoint(path: Path) -> bool:
    """``torch.save`` files start as a zip archive (or, in the legacy format, a pickle)."""
    with open(path, "rb") as f:
        start = f.read(4)
    return start == b"PK\x03\x04" or start[:1] == b"\x80"


def load_teacher(path: str | os.PathLike) -> tuple[nn.Module, TeacherMeta]:
    """Rebuild the teacher network, load its weights strictly, and return it in eval mode."""
    meta = read_teacher_meta(path)
    spec = meta.data_spec
    try:
        net = build_net(meta.net, spec.num_classes, spec.in_chans, spec.image_size, **meta.net_kwargs)
    except DDKitError as e:  # the net the file asks for, not the user's options
        raise DDKitError(f"teacher.{e}") from None
    state = load_tensors(path, "teacher")
    for name, t in state.items():
        check_finite(t, f"teacher[{name}]")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise DDKitError(f"teacher: weights do not fit net {meta.net!r} ({str(e).splitlines()[0]}), got {str(path)!r}") from None
    return net.eval(), meta


def teacher_reference(path: str | os.PathLike) -> dict[str, str]:
    """How an artifact records the teacher it came from."""
    return {"path": str(Path(path).resolve()), "sha256": sha256_file(path)}


# ---------------------------------------------------------------------------------------------- import

IMPORTABLE_NETS = ("resnet18", "resnet50")
_STATE_DICT_KEYS = ("state_dict", "model", "state_dict_ema", "net")


def _state_dict_of(obj: Any, path: Path) -> dict[str, Any]:
    """The tensors of a checkpoint: a plain state dict, or one under ``state_dict`` / ``model`` / ... (timm's and
    SRe2L's training checkpoints), with a ``module.`` prefix (DataParallel / DDP) removed."""
    if isinstance(obj, dict) and not all(hasattr(v, "shape") for v in obj.values()):
        inner = next((obj[k] for k in _STATE_DICT_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise DDKitError(f"checkpoint: no state dict in it (looked for a dict of tensors, or one under "
                             f"{', '.join(_STATE_DICT_KEYS)}), got keys {sorted(map(str, obj))[:8]} in {str(path)!r}")
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise DDKitError(f"checkpoint: not a state dict, got {type(obj).__name__} in {str(path)!r}")
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


def import_resnet_checkpoint(checkpoint: str | os.PathLike, net: str, data_spec: DataSpec,
                             output: str | os.PathLike) -> TeacherMeta:
    """Turn a torchvision or timm ResNet-18 / ResNet-50 checkpoint file into a ddkit teacher file.

    ddkit's ``resnet18`` / ``resnet50`` are torchvision's ResNets with torchvision's parameter names, which timm's
    ResNets share, so the weights load as they are. The stem follows ``conv1``: a 7x7 kernel is torchvision's
    ImageNet stem (conv + max-pool), a 3x3 kernel the CIFAR stem of SRe2L's small-image teachers.

    Args:
        checkpoint: a file ``torch.load(weights_only=True)`` can read: a state dict, or a dict holding one under
            ``state_dict``, ``model``, ``state_dict_ema`` or ``net``; keys may carry a ``module.`` prefix.
        net: ``resnet18`` or ``resnet50``.
        data_spec: the dataset the teacher was trained on (classes, image size, normalization); its class count
            must be the checkpoint's.
        output: the teacher file to write (atomically).

    Returns:
        The teacher's meta (``extra.imported_from`` names the source file and its sha256).
    """
    from ddkit.formats.common import load_weights_only

    path = Path(checkpoint)
    if net not in IMPORTABLE_NETS:
        raise DDKitError(f"net: must be one of {', '.join(IMPORTABLE_NETS)}, got {net!r}")
    if not path.is_file():
        raise DDKitError(f"checkpoint: file not found, got {str(path)!r}")
    state = _state_dict_of(load_weights_only(path, "checkpoint"), path)
    for key in ("conv1.weight", "fc.weight"):
        if key not in state:
            raise DDKitError(f"checkpoint: no {key!r} (not a torchvision/timm ResNet state dict), "
                             f"got keys {sorted(state)[:6]} in {str(path)!r}")
    classes = int(state["fc.weight"].shape[0])
    if classes != data_spec.num_classes:
        raise DDKitError(f"checkpoint: its head has {classes} classes but dataset {data_spec.dataset!r} has "
                         f"{data_spec.num_classes}, got {str(path)!r}")
    kernel = int(state["conv1.weight"].shape[-1])
    if kernel not in (3, 7):
        raise DDKitError(f"checkpoint: conv1 must be 7x7 (ImageNet stem) or 3x3 (CIFAR stem), got {kernel}x{kernel}")
    kwargs = {"stem": "imagenet" if kernel == 7 else "cifar"}
    model = build_net(net, data_spec.num_classes, data_spec.in_chans, data_spec.image_size, **kwargs)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise DDKitError(f"checkpoint: weights do not fit net {net!r} ({str(e).splitlines()[0].strip()}), "
                         f"got {str(path)!r}") from None
    for name, t in model.state_dict().items():
        check_finite(t, f"checkpoint[{name}]")
    meta = TeacherMeta(net, kwargs, data_spec, extra={"imported_from": {"path": str(path.resolve()),
                                                                       "sha256": sha256_file(path)}})
    save_teacher(output, model.eval(), meta)
    return meta
