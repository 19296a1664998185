"""How a DistilledSet's images are stored, and lazy readers that fetch only the images a batch needs.

Storage (chosen at save time, recorded in the set's ``meta.json`` as ``image_storage``):

- ``float32``: the images exactly as optimized, in the training input space (the default; 4 B per value).
- ``float16``: the same values rounded to half precision (2 B per value; relative error <= 2^-11).
- ``uint8``: [0, 255] pixels, ``round(255 * clamp(x * std + mean, 0, 1))`` (1 B per value): what the SRe2L image
  folder holds (with rounding instead of truncation); reading normalizes ``(p / 255 - mean) / std`` again. Values
  outside the pixel range are clamped, so it is lossy for images that leave it. Not for ZCA-whitened sets.

Every reader returns float32 images in the training input space, whatever the storage.

:class:`LazyImages` reads samples of one safetensors tensor with ``os.pread`` at their byte offsets: nothing is
loaded up front, and nothing is memory-mapped either (a mapped file counts towards a process' resident memory for
every page it has touched; the page cache ``pread`` reads through is the kernel's, shared by every DataLoader
worker and DDP rank of a node). :class:`FolderImages` reads an image folder (ImageFolder layout, e.g. recover's SRe2L
export ``new{c:03d}/class{c:03d}_id{i:03d}.png``) one file per sample.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from ddkit.datamodules.spec import DataSpec
from ddkit.errors import DDKitError

STORAGES = ("float32", "float16", "uint8")
_SAFETENSORS_DTYPES = {"F32": ("float32", torch.float32, 4), "F16": ("float16", torch.float16, 2),
                       "U8": ("uint8", torch.uint8, 1)}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def check_storage(storage: str) -> None:
    if storage not in STORAGES:
        raise DDKitError(f"image_storage: must be one of {', '.join(STORAGES)}, got {storage!r}")


def _mean_std(spec: DataSpec, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, c, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, c, 1, 1)
    return mean, std


def encode_images(images: torch.Tensor, storage: str, spec: DataSpec) -> torch.Tensor:
    """Float32 training-space images ``[N, C, H, W]`` as stored: float32, float16 or uint8 pixels."""
    check_storage(storage)
    x = images.detach().cpu().float()
    if storage == "float32":
        return x
    if storage == "float16":
        half = x.half()
        if not bool(torch.isfinite(half).all()):
            raise DDKitError(f"image_storage: float16 overflows (|x| > 65504) on these images, got {storage!r}")
        return half
    if spec.zca:
        raise DDKitError(f"image_storage: uint8 pixels need mean/std-normalized images (a ZCA-whitened set's values "
                         f"are not pixels), got {storage!r}")
    mean, std = _mean_std(spec, x.shape[1])
    return ((x * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)


def decode_images(stored: torch.Tensor, spec: DataSpec) -> torch.Tensor:
    """Stored images (float32, float16 or uint8 pixels) as float32 training-space images."""
    if stored.dtype == torch.uint8:
        mean, std = _mean_std(spec, stored.shape[1])
        return (stored.float() / 255 - mean) / std
    return stored.float()


def storage_of(t: torch.Tensor) -> str:
    """The storage name of a stored image tensor's dtype."""
    names = {torch.float32: "float32", torch.float16: "float16", torch.uint8: "uint8"}
    if t.dtype not in names:
        raise DDKitError(f"images: dtype must be float32, float16 or uint8, got {t.dtype}")
    return names[t.dtype]


def _indices(index, n: int) -> list[int]:
    """An int, slice, list or 1-D integer tensor as a list of positions in [0, n)."""
    if isinstance(index, slice):
        return list(range(n))[index]
    if isinstance(index, torch.Tensor):
        index = index.reshape(-1).tolist()
    elif isinstance(index, int):
        index = [index]
    out = [int(i) + n if int(i) < 0 else int(i) for i in index]
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise IndexError(f"image index {bad[0]} out of range for {n} images")
    return out


class _Images:
    """What the lazy readers share: a float32 ``[N, C, H, W]`` tensor's interface for reading (``shape``, ``len``,
    ``dim``, ``numel``, ``dtype``, indexing with an int, slice, list or integer tensor)."""

    storage: str
    shape: torch.Size

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # what indexing returns

    def dim(self) -> int:
        return 4

    def numel(self) -> int:
        return self.shape.numel()

    def read(self, positions: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, index) -> torch.Tensor:
        batch = self.read(_indices(index, len(self)))
        return batch[0] if isinstance(index, int) else batch

    def chunks(self, size: int = 256) -> Iterator[torch.Tensor]:
        """The images in order, ``size`` at a time."""
        for lo in range(0, len(self), size):
            yield self.read(list(range(lo, min(lo + size, len(self)))))

    def load(self) -> torch.Tensor:
        """Every image, in memory (for small sets only)."""
        return torch.cat(list(self.chunks()))


class LazyImages(_Images):
    """The images of one tensor of a safetensors file, read per sample (see the module docstring).

    Args:
        path: the safetensors file.
        key: the tensor's name in it (``images``).
        spec: the data spec (normalization of uint8 pixels, expected shape).
        field: the name errors use.
    """

    def __init__(self, path: str | os.PathLike, key: str, spec: DataSpec, field: str = "distilled.images") -> None:
        self.path, self.key, self.spec = Path(path), key, spec
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > 100_000_000:
                    raise ValueError(f"header length {n}")
                header = json.loads(f.read(n))
            entry = header[key]
            self.storage, self._dtype, itemsize = _SAFETENSORS_DTYPES[entry["dtype"]]
            begin, end = entry["data_offsets"]
            shape = torch.Size(entry["shape"])
        except FileNotFoundError:
            raise DDKitError(f"{field}: file not found, got {str(self.path)!r}") from None
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
            raise DDKitError(f"{field}: not a safetensors file with a float32/float16/uint8 tensor {key!r} "
                             f"({type(e).__name__}: {e}), got {str(self.path)!r}") from None
        want = (spec.in_chans, spec.image_size, spec.image_size)
        if len(shape) != 4 or tuple(shape[1:]) != want:
            raise DDKitError(f"{field}: shape must be [N, {', '.join(map(str, want))}], got {list(shape)}")
        self.shape = shape
        self._sample = shape[1:].numel() * itemsize
        self._offset = 8 + n + begin
        if end - begin != shape[0] * self._sample or self.path.stat().st_size < self._offset + end - begin:
            raise DDKitError(f"{field}: file shorter than its header says (truncated?), got {str(self.path)!r}")
        # Opened now, so that this process keeps reading the file it checked even if the set is replaced meanwhile;
        # a copy sent to another process (a spawned DataLoader worker) opens the path again.
        self._fd: int | None = os.open(self.path, os.O_RDONLY)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def _read_run(self, first: int, count: int) -> bytes:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        size = count * self._sample
        data = os.pread(self._fd, size, self._offset + first * self._sample)
        if len(data) != size:
            raise DDKitError(f"distilled.images: file shorter than its header says, got {str(self.path)!r}")
        return data

    def read(self, positions: list[int]) -> torch.Tensor:
        """The images at ``positions`` (in that order), decoded to float32: one ``pread`` per run of consecutive
        positions."""
        parts, i = [], 0
        while i < len(positions):
            j = i + 1
            while j < len(positions) and positions[j] == positions[j - 1] + 1:
                j += 1
            parts.append(self._read_run(positions[i], j - i))
            i = j
        raw = bytearray(b"".join(parts))
        stored = torch.frombuffer(raw, dtype=self._dtype) if raw else torch.empty(0, dtype=self._dtype)
        return decode_images(stored.view(len(positions), *self.shape[1:]), self.spec)


class FolderImages(_Images):
    """An image folder in torchvision's ImageFolder layout (one sub-folder per class, sorted names = class order),
    read one file per sample and normalized with ``spec``; every image must be ``spec.image_size`` px square.

    Args:
        root: the folder (e.g. a recover output's ``images/``, or SRe2L's released distilled images).
        spec: the dataset the images belong to.
    """

    def __init__(self, root: str | os.PathLike, spec: DataSpec) -> None:
        self.root, self.spec, self.storage = Path(root), spec, "uint8"
        classes = sorted(p for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []
        if len(classes) != spec.num_classes:
            raise DDKitError(f"distilled: an image folder needs one sub-folder per class ({spec.num_classes}), "
                             f"got {len(classes)} in {str(self.root)!r}")
        self.files: list[str] = []
        labels: list[int] = []
        for c, folder in enumerate(classes):
            names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            self.files += [f"{folder.name}/{n}" for n in names]
            labels += [c] * len(names)
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.shape = torch.Size((len(self.files), spec.in_chans, spec.image_size, spec.image_size))
        if self.files:
            self.read([0])  # the first image's size and mode, checked now rather than in the middle of a run

    def read(self, positions: list[int]) -> torch.Tensor:
        import numpy as np
        from PIL import Image

        s = self.spec
        out = torch.empty(len(positions), s.in_chans, s.image_size, s.image_size, dtype=torch.uint8)
        for k, i in enumerate(positions):
            path = self.root / self.files[i]
            with Image.open(path) as img:
                img = img.convert("L" if s.in_chans == 1 else "RGB")
                if img.size != (s.image_size, s.image_size):
                    raise DDKitError(f"distilled: image must be {s.image_size}x{s.image_size} px, got "
                                     f"{img.size[0]}x{img.size[1]} in {str(path)!r}")
                arr = np.asarray(img, dtype=np.uint8).reshape(s.image_size, s.image_size, s.in_chans)
            out[k] = torch.from_numpy(arr.copy()).permute(2, 0, 1)
        return decode_images(out, s)


def is_lazy(images) -> bool:
    return isinstance(images, _Images)


def write_images_streaming(path: str | os.PathLike, images: _Images, storage: str, spec: DataSpec,
                           chunk: int = 256) -> None:
    """Write a lazy reader's images to a safetensors file (tensor ``images``) in ``storage``, ``chunk`` images at a
    time, so a set larger than memory can be written (or converted) without loading it. The caller makes the write
    atomic."""
    code = {"float32": "F32", "float16": "F16", "uint8": "U8"}[storage]
    itemsize = _SAFETENSORS_DTYPES[code][2]
    nbytes = images.numel() * itemsize
    header = json.dumps({"images": {"dtype": code, "shape": list(images.shape), "data_offsets": [0, nbytes]}},
                        separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    written = 0
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        for batch in images.chunks(chunk):
            data = encode_images(batch, storage, spec).contiguous()
            f.write(data.view(torch.uint8).numpy().tobytes())
            written += data.numel() * itemsize
    if written != nbytes:
        raise DDKitError(f"images: the reader yielded {written} bytes, its shape says {nbytes}, got {list(images.shape)}")
