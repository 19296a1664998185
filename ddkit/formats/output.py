"""Where a run may write: an output path is claimed before any work starts and locked while the run lasts.

ddkit replaces only what it wrote itself. A stage's output path must be absent, an empty directory, or an artifact
of the kind the stage writes; replacing such an artifact needs ``overwrite: true`` unless the run resumes the one
that wrote it (``--ckpt_path``). Anything else (a folder of the user's files, another kind of artifact, the working
directory) is refused with one line before the first step. While a run lasts, an advisory lock
(``fcntl.flock`` on ``.<name>.lock`` beside the output) refuses a second run on the same output at once.

Example:
    >>> claim_output("out/recover", "output", "distilled", overwrite=False, resuming=False)
    >>> with OutputLock("out/recover", "output"):
    ...     ...  # the run
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ddkit.errors import DDKitError
from ddkit.formats.common import check_writable, meta_format


def _teacher_header(path: Path) -> bool:
    from ddkit.formats.teacher import read_teacher_meta

    try:
        read_teacher_meta(path)
    except DDKitError:
        return False
    return True


def _entries(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()}


@dataclass(frozen=True)
class OutputKind:
    """What a stage writes, and how to recognise an earlier artifact of the same kind at its output path."""

    what: str
    is_file: bool
    holds: Callable[[Path], bool]


KINDS = {
    "distilled": OutputKind("DistilledSet", False, lambda p: meta_format(p) == "ddkit.distilled"),
    "matching": OutputKind("trajectory-matching run (last/, best/, snapshots/, checkpoints/)", False,
                           lambda p: _entries(p) <= {"last", "best", "snapshots", "checkpoints"}),
    "buffer": OutputKind("ExpertBuffer", False, lambda p: meta_format(p) == "ddkit.buffer"),
    "report": OutputKind("evaluation report", False, lambda p: _entries(p) <= {"report.json", "report.md", "tb"}),
    "teacher": OutputKind("teacher checkpoint", True, _teacher_header),
}


def claim_output(path: str | os.PathLike, field: str, kind: str, overwrite: bool, resuming: bool,
                 writes: Iterable[str] | None = None) -> None:
    """Refuse, before any work, an output path this run must not write; create nothing.

    Args:
        path: the file or directory the stage will write.
        field: the option that names it (``output``, ``buffer``, ``export_teacher``), for the message.
        kind: a key of :data:`KINDS`.
        overwrite: the user allows replacing an earlier artifact of the same kind.
        resuming: the run resumes from a checkpoint (its own earlier output may be there).
        writes: for a directory the run adds files to (an ExpertBuffer): the names it writes; an earlier artifact
            then needs ``overwrite`` only if one of them is there already.

    Raises:
        DDKitError: the path is the working directory or one of its parents, exists as the wrong type, holds
            something that is not an artifact of ``kind``, or holds one and neither ``overwrite`` nor ``resuming``.
    """
    k = KINDS[kind]
    path = Path(path).absolute()
    cwd = Path.cwd().absolute()
    if not k.is_file and (path == cwd or path in cwd.parents):
        raise DDKitError(f"{field}: must not be the working directory or one of its parents (ddkit replaces an "
                         f"output directory as a whole), got {str(path)!r}")
    if not path.exists() and not path.is_symlink():
        check_writable(path, field)
        return
    if k.is_file != path.is_file() or path.is_symlink():
        want = "a file" if k.is_file else "a directory"
        raise DDKitError(f"{field}: must be {want} ddkit writes (not a link or another type), got {str(path)!r}")
    if not k.is_file and not any(path.iterdir()):
        return
    if not k.holds(path):
        raise DDKitError(f"{field}: already holds files that are not a ddkit {k.what}; ddkit will not replace them "
                         f"(choose another path), got {str(path)!r}")
    if writes is not None and not any((path / name).exists() for name in writes):
        return
    if not (overwrite or resuming):
        raise DDKitError(f"{field}: already holds a {k.what} from an earlier run; set overwrite: true to replace it "
                         f"or choose another path, got {str(path)!r}")
    check_writable(path, field)


def lock_path(path: str | os.PathLike) -> Path:
    """``.<name>.lock`` beside ``path``: outside it, so replacing the output as a whole keeps the lock."""
    path = Path(path).absolute()
    return path.with_name(f".{path.name}.lock")


class OutputLock:
    """An exclusive advisory lock on an output path for the length of a run (one process takes it: rank 0).

    The lock file is created beside the output and removed on release, together with the output directory and the
    parents made for the lock when the run left them empty (a failed run leaves nothing behind). A second run that asks for the same
    output while the first holds it gets one line at once instead of waiting or mixing its files in.

    Raises:
        DDKitError: from :meth:`acquire`, when another process holds the lock.
    """

    def __init__(self, path: str | os.PathLike, field: str) -> None:
        self.path = Path(path).absolute()
        self.field = field
        self._fd: int | None = None
        self._made: list[Path] = []  # the output and the lock's parents, if this run creates them

    def acquire(self) -> OutputLock:
        check_writable(self.path, self.field)
        file = lock_path(self.path)
        self._made = [p for p in (self.path, file.parent, *file.parent.parents) if not p.exists()]
        file.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise DDKitError(f"{self.field}: in use by another ddkit run (lock {str(file)!r} is held); wait for "
                                 f"it to finish or choose another path, got {str(self.path)!r}") from None
            # The holder before us may have removed the file between our open and our lock: lock the file that is
            # there now, or try again.
            try:
                same = os.stat(file).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return self
            os.close(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            lock_path(self.path).unlink(missing_ok=True)
            for d in self._made:  # innermost first
                if d.is_dir() and not any(d.iterdir()):
                    d.rmdir()
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OutputLock:  # noqa: PYI034
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
