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
from ddkit.errors import DDKitError
from ddkit.formats.common import atomic_file, check_finite, load_tensors, save_tensors, sha256_file
from ddkit.nets import build_net

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
    """Read only the header of a teacher file."""
    path = Path(path)
    if not path.is_file():
        raise DDKitError(f"teacher: file not found, got {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("ddkit")
    except Exception as e:  # noqa: BLE001 -- safetensors raises several types for corrupt headers
        raise DDKitError(f"teacher: not a valid safetensors file ({str(e).splitlines()[0]}), got {str(path)!r}") from None
    if raw is None:
        raise DDKitError(f"teacher: no ddkit header (not a ddkit teacher checkpoint), got {str(path)!r}")
    header = json.loads(raw)
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise DDKitError(f"teacher: unsupported format/version, got {header.get('format')!r} v{header.get('version')!r}")
    return TeacherMeta(
        net=header["net"],
        net_kwargs=header["net_kwargs"],
        data_spec=DataSpec.from_dict(header["data_spec"]),
        extra=header.get("extra", {}),
    )


def load_teacher(path: str | os.PathLike) -> tuple[nn.Module, TeacherMeta]:
    """Rebuild the teacher network, load its weights strictly, and return it in eval mode."""
    meta = read_teacher_meta(path)
    spec = meta.data_spec
    net = build_net(meta.net, spec.num_classes, spec.in_chans, spec.image_size, **meta.net_kwargs)
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
