"""Atomic folder writes: fill a temporary sibling, fsync it, rename it into place.

At every instant one complete version of the folder exists under its name (or none yet), so a
crash, a full disk or a kill mid-write never leaves a half-written checkpoint or export.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

# What a write in progress holds beside its target: the new version (.tmp-NAME-PID) and, for a
# moment between two renames, the old one moved aside (.old-NAME-PID).
_IN_PROGRESS = re.compile(r"\.(tmp|old)-(.+)-\d+")
# A write that fails with less than this left free on its disk failed for want of space,
# whatever the writer called it: torch.save says "unexpected pos 576 vs 534", safetensors
# "I/O error".
NEARLY_FULL_BYTES = 64 << 20


def publish_folder(folder: Path, fill: Callable[[Path], None]) -> Path:
    """`fill(tmp)` writes the files; then they replace `folder` in one rename.

    On any failure the temporary folder is removed and the previous `folder` is left intact;
    the exception propagates.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    old = folder.parent / f".old-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        fill(tmp)
        fsync_tree(tmp)  # the rename must not publish files whose data is still in flight
        # A directory cannot be renamed over a non-empty one: move the old one aside first.
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        fsync(folder.parent)
    except BaseException as exc:
        full = isinstance(exc, Exception) and tmp.exists() and free_bytes(tmp) < NEARLY_FULL_BYTES
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not folder.exists():
            old.rename(folder)
        if full:
            message = f"{os.strerror(errno.ENOSPC)} ({exc})"
            raise OSError(errno.ENOSPC, message, str(folder)) from exc
        raise
    shutil.rmtree(old, ignore_errors=True)
    return folder


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still put on `path`'s filesystem."""
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def clear_interrupted_writes(parent: Path, shown_from: Path | None = None) -> list[str]:
    """Tidy what writers killed mid-write (kill -9, power loss) left in `parent`; returns one
    note per entry, its path shown relative to `shown_from` (default `parent`).

    A `.tmp-NAME-PID` is deleted: its write never finished. An `.old-NAME-PID` goes back to
    NAME when NAME is missing (the kill fell between publish_folder's two renames, and the old
    version is whole), else it is deleted. Call it only where no writer is alive, i.e. while
    holding the lock of the folder's owner: a live writer's temporary folder would go too.
    """
    parent = Path(parent)
    if not parent.is_dir():
        return []
    shown_from = Path(shown_from) if shown_from is not None else parent
    notes = []
    for path in sorted(parent.iterdir()):
        match = _IN_PROGRESS.fullmatch(path.name)
        if match is None:
            continue
        shown = path.relative_to(shown_from).as_posix() + "/" * path.is_dir()
        target = parent / match[2]
        if match[1] == "old" and path.is_dir() and not target.exists():
            path.rename(target)
            notes.append(f"restored {target.relative_to(shown_from).as_posix()}/ from {shown}")
        elif path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            notes.append(f"removed {shown}")
        else:
            path.unlink(missing_ok=True)
            notes.append(f"removed {shown}")
    return notes


def fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):  # files before their folders
        fsync(path)
    fsync(folder)


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> Path:
    """Write a text file through a fsynced temporary sibling and one rename."""
    return atomic_write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_file(path: Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` fills a temporary sibling of `path` (its name does not end in path's
    suffix: name the format to writers that guess it), which is fsynced and renamed into place:
    a kill mid-write leaves the old file or none, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    try:
        write(tmp)
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(path.parent)
    return path
