"""DistilledSet: synthetic images with their labels and everything needed to evaluate them.

Directory layout::

    images.safetensors   images: [N, C, H, W], float32 in the training input space (normalized or ZCA-whitened),
                         or float16, or uint8 pixels (``image_storage`` in meta.json; see ddkit/formats/images.py)
    labels.safetensors   labels: int64 [N]; optional label_logits: float32 [N, K]; optional step_size: float32 []
    zca.safetensors      optional: the ZCA transform the images live in
    meta.json            format, version, data_spec, ipc, method, config, teacher, sha256 of each tensor file
    images/              optional SRe2L-compatible ImageFolder: new{c:03d}/class{c:03d}_id{i:03d}.png
    grid.png             a picture of the set, one row per class (``ddkit show`` redraws it)

Sets written before ``image_storage`` existed are float32. ``load_distilled(..., lazy=True)`` reads images per
sample from disk instead of loading them; ``load_distilled(folder, folder_spec=...)`` reads a bare image folder (recover's
SRe2L export, or SRe2L's released images) as a set, lazily.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ddkit.datamodules.spec import DataSpec
from ddkit.errors import DDKitError, check_int
from ddkit.formats.common import (
    atomic_dir,
    check_finite,
    load_tensors,
    read_consistently,
    read_json,
    save_tensors,
    sha256_file,
    write_json,
)
from ddkit.formats.images import (
    FolderImages,
    LazyImages,
    check_storage,
    decode_images,
    encode_images,
    is_lazy,
    storage_of,
    write_images_streaming,
)

FORMAT = "ddkit.distilled"
VERSION = 1
TENSOR_FILES = ("images.safetensors", "labels.safetensors", "zca.safetensors")


@dataclass
class DistilledSet:
    """A distilled dataset in memory.

    Args:
        images: float32 [N, C, H, W], in the training input space described by ``spec``; or a lazy reader with the
            same shape (:class:`ddkit.formats.images.LazyImages` / ``FolderImages``) that decodes on indexing.
        labels: int64 [N] hard labels.
        spec: the real dataset's shape and preprocessing.
        ipc: images per class.
        method: what made it (``random``, ``sre2l``, ``scdd``, ``mtt``, ``datm``, ...).
        label_logits: optional float32 [N, K] learned label logits (DATM); targets are their softmax.
        step_size: optional learned learning rate (MTT/DATM), used by the ``soft`` protocol.
        zca: optional ZCA state (``mean``, ``transform``, ``inverse``) the images are whitened with.
        config: the full config of the run that made it.
        teacher: reference ({path, sha256}) to the teacher it came from, if any.
        extra: anything else worth recording (e.g. stored soft-label bytes).
    """

    images: torch.Tensor
    labels: torch.Tensor
    spec: DataSpec
    ipc: int
    method: str
    label_logits: torch.Tensor | None = None
    step_size: float | None = None
    zca: dict[str, torch.Tensor] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    teacher: dict[str, str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.images.shape[0]

    def soft_targets(self) -> torch.Tensor:
        """softmax(label_logits), or one-hot hard labels when there are no learned logits."""
        if self.label_logits is not None:
            return torch.softmax(self.label_logits.float(), dim=1)
        return torch.nn.functional.one_hot(self.labels, self.spec.num_classes).float()

    def validate(self, where: str = "distilled") -> None:
        """Check shapes, dtypes, label range, per-class counts and finiteness; raise one DDKitError."""
        s = self.spec
        if self.ipc <= 0:
            raise DDKitError(f"{where}.ipc: must be > 0, got {self.ipc!r}")
        lazy = is_lazy(self.images)
        if not lazy and self.images.dtype != torch.float32:
            raise DDKitError(f"{where}.images: dtype must be float32, got {self.images.dtype}")
        want = (s.in_chans, s.image_size, s.image_size)
        if self.images.dim() != 4 or tuple(self.images.shape[1:]) != want:
            raise DDKitError(f"{where}.images: shape must be [N, {', '.join(map(str, want))}], got {list(self.images.shape)}")
        n = self.images.shape[0]
        if self.labels.dtype != torch.int64 or tuple(self.labels.shape) != (n,):
            raise DDKitError(f"{where}.labels: must be int64 of shape [{n}], got {self.labels.dtype} {list(self.labels.shape)}")
        if n and (int(self.labels.min()) < 0 or int(self.labels.max()) >= s.num_classes):
            raise DDKitError(f"{where}.labels: must lie in [0, {s.num_classes}), got range "
                             f"[{int(self.labels.min())}, {int(self.labels.max())}]")
        counts = torch.bincount(self.labels, minlength=s.num_classes)
        if bool((counts != self.ipc).any()):
            raise DDKitError(f"{where}.labels: every class must have ipc={self.ipc} images, got counts {counts.tolist()}")
        if not lazy:
            check_finite(self.images, f"{where}.images")
        elif self.images.storage != "uint8":  # decoded pixels are finite; float storage is scanned chunk by chunk
            for chunk in self.images.chunks(1024):
                check_finite(chunk, f"{where}.images")
        if self.label_logits is not None:
            if tuple(self.label_logits.shape) != (n, s.num_classes):
                raise DDKitError(f"{where}.label_logits: shape must be [{n}, {s.num_classes}], "
                                 f"got {list(self.label_logits.shape)}")
            check_finite(self.label_logits, f"{where}.label_logits")
        if self.step_size is not None and not (self.step_size > 0 and self.step_size < float("inf")):
            raise DDKitError(f"{where}.step_size: must be a finite positive number, got {self.step_size!r}")
        if self.zca is not None:
            missing = {"mean", "transform", "inverse"} - set(self.zca)
            if missing:
                raise DDKitError(f"{where}.zca: missing tensors {sorted(missing)}, got {sorted(self.zca)}")


def save_distilled(ds: DistilledSet, path: str | os.PathLike, export: str | None = None,
                   image_storage: str = "float32") -> Path:
    """Validate ``ds`` and write it to the directory ``path`` atomically (temp dir, then rename), with its
    ``grid.png``.

    Args:
        export: also write the SRe2L-compatible image folder, as ``png`` or ``jpg`` (None: no image files).
        image_storage: ``float32`` (exact), ``float16`` or ``uint8`` pixels (see ddkit/formats/images.py).
    """
    check_storage(image_storage)
    ds.validate()
    if export not in (None, "png", "jpg"):
        raise DDKitError(f"export: must be png, jpg or null, got {export!r}")
    path = Path(path)
    from ddkit.formats.grid import GRID_FILE, grid_png

    grid = grid_png(ds)  # drawn before the directory swap starts: a kill then seldom leaves a temporary directory
    with atomic_dir(path, field="distilled", fmt=FORMAT) as tmp:
        if is_lazy(ds.images):  # written chunk by chunk: the set is never in memory
            write_images_streaming(tmp / "images.safetensors", ds.images, image_storage, ds.spec)
        else:
            save_tensors(tmp / "images.safetensors", {"images": encode_images(ds.images, image_storage, ds.spec)})
        labels = {"labels": ds.labels.long()}
        if ds.label_logits is not None:
            labels["label_logits"] = ds.label_logits.float()
        if ds.step_size is not None:
            labels["step_size"] = torch.tensor(float(ds.step_size), dtype=torch.float32)
        save_tensors(tmp / "labels.safetensors", labels)
        if ds.zca is not None:
            save_tensors(tmp / "zca.safetensors", ds.zca)
        if export is not None:
            export_image_folder(ds, tmp / "images", export)
        (tmp / GRID_FILE).write_bytes(grid)
        files = {name: sha256_file(tmp / name) for name in TENSOR_FILES if (tmp / name).is_file()}
        write_json(tmp / "meta.json", {
            "format": FORMAT,
            "version": VERSION,
            "data_spec": ds.spec.to_dict(),
            "num_images": len(ds),
            "ipc": ds.ipc,
            "image_shape": list(ds.images.shape[1:]),
            "image_storage": image_storage,
            "method": ds.method,
            "has_label_logits": ds.label_logits is not None,
            "step_size": ds.step_size,
            "zca": "zca.safetensors" if ds.zca is not None else None,
            "config": ds.config,
            "teacher": ds.teacher,
            "extra": ds.extra,
            "files": files,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
    return path


def load_distilled(path: str | os.PathLike, verify_checksums: bool = True, lazy: bool = False,
                   folder_spec: DataSpec | None = None) -> DistilledSet:
    """Read and validate a DistilledSet directory; any problem is one clear DDKitError.

    A set replaced by another process while it is read (:func:`save_distilled` swaps directories) is read again,
    so the result is the old set or the new one, whole.

    Args:
        verify_checksums: compare every tensor file with its sha256 in meta.json (reads each file once).
        lazy: keep the images on disk and read them per sample (:class:`ddkit.formats.images.LazyImages`).
        folder_spec: the dataset's spec; with it, a directory without meta.json that holds one image sub-folder per
            class is read as a set too (:func:`load_image_folder`).
    """
    path = Path(path)
    if folder_spec is not None and path.is_dir() and not (path / "meta.json").exists() \
            and any(p.is_dir() for p in path.iterdir()):
        return load_image_folder(path, folder_spec)
    return read_consistently(path, lambda p: _read_distilled(p, verify_checksums, lazy), "distilled")


def _read_distilled(path: Path, verify_checksums: bool, lazy: bool) -> DistilledSet:
    if not path.is_dir():
        raise DDKitError(f"distilled: directory not found, got {str(path)!r}")
    meta = read_json(path / "meta.json", "distilled.meta")
    if meta.get("format") != FORMAT:
        raise DDKitError(f"distilled.meta.format: must be {FORMAT!r}, got {meta.get('format')!r}")
    if meta.get("version") != VERSION:
        raise DDKitError(f"distilled.meta.version: unsupported version, got {meta.get('version')!r}")
    for key in ("data_spec", "ipc", "method", "files"):
        if key not in meta:
            raise DDKitError(f"distilled.meta: missing field {key!r}, got fields {sorted(meta)}")
    spec = DataSpec.from_dict(meta["data_spec"], "distilled.meta.data_spec")
    ipc = check_int(meta["ipc"], "distilled.meta.ipc", 1)
    if "num_images" in meta and meta["num_images"] != ipc * spec.num_classes:
        raise DDKitError(f"distilled.meta.ipc: must be num_images / num_classes = {meta['num_images']!r} / "
                         f"{spec.num_classes}, got {ipc!r}")
    if not isinstance(meta["method"], str):
        raise DDKitError(f"distilled.meta.method: must be a name, got {meta['method']!r}")
    for key, kinds in (("config", (dict,)), ("teacher", (dict, type(None))), ("extra", (dict,))):
        if not isinstance(meta.get(key, {}), kinds):
            raise DDKitError(f"distilled.meta.{key}: must be a mapping, got {meta[key]!r}"[:300])
    if meta.get("zca") not in (None, "zca.safetensors"):
        raise DDKitError(f"distilled.meta.zca: must be 'zca.safetensors' or null, got {meta.get('zca')!r}")
    files = _check_files(meta["files"], with_zca=meta.get("zca") is not None)
    for name, digest in files.items():
        if not (path / name).is_file():
            raise DDKitError(f"distilled.{name}: file not found, got {str(path / name)!r}")
        if verify_checksums and sha256_file(path / name) != digest:
            raise DDKitError(f"distilled.{name}: sha256 checksum mismatch (file changed or corrupt), got {str(path / name)!r}")
    storage = meta.get("image_storage", "float32")
    check_storage(storage)
    if lazy:
        images = {"images": LazyImages(path / "images.safetensors", "images", spec)}
        found = images["images"].storage
    else:
        images = load_tensors(path / "images.safetensors", "distilled.images")
        found = storage_of(images["images"]) if "images" in images else storage
    labels = load_tensors(path / "labels.safetensors", "distilled.labels")
    if "images" not in images or "labels" not in labels:
        raise DDKitError(f"distilled: tensor files lack 'images'/'labels', got {sorted(images)} and {sorted(labels)}")
    if found != storage:
        raise DDKitError(f"distilled.images: meta.json says image_storage {storage}, the file holds {found}, "
                         f"got {str(path / 'images.safetensors')!r}")
    if not lazy:
        images["images"] = decode_images(images["images"], spec)
    zca = load_tensors(path / "zca.safetensors", "distilled.zca") if meta.get("zca") else None
    step = labels.get("step_size")
    ds = DistilledSet(
        images=images["images"],
        labels=labels["labels"],
        spec=spec,
        ipc=ipc,
        method=meta["method"],
        label_logits=labels.get("label_logits"),
        step_size=None if step is None else float(step),
        zca=zca,
        config=meta.get("config", {}),
        teacher=meta.get("teacher"),
        extra=meta.get("extra", {}),
    )
    ds.validate(where=f"distilled[{path.name}]")
    return ds


def _check_files(files: Any, with_zca: bool) -> dict[str, str]:
    """meta.json's ``files``: the sha256 of every tensor file of the set, by plain file name.

    All of them must be listed (an empty map would skip every checksum), and nothing else: a name with a path in
    it could make a reader check or read a file outside the set's directory.
    """
    if not isinstance(files, dict):
        raise DDKitError(f"distilled.meta.files: must be a mapping of file names to sha256 digests, got {files!r}"[:300])
    for name, digest in files.items():
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
            raise DDKitError(f"distilled.meta.files: names must be plain file names inside the set's directory, "
                             f"got {name!r}")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise DDKitError(f"distilled.meta.files[{name!r}]: must be a sha256 hex digest, got {digest!r}"[:300])
    want = set(TENSOR_FILES) if with_zca else set(TENSOR_FILES) - {"zca.safetensors"}
    if set(files) != want:
        raise DDKitError(f"distilled.meta.files: must list exactly {sorted(want)}, got {sorted(files)}")
    return files


def load_image_folder(path: str | os.PathLike, spec: DataSpec) -> DistilledSet:
    """An image folder (one sub-folder per class, sorted names = class order, e.g. recover's SRe2L export) as a
    DistilledSet whose images are read lazily; every class must hold the same number of images (the IPC)."""
    images = FolderImages(path, spec)
    counts = torch.bincount(images.labels, minlength=spec.num_classes)
    ipc = int(counts[0]) if len(counts) else 0
    ds = DistilledSet(images=images, labels=images.labels, spec=spec, ipc=ipc, method="image_folder",
                      extra={"source": str(Path(path).resolve())})
    ds.validate(where=f"distilled[{Path(path).name}]")
    return ds


def to_pixels(images: torch.Tensor, spec: DataSpec, zca: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Map training-space images back to [0, 1] pixels (undo ZCA or mean/std normalization), clamped."""
    x = images.detach().float().cpu()
    if zca is not None:
        from ddkit.ops.zca import ZCA, invert_zca

        x = invert_zca(x, ZCA.from_state_dict(zca))
    else:
        mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
        std = torch.tensor(spec.std).view(1, -1, 1, 1)
        x = x * std + mean
    return x.clamp(0, 1)


def export_image_folder(ds: DistilledSet, root: Path, ext: str = "png", rounding: str = "truncate") -> None:
    """Write ``root/new{c:03d}/class{c:03d}_id{i:03d}.{ext}`` (the SRe2L layout, readable by ImageFolder).

    ``rounding="truncate"`` reproduces the reference's ``(x * 255).astype(uint8)``; ``"round"`` rounds.
    """
    from PIL import Image

    pixels = to_pixels(ds.images.load() if is_lazy(ds.images) else ds.images, ds.spec, ds.zca) * 255
    pixels = pixels.floor() if rounding == "truncate" else pixels.round()
    pixels = pixels.to(torch.uint8)
    seen: dict[int, int] = {}
    for img, c in zip(pixels, ds.labels.tolist()):
        i = seen.get(c, 0)
        seen[c] = i + 1
        folder = root / f"new{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        arr = img.permute(1, 2, 0).numpy()
        mode = "L" if arr.shape[2] == 1 else "RGB"
        Image.fromarray(arr[:, :, 0] if mode == "L" else arr, mode=mode).save(folder / f"class{c:03d}_id{i:03d}.{ext}")
