"""ExpertBuffer: expert trajectories for trajectory matching (MTT [1], FTD / DATM [2]).

Directory layout::

    meta.json                   format "ddkit.buffer", version 1, net + net_kwargs, data_spec, parameter names
                                and shapes in ``net.parameters()`` order, num_params P, epochs, optimizer recipe,
                                dataset, ZCA file name (or null)
    expert_{k:04d}.safetensors  trajectory: float32 [epochs + 1, P]; row 0 = the initial parameters, row e = the
                                parameters after epoch e, each flattened in ``net.parameters()`` order
    zca.safetensors             optional: the ZCA transform the experts' data was whitened with
                                (``ddkit.ops.zca.ZCA.state_dict()``: mean, transform, inverse)

Rows are read lazily: :meth:`ExpertBuffer.params` memory-maps the file and copies one ``[P]`` row. The reference
layout (``replay_buffer_{n}.pt``: a pickled list of experts, each a list of per-epoch lists of per-layer tensors)
is read by :func:`import_reference_buffer` with ``torch.load(weights_only=True)`` only.

References:
    [1] Cazenavette et al., "Dataset Distillation by Matching Training Trajectories", CVPR 2022.
    [2] Du et al., "Minimizing the Accumulated Trajectory Error to Improve Dataset Distillation", CVPR 2023;
        Guo et al., "Towards Lossless Dataset Distillation via Difficulty-Aligned Trajectory Matching", ICLR 2024.

Example:
    >>> buf = ExpertBuffer("buffers/cifar10/datm")
    >>> net = buf.build_net()                      # the experts' architecture, parameters in buffer order
    >>> start = buf.params(expert=3, epoch=10)     # float32 [P]
    >>> target = buf.params(expert=3, epoch=12)
"""

from __future__ import annotations

import json
import math
import operator
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from ddkit.datamodules.spec import DataSpec
from ddkit.errors import DDKitError, check_int, check_mapping
from ddkit.formats.common import (
    atomic_dir,
    atomic_file,
    check_finite,
    load_tensors,
    load_weights_only,
    read_json,
    save_tensors,
    write_json,
)
from ddkit.nets.registry import check_net_kwargs

FORMAT = "ddkit.buffer"
VERSION = 1
META = "meta.json"
ZCA_FILE = "zca.safetensors"
TENSOR = "trajectory"
_EXPERT_RE = re.compile(r"^expert_(\d{4,})\.safetensors$")


def expert_file(index: int) -> str:
    """File name of expert ``index``: ``expert_{index:04d}.safetensors``."""
    return f"expert_{index:04d}.safetensors"


@dataclass
class BufferMeta:
    """What ``meta.json`` says about a buffer.

    Args:
        net: architecture name for :func:`ddkit.nets.build_net`.
        net_kwargs: architecture options (e.g. ``{depth: 3, width: 128, norm: instance}``).
        data_spec: the experts' training data (shape, normalization, ``zca``).
        param_names: ``net.named_parameters()`` names, in ``net.parameters()`` order.
        param_shapes: the matching shapes.
        epochs: training epochs per expert; every trajectory has ``epochs + 1`` rows.
        recipe: how the experts were trained (optimizer, lr, batch size, augmentation, GSAM, seed, ...).
        zca: ``zca.safetensors`` is stored beside the experts (``data_spec.zca`` says whether the data was whitened;
            an imported reference buffer may be whitened without carrying its transform).
    """

    net: str
    net_kwargs: dict[str, Any]
    data_spec: DataSpec
    param_names: list[str]
    param_shapes: list[list[int]]
    epochs: int
    recipe: dict[str, Any] = field(default_factory=dict)
    zca: bool = False

    @property
    def num_params(self) -> int:
        """P, the length of one flattened parameter vector."""
        return sum(math.prod(s) for s in self.param_shapes)

    @classmethod
    def for_net(cls, net_name: str, net_kwargs: dict[str, Any] | None, data_spec: DataSpec, net: nn.Module,
                epochs: int, recipe: dict[str, Any] | None = None, zca: bool = False) -> BufferMeta:
        """The meta of a buffer of ``net``'s parameters (names and shapes read from ``net``)."""
        named = list(net.named_parameters())
        return cls(net_name, dict(net_kwargs or {}), data_spec, [n for n, _ in named],
                   [list(p.shape) for _, p in named], int(epochs), dict(recipe or {}), zca)

    def validate(self, where: str = "buffer.meta") -> None:
        """Check field types and consistency; raise one DDKitError."""
        check_int(self.epochs, f"{where}.epochs", 1)
        if len(self.param_names) != len(self.param_shapes) or not self.param_shapes:
            raise DDKitError(f"{where}.param_shapes: need one shape per parameter name ({len(self.param_names)}), "
                             f"got {len(self.param_shapes)}")
        for name, shape in zip(self.param_names, self.param_shapes):
            if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                      for d in shape):
                raise DDKitError(f"{where}.param_shapes: shape of {name!r} must be a list of sizes, got {shape!r}")

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "net": self.net,
            "net_kwargs": self.net_kwargs,
            "data_spec": self.data_spec.to_dict(),
            "dataset": self.data_spec.dataset,
            "param_names": list(self.param_names),
            "param_shapes": [list(s) for s in self.param_shapes],
            "num_params": self.num_params,
            "epochs": self.epochs,
            "recipe": self.recipe,
            "zca": ZCA_FILE if self.zca else None,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str = "buffer.meta") -> BufferMeta:
        if obj.get("format") != FORMAT:
            raise DDKitError(f"{where}.format: must be {FORMAT!r}, got {obj.get('format')!r}")
        if obj.get("version") != VERSION:
            raise DDKitError(f"{where}.version: unsupported version (this ddkit reads {VERSION}), "
                             f"got {obj.get('version')!r}")
        missing = [k for k in ("net", "data_spec", "param_names", "param_shapes", "epochs") if k not in obj]
        if missing:
            raise DDKitError(f"{where}: missing fields {missing}, got fields {sorted(obj)}")
        spec = DataSpec.from_dict(obj["data_spec"], f"{where}.data_spec")
        if not isinstance(obj["net"], str):
            raise DDKitError(f"{where}.net: must be a net name, got {obj['net']!r}"[:300])
        for key in ("param_names", "param_shapes"):
            if not isinstance(obj[key], list):
                raise DDKitError(f"{where}.{key}: must be a list, got {obj[key]!r}"[:300])
        meta = cls(
            net=obj["net"],
            net_kwargs=check_net_kwargs(obj.get("net_kwargs") or {}, f"{where}.net_kwargs"),
            data_spec=spec,
            param_names=[str(n) for n in obj["param_names"]],
            param_shapes=obj["param_shapes"],
            epochs=obj["epochs"],
            recipe=check_mapping(obj.get("recipe") or {}, f"{where}.recipe"),
            zca=obj.get("zca") is not None,
        )
        meta.validate(where)
        if "num_params" in obj and obj["num_params"] != meta.num_params:
            raise DDKitError(f"{where}.num_params: does not match the parameter shapes ({meta.num_params}), "
                             f"got {obj['num_params']!r}")
        return meta

    def compatible(self, other: BufferMeta) -> bool:
        """Same architecture, data and trajectory shape (the recipe may differ, e.g. a different seed)."""
        return (self.net == other.net and self.net_kwargs == other.net_kwargs
                and self.data_spec == other.data_spec and self.param_names == other.param_names
                and self.param_shapes == other.param_shapes and self.epochs == other.epochs)


def read_buffer_meta(path: str | os.PathLike) -> BufferMeta:
    """Read and validate ``<path>/meta.json``."""
    path = Path(path)
    if not path.is_dir():
        raise DDKitError(f"buffer: directory not found, got {str(path)!r}")
    return BufferMeta.from_json(read_json(path / META, "buffer.meta"))


def write_buffer_meta(path: str | os.PathLike, meta: BufferMeta, zca: dict[str, Tensor] | None = None) -> None:
    """Write ``meta.json`` (and ``zca.safetensors`` when ``zca`` is given) into the buffer directory, atomically.

    Args:
        path: the buffer directory (created if missing).
        meta: what to record; ``meta.zca`` must be true when ``zca`` is given. With ``meta.zca`` true and no
            ``zca``, a ``zca.safetensors`` must already be in ``path`` (rewriting the meta of an existing buffer).
        zca: ``ZCA.state_dict()`` of the whitening the experts' data went through.

    Raises:
        DDKitError: inconsistent ZCA arguments, a malformed ZCA state, an invalid meta, or an unwritable path.
    """
    path = Path(path)
    meta.validate()
    if zca is not None:
        from ddkit.ops.zca import ZCA

        if not meta.zca:
            raise DDKitError("zca: ZCA tensors given but meta.zca is false, got meta.zca=False")
        ZCA.from_state_dict(zca)  # validates keys and shapes
        d = zca["mean"].numel()
        want = meta.data_spec.in_chans * meta.data_spec.image_size ** 2
        if d != want:
            raise DDKitError(f"zca: dimension must be C*H*W = {want} for the buffer's data_spec, got {d}")
        with atomic_file(path / ZCA_FILE, field="buffer") as tmp:
            save_tensors(tmp, zca)
    elif meta.zca and not (path / ZCA_FILE).is_file():
        raise DDKitError(f"zca: meta.zca is true but no ZCA tensors were given or stored, got {str(path)!r}")
    path.mkdir(parents=True, exist_ok=True)
    write_json(path / META, meta.to_json())


def save_expert(path: str | os.PathLike, index: int, trajectory: Tensor,
                metadata: dict[str, Any] | None = None) -> Path:
    """Write one expert's trajectory as ``<path>/expert_{index:04d}.safetensors``, atomically.

    Args:
        path: the buffer directory (created if missing).
        index: the expert's index, ``>= 0``.
        trajectory: ``[epochs + 1, P]`` parameters (row 0 = init); stored as float32.
        metadata: optional provenance (e.g. ``{"rank": 0, "seed": 123}``) kept in the file's safetensors header
            under ``ddkit``.

    Returns:
        The written file's path.

    Raises:
        DDKitError: a negative index, a trajectory that is not 2-D with at least 2 rows, non-finite values, or a
            shape other than ``[meta.epochs + 1, meta.num_params]`` when ``meta.json`` already exists.
    """
    path = Path(path)
    if not isinstance(index, int) or index < 0:
        raise DDKitError(f"index: must be an integer >= 0, got {index!r}")
    where = f"buffer.{expert_file(index)}"
    if trajectory.dim() != 2 or trajectory.shape[0] < 2:
        raise DDKitError(f"{where}: trajectory must be [epochs + 1, P] with epochs >= 1, got {list(trajectory.shape)}")
    if (path / META).is_file():
        meta = read_buffer_meta(path)
        want = [meta.epochs + 1, meta.num_params]
        if list(trajectory.shape) != want:
            raise DDKitError(f"{where}: trajectory shape must be {want} (meta.json), got {list(trajectory.shape)}")
    trajectory = trajectory.detach().to("cpu", torch.float32)
    check_finite(trajectory, where)
    header = {"ddkit": json.dumps({"format": FORMAT, "version": VERSION, "expert": index, **(metadata or {})},
                                  default=str)}
    target = path / expert_file(index)
    with atomic_file(target, field="buffer") as tmp:
        save_tensors(tmp, {TENSOR: trajectory}, metadata=header)
    return target


def _expert_header(file: Path) -> tuple[list[int], str, dict[str, str]]:
    """Shape, dtype and safetensors metadata of an expert file, reading only its header."""
    try:
        with safe_open(str(file), framework="pt") as f:
            if TENSOR not in f.keys():  # noqa: SIM118  (safe_open has no __contains__)
                raise DDKitError(f"buffer.{file.name}: no {TENSOR!r} tensor, got keys {sorted(f.keys())}")
            sl = f.get_slice(TENSOR)
            return list(sl.get_shape()), sl.get_dtype(), dict(f.metadata() or {})
    except DDKitError:
        raise
    except Exception as e:  # noqa: BLE001  (safetensors raises several types for truncated or corrupt files)
        raise DDKitError(f"buffer.{file.name}: not a valid safetensors file ({str(e).splitlines()[0]}), "
                         f"got {str(file)!r}") from None


class ExpertBuffer:
    """A buffer directory opened for reading; trajectories are read lazily, one row or one expert at a time.

    Args:
        path: the buffer directory.

    Attributes:
        meta: the parsed ``meta.json``.
        num_experts: number of expert files; experts are addressed ``0 .. num_experts - 1`` in file-index order
            (``expert_indices[i]`` is the file index of expert ``i``).
        epochs: training epochs per expert (each trajectory has ``epochs + 1`` rows).
        num_params: P.

    Raises:
        DDKitError: missing directory or meta, an invalid meta, no expert files, or an expert file that is not a
            readable float32 ``[epochs + 1, P]`` safetensors file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.meta = read_buffer_meta(self.path)
        self.epochs = self.meta.epochs
        self.num_params = self.meta.num_params
        found = sorted((int(m.group(1)), p) for p in self.path.iterdir() if (m := _EXPERT_RE.match(p.name)))
        if not found:
            raise DDKitError(f"buffer: no expert_*.safetensors files, got {str(self.path)!r}")
        want = [self.epochs + 1, self.num_params]
        for _, file in found:
            shape, dtype, _ = _expert_header(file)
            if shape != want or dtype != "F32":
                raise DDKitError(f"buffer.{file.name}: trajectory must be float32 {want} (meta.json: epochs "
                                 f"{self.epochs}, num_params {self.num_params}), got {dtype} {shape}")
        self.expert_indices = [i for i, _ in found]
        self._files = [f for _, f in found]
        self.num_experts = len(self._files)

    def __repr__(self) -> str:
        return (f"ExpertBuffer({str(self.path)!r}, net={self.meta.net!r}, experts={self.num_experts}, "
                f"epochs={self.epochs}, P={self.num_params})")

    def __len__(self) -> int:
        return self.num_experts

    @cached_property
    def zca(self) -> dict[str, Tensor] | None:
        """``ZCA.state_dict()`` of the experts' whitening (``mean``, ``transform``, ``inverse``), or None."""
        if not self.meta.zca:
            return None
        state = load_tensors(self.path / ZCA_FILE, "buffer.zca")
        from ddkit.ops.zca import ZCA

        ZCA.from_state_dict(state)
        return state

    def _file(self, expert: int) -> Path:
        return self._files[_index(expert, "expert", self.num_experts - 1)]

    def params(self, expert: int, epoch: int) -> Tensor:
        """Flattened parameters of ``expert`` after ``epoch`` epochs (0 = init): float32 ``[P]``.

        Only that row is read (memory-mapped slice).

        Raises:
            DDKitError: an index out of range, an unreadable file, or non-finite values.
        """
        file = self._file(expert)
        epoch = _index(epoch, "epoch", self.epochs)
        try:
            with safe_open(str(file), framework="pt") as f:
                row = f.get_slice(TENSOR)[epoch]
        except Exception as e:  # noqa: BLE001  (as above)
            raise DDKitError(f"buffer.{file.name}: cannot read epoch {epoch} ({str(e).splitlines()[0]}), "
                             f"got {str(file)!r}") from None
        row = row.reshape(-1).clone()
        check_finite(row, f"buffer.{file.name}[epoch {epoch}]")
        return row

    def trajectory(self, expert: int) -> Tensor:
        """The whole trajectory of ``expert``: float32 ``[epochs + 1, P]``."""
        file = self._file(expert)
        t = load_tensors(file, f"buffer.{file.name}")[TENSOR]
        check_finite(t, f"buffer.{file.name}")
        return t

    def expert_metadata(self, expert: int) -> dict[str, Any]:
        """The provenance stored in the expert file's header (``expert``, ``rank``, ``seed``, ...)."""
        raw = _expert_header(self._file(expert))[2].get("ddkit")
        return json.loads(raw) if raw else {}

    def build_net(self) -> nn.Module:
        """A fresh network of the experts' architecture for the buffer's data (its parameters are not loaded)."""
        from ddkit.nets import build_net

        s = self.meta.data_spec
        try:
            net = build_net(self.meta.net, s.num_classes, s.in_chans, s.image_size, **self.meta.net_kwargs)
        except DDKitError as e:  # the net meta.json asks for, not the user's options
            raise DDKitError(f"buffer.meta.{e}") from None
        self.check_net(net)
        return net

    def check_net(self, net: nn.Module) -> None:
        """Raise DDKitError unless ``net``'s parameters have the buffer's count and shapes, in order."""
        check_params(self.meta, net, str(self.path))

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """``{name: tensor}`` views of a flat ``[P]`` vector, for ``torch.func.functional_call``."""
        if flat.dim() != 1 or flat.numel() != self.num_params:
            raise DDKitError(f"flat: must be a [{self.num_params}] vector, got {list(flat.shape)}")
        out, start = {}, 0
        for name, shape in zip(self.meta.param_names, self.meta.param_shapes):
            n = math.prod(shape)
            out[name] = flat[start:start + n].view(shape)
            start += n
        return out


def _index(value: Any, field: str, last: int) -> int:
    """``value`` as an int in ``[0, last]`` (Python, NumPy and 0-d tensor integers are accepted)."""
    try:
        i = operator.index(value)
    except TypeError:
        raise DDKitError(f"{field}: must be an integer in [0, {last}], got {value!r}") from None
    if not 0 <= i <= last:
        raise DDKitError(f"{field}: must be in [0, {last}], got {i}")
    return i


def check_params(meta: BufferMeta, net: nn.Module, where: str = "buffer") -> None:
    """DDKitError if ``net``'s parameter count or shapes (in ``parameters()`` order) differ from ``meta``'s."""
    shapes = [list(p.shape) for p in net.parameters()]
    count = sum(math.prod(s) for s in shapes)
    name = type(net).__name__.lower()
    if count != meta.num_params:
        raise DDKitError(f"buffer: parameter count {meta.num_params} does not match net {name} ({count}), "
                         f"got {where!r}")
    if shapes != meta.param_shapes:
        pairs = list(zip(meta.param_shapes, shapes))
        i = next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs))
        mine = meta.param_shapes[i] if i < len(meta.param_shapes) else None
        theirs = shapes[i] if i < len(shapes) else None
        raise DDKitError(f"buffer: parameter shapes do not match net {name} at parameter {i} "
                         f"(buffer {mine}, net {theirs}), got {where!r}")


def flatten_params(params: list[Tensor]) -> Tensor:
    """``cat([p.reshape(-1)])`` as a float32 CPU vector (the layout of one trajectory row)."""
    return torch.cat([p.detach().reshape(-1).to("cpu", torch.float32) for p in params])


# ------------------------------------------------------------------------------------------------ reference import


def _load_reference(file: Path) -> Any:
    """``torch.load(file, weights_only=True)``; anything that is not plain tensors and lists is refused."""
    if not file.is_file():
        raise DDKitError(f"files: file not found, got {str(file)!r}")
    return load_weights_only(file, "files")


def _flatten_expert(expert: Any, shapes: list[list[int]], where: str) -> Tensor:
    """A reference expert (list of per-epoch lists of per-layer tensors) as float32 ``[epochs + 1, P]``."""
    if not isinstance(expert, (list, tuple)) or len(expert) < 2:
        raise DDKitError(f"{where}: must be a list of at least 2 per-epoch parameter lists, "
                         f"got {type(expert).__name__} of length {len(expert) if hasattr(expert, '__len__') else '?'}")
    rows = []
    for e, layers in enumerate(expert):
        if not isinstance(layers, (list, tuple)) or len(layers) != len(shapes):
            raise DDKitError(f"{where}[epoch {e}]: must be a list of {len(shapes)} parameter tensors, "
                             f"got {type(layers).__name__} of length "
                             f"{len(layers) if hasattr(layers, '__len__') else '?'}")
        for i, (t, shape) in enumerate(zip(layers, shapes)):
            if not isinstance(t, Tensor) or list(t.shape) != shape:
                got = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise DDKitError(f"{where}[epoch {e}][param {i}]: must be a tensor of shape {shape}, got {got}")
        rows.append(flatten_params(list(layers)))
    traj = torch.stack(rows)
    check_finite(traj, where)
    return traj


def import_reference_buffer(files: list[str], out: str, net: str, net_kwargs: dict[str, Any] | None,
                            data_spec: DataSpec | dict) -> ExpertBuffer:
    """Convert MTT / DATM ``replay_buffer_{n}.pt`` files into a ddkit buffer directory.

    Each file is a list of experts; an expert is a list of ``epochs + 1`` per-epoch lists of per-layer tensors in
    ``net.parameters()`` order (MTT ``buffer.py``, DATM ``buffer/buffer_FTD.py``). Files are read with
    ``torch.load(weights_only=True)`` only, one at a time, so a file that needs arbitrary pickled objects is
    refused without running them. Experts are numbered in the order of ``files``, then of each file's list.

    Args:
        files: the ``.pt`` files, in order.
        out: the new buffer directory (must not exist or be empty); written atomically as a whole.
        net: architecture name the experts were trained with (``convnet`` for MTT's ``ConvNet``).
        net_kwargs: its options (``{depth: 4}`` for ``ConvNetD4``).
        data_spec: the experts' data. A ZCA-whitened reference buffer carries no transform, so the result has
            ``meta.zca`` false; ``data_spec.zca`` true still tells consumers to whiten their data.

    Returns:
        The written buffer, opened.

    Raises:
        DDKitError: no files, a file that cannot be loaded with ``weights_only=True``, a layout or shape that does
            not match ``net``, experts of different lengths, non-finite values, or a non-empty ``out``.
    """
    from ddkit.datamodules.spec import as_spec
    from ddkit.nets import build_net

    if not files:
        raise DDKitError("files: need at least one replay_buffer_{n}.pt file, got []")
    spec = as_spec(data_spec)
    out_path = Path(out)
    if out_path.exists() and (not out_path.is_dir() or any(out_path.iterdir())):
        raise DDKitError(f"out: must not exist or be an empty directory, got {str(out_path)!r}")
    model = build_net(net, spec.num_classes, spec.in_chans, spec.image_size, **(net_kwargs or {}))
    shapes = [list(p.shape) for p in model.parameters()]
    meta: BufferMeta | None = None
    count = 0
    with atomic_dir(out_path, field="out") as tmp:
        for file in map(Path, files):
            experts = _load_reference(file)
            if not isinstance(experts, (list, tuple)) or not experts:
                raise DDKitError(f"files: must hold a non-empty list of experts, got {type(experts).__name__} "
                                 f"in {str(file)!r}")
            for j, expert in enumerate(experts):
                traj = _flatten_expert(expert, shapes, f"{file.name}[expert {j}]")
                if meta is None:
                    recipe = {"source": "reference replay_buffer", "files": [Path(f).name for f in files]}
                    meta = BufferMeta.for_net(net, net_kwargs, spec, model, traj.shape[0] - 1, recipe)
                    write_buffer_meta(tmp, meta)
                elif traj.shape[0] != meta.epochs + 1:
                    raise DDKitError(f"{file.name}[expert {j}]: all experts must have {meta.epochs + 1} epochs "
                                     f"(as the first), got {traj.shape[0]}")
                save_expert(tmp, count, traj, metadata={"source": file.name, "source_index": j})
                count += 1
            del experts
    return ExpertBuffer(out_path)
