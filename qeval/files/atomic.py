"""Writing a file so that nothing half-written is ever read and nothing written is lost.

Every write goes to a temporary beside its file (``.<name>.<random>.tmp``), is synced, and is
renamed onto the file. A write that fails, a full disk (ENOSPC, EDQUOT) among others, removes its
temporary and leaves the old file as it was; :func:`write_files` writes every temporary of a group
before it renames any. A killed writer's temporary is found by :func:`temporaries`. What stands in
the way of a write (a directory where a file goes, a file where a directory goes) is moved aside
to a name beside it, never deleted.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
import time
from contextlib import contextmanager, suppress
from pathlib import Path

from qeval.files.checked import kind

log = logging.getLogger(__name__)
FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(OSError):
    """No space (ENOSPC) or quota (EDQUOT) left while writing ``filename``; the file it was to
    replace is as it was. ``note`` says what that means for the run that wrote it."""
    note = ""

    def __str__(self) -> str:
        return f"{self.strerror} writing {self.filename}{self.note}"


def disk_full(e: BaseException | None) -> OSError | None:
    """The full-disk error ``e`` is or was raised from (torch.save reports one as a RuntimeError
    whose context is the OSError); None for any other error."""
    for _ in range(8):
        if e is None or (isinstance(e, OSError) and e.errno in FULL):
            return e
        e = e.__cause__ or e.__context__
    return None


def move_aside(path: Path) -> None:
    """Rename what stands where qeval puts a file or directory of its own to a name beside it."""
    aside = path.with_name(f"{path.name}.moved-aside-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    try:
        what = kind(path.lstat().st_mode)
        os.rename(path, aside)
    except FileNotFoundError:
        return   # another process moved it first
    log.info(f"qeval: {path} was {what} in the way; moved aside to {aside.name}")


def make_directory(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:   # a file (or a FIFO) where the directory belongs
        move_aside(path)
        path.mkdir(parents=True, exist_ok=True)


def _temporary(path: Path) -> tuple[int, str]:
    make_directory(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o644)  # mkstemp makes 0600; a shared results directory must stay readable
    return fd, tmp


def _put(tmp: str, path: Path) -> None:
    if path.is_dir() and not path.is_symlink():   # os.replace cannot replace a directory
        move_aside(path)
    os.replace(tmp, path)


def _failed(e: BaseException, made: list[str], path: Path) -> BaseException | None:
    """Remove a failed write's temporaries; a :class:`DiskFull` naming ``path`` to raise instead
    of ``e`` when the disk is full, else None (raise ``e`` itself)."""
    for tmp in made:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
    full = disk_full(e)
    if full is None or isinstance(e, DiskFull):
        return None
    return DiskFull(full.errno, full.strerror or os.strerror(full.errno), str(path))


@contextmanager
def replacing(path: Path, binary: bool = False):
    """A file to write ``path``'s new contents into: a temporary in the same directory, synced and
    renamed onto ``path`` when the block ends, removed if it raises."""
    made: list[str] = []
    try:
        fd, tmp = _temporary(path)
        made.append(tmp)
        with os.fdopen(fd, "wb" if binary else "w") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _put(tmp, path)
    except BaseException as e:
        if (instead := _failed(e, made, path)) is None:
            raise
        raise instead from e


def write_files(files: list[tuple[Path, str]]) -> None:
    """Each text to a synced temporary beside its file, then every rename in order: a write that
    fails leaves every old file as it was."""
    made: list[str] = []
    path = files[0][0]
    try:
        for path, text in files:
            fd, tmp = _temporary(path)
            made.append(tmp)
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        for (path, _), tmp in zip(files, made):
            _put(tmp, path)
    except BaseException as e:
        if (instead := _failed(e, made, path)) is None:
            raise
        raise instead from e


def write_atomic(path: Path, text: str) -> None:
    write_files([(path, text)])


def temporaries(directory: Path) -> list[Path]:
    """The temporaries a writer killed between writing and renaming leaves in ``directory`` (only
    a process that owns the directory may delete them)."""
    if not directory.is_dir():
        return []
    return [p for p in sorted(directory.glob(".*.tmp")) if p.is_symlink() or not p.is_dir()]
