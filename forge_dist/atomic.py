"""Atomic writes: a reader sees the old checkpoint or the new one, never half of one.

Files are written under a temporary name in the destination's own directory (same filesystem),
fsynced, then renamed into place, and the directory is fsynced so the rename survives a crash.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from typing import Callable, Iterator

from forge_dist.errors import CheckpointError


def stays_inside(rel: str) -> bool:
    """Whether a relative path read from a file (a checkpoint manifest, a dataset's meta.json) stays
    inside the directory it is relative to: not empty, not absolute, no ``..`` out of it. Paths that
    escape are refused, so a crafted file cannot make us read or overwrite files elsewhere."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel):
        return False
    norm = os.path.normpath(rel)
    return norm != ".." and not norm.startswith(".." + os.sep)


def fsync_path(path: str) -> None:
    """fsync a file or a directory (directories: where the platform allows it)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return  # e.g. directories on Windows
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _chmod_default(path: str, is_dir: bool) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give them the usual permissions."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


def write_file_atomic(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` and rename the result onto ``path``."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    os.close(fd)
    try:
        _chmod_default(tmp, is_dir=False)
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(path: str, may_replace: Callable[[str], bool]) -> Iterator[str]:
    """Yield an empty temporary directory; on success it becomes ``path``.

    An existing ``path`` is replaced only if ``may_replace(path)`` says it is ours to replace
    (e.g. an older checkpoint of the same format); anything else is refused, never deleted.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if os.path.exists(path) and not (os.path.isdir(path) and (not os.listdir(path) or may_replace(path))):
        raise CheckpointError(f"{path} exists and is not a checkpoint of this format; refusing to "
                              f"overwrite it (choose a new path or remove it yourself)")
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        _chmod_default(tmp, is_dir=True)
        yield tmp
        for name in os.listdir(tmp):
            fsync_path(os.path.join(tmp, name))
        fsync_path(tmp)
        _swap_in(tmp, path)
        fsync_path(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: str, path: str) -> None:
    if not os.path.exists(path):
        os.rename(tmp, path)
        return
    old = f"{path}.old-{uuid.uuid4().hex[:8]}"
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)
