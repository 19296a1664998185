"""Atomic writes, checksums and guarded safetensors I/O shared by every artifact."""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ddkit.errors import DDKitError

T = TypeVar("T")


def _check_writable_parent(path: Path, field: str) -> list[Path]:
    """:func:`check_writable`, then create ``path``'s parent; returns the directories it created, innermost first."""
    check_writable(path, field)
    parent = path.parent
    made = [p for p in (parent, *parent.parents) if not p.exists()]
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DDKitError(f"{field}: cannot create directory {str(parent)!r} ({e.strerror}), got {str(path)!r}") from None
    return made


def _remove_empty(dirs: list[Path]) -> None:
    """Remove the directories a failed write created, innermost first, as long as they are empty."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            return


def check_writable(path: str | os.PathLike, field: str) -> None:
    """Raise unless ``path`` could be written later, creating nothing: its nearest existing ancestor must be a
    writable directory (so a bad output path stops a run at start, not after hours of work)."""
    path = Path(path).absolute()
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise DDKitError(f"{field}: {str(ancestor)!r} is not a directory, got {str(path)!r}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise DDKitError(f"{field}: directory {str(ancestor)!r} is not writable, got {str(path)!r}")


def meta_format(path: Path) -> str | None:
    """The ``format`` field of ``path/meta.json`` (a ddkit directory artifact), or None."""
    try:
        meta = json.loads((Path(path) / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta.get("format") if isinstance(meta, dict) else None


def _check_replaceable(path: Path, field: str, fmt: str | None) -> None:
    """Only an empty directory or a ddkit artifact of format ``fmt`` may be replaced as a whole."""
    if not path.exists() and not path.is_symlink():
        return
    is_dir = path.is_dir() and not path.is_symlink()
    if is_dir and (not any(path.iterdir()) or (fmt is not None and meta_format(path) == fmt)):
        return
    raise DDKitError(f"{field}: exists and is not {'a ' + fmt if fmt else 'an empty directory'}; ddkit will not "
                     f"replace it, got {str(path)!r}")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, field: str = "output", fmt: str | None = None) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; on success it replaces ``path``.

    Only an empty directory or a ddkit artifact whose ``meta.json`` says ``format: fmt`` is replaced; anything
    else at ``path`` is an error, checked before and again after the work (stages claim their output at start,
    see :mod:`ddkit.formats.output`). The old directory is moved aside before the new one is moved in, so a reader
    holding it sees the old artifact whole (:func:`read_consistently`). A crash before the end leaves ``path`` as it
    was (the temporary directory is removed, or at worst left as a hidden ``.<name>.tmp-*`` sibling that no loader
    reads).
    """
    path = Path(path).absolute()
    made = _check_writable_parent(path, field)
    _check_replaceable(path, field, fmt)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        with _full_disk_names(path):
            yield tmp
            _fsync_tree(tmp)
            _check_replaceable(path, field, fmt)
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
                os.replace(path, old / path.name)
                try:
                    os.replace(tmp, path)
                except BaseException:
                    os.replace(old / path.name, path)
                    raise
                finally:
                    shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(made)
        raise


def read_consistently(path: str | os.PathLike, read: Callable[[Path], T], field: str, attempts: int = 20) -> T:
    """``read(path)`` for a directory artifact that another process may replace meanwhile (:func:`atomic_dir`).

    A read that overlaps a replacement (the directory's inode changed, or it is briefly absent while a
    ``.<name>.old-*`` sibling exists) is done again, so the result comes from one version, old or new, never a mix.

    Raises:
        DDKitError: from ``read``; an OSError of ``read`` as one line naming ``field``.
    """
    path = Path(path)

    def identity() -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def replacing() -> bool:
        return any(path.parent.glob(f".{glob.escape(path.name)}.old-*"))

    for attempt in range(attempts):
        before = identity()
        try:
            result = read(path)
        except (DDKitError, OSError) as e:
            if attempt + 1 < attempts and (identity() != before or (before is None and replacing())):
                time.sleep(0.01 * (attempt + 1))
                continue
            if isinstance(e, DDKitError):
                raise
            raise DDKitError(f"{field}: cannot be read ({e.strerror or e}), got {str(path)!r}") from None
        if identity() == before:
            return result
    raise DDKitError(f"{field}: replaced while being read {attempts} times in a row, got {str(path)!r}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, field: str = "output") -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; on success it is renamed over ``path``. On failure nothing is
    left: neither the temporary file nor the directories made for it."""
    path = Path(path)
    made = _check_writable_parent(path, field)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        with _full_disk_names(path):
            yield tmp
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        _remove_empty(made)
        raise


@contextlib.contextmanager
def _full_disk_names(path: Path) -> Iterator[None]:
    """A full disk while writing ``path`` is reported as OSError(ENOSPC) naming ``path``, not a temporary file."""
    try:
        yield
    except OSError as e:
        if e.errno == errno.ENOSPC and e.filename != str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        raise


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def write_json(path: str | os.PathLike, obj: dict) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike, field: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DDKitError(f"{field}: file not found, got {str(path)!r}")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DDKitError(f"{field}: not valid JSON ({e.msg if hasattr(e, 'msg') else e}), got {str(path)!r}") from None
    if not isinstance(obj, dict):
        raise DDKitError(f"{field}: expected a JSON object, got {str(path)!r}")
    return obj


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save contiguous CPU copies of ``tensors`` to a safetensors file (the caller makes it atomic).

    Raises:
        OSError: ENOSPC naming ``path`` when the disk is full (safetensors reports it in its own error type).
    """
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    except SafetensorError as e:
        if "os error 28" in str(e) or "No space left" in str(e):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise


def load_tensors(path: str | os.PathLike, field: str) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing, truncated or corrupt file is one clear DDKitError."""
    path = Path(path)
    if not path.is_file():
        raise DDKitError(f"{field}: file not found, got {str(path)!r}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise DDKitError(f"{field}: not a valid safetensors file ({str(e).splitlines()[0]}), got {str(path)!r}") from None


def load_weights_only(path: str | os.PathLike, field: str, mmap: bool = False) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``, the only way ddkit unpickles anything.

    A file that needs other globals than tensors and plain containers (a crafted payload: refused before any of
    it runs) or is not a torch file at all is one DDKitError naming ``field`` and the path.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001  (UnpicklingError for forbidden globals, others for corrupt files)
        raise DDKitError(f"{field}: cannot be read with torch.load(weights_only=True) ({load_error_reason(e)}), "
                         f"got {str(path)!r}") from None


def load_error_reason(e: BaseException) -> str:
    """One short line from a torch.load error (the line naming the refused global when there is one)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(e).splitlines()]
    lines = [ln for ln in lines if ln]
    at = next((i for i, ln in enumerate(lines) if "WeightsUnpickler error:" in ln or "GLOBAL" in ln), None)
    pick = lines[0] if (at is None and lines) else ""
    if at is not None:
        pick = lines[at].split("WeightsUnpickler error:")[-1].strip() or (lines[at + 1] if at + 1 < len(lines) else "")
    pick = pick.split(". Please use")[0]
    return f"{type(e).__name__}: {pick[:160]}" if pick else type(e).__name__


def check_finite(t: torch.Tensor, field: str) -> None:
    """Raise if ``t`` holds NaN or inf."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise DDKitError(f"{field}: contains {bad} non-finite values (NaN or inf), got tensor of shape {tuple(t.shape)}")
