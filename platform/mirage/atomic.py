"""Files and folders that appear whole or not at all.

A file is written to a unique temporary name in its own folder, flushed to disk and renamed over
the target (``os.replace`` is atomic on one filesystem): a reader sees the old content or the new,
never a part. A folder is built under a unique temporary name beside its target and swapped in:
the old folder is renamed to a unique trash name, the new one renamed into place, the trash
removed. If the swap fails the old folder is put back; if building fails the old one is untouched.
Unique names (``tempfile``) let two writers run at once without sharing a scratch folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Replace ``path`` with ``text`` (UTF-8) atomically; see :func:`write_bytes`."""
    return write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Replace ``path`` with ``data`` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder to fill; on success it replaces ``target`` (which may not exist yet).

    The folder is unique (``.<name>.tmp-XXXX`` beside ``target``); on an exception it is removed
    and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_in(new: Path, target: Path) -> None:
    """Rename folder ``new`` to ``target``; an existing ``target`` goes to a unique trash name first.

    If ``new`` cannot be moved into place, the old ``target`` is moved back before the error
    propagates.
    """
    trash = None
    if target.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent)) / target.name
        os.replace(target, trash)
    try:
        os.replace(new, target)
    except BaseException:
        if trash is not None:
            os.replace(trash, target)
            shutil.rmtree(trash.parent, ignore_errors=True)
        raise
    if trash is not None:
        shutil.rmtree(trash.parent, ignore_errors=True)
    _fsync_dir(target.parent)
