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
