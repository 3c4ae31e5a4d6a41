"""Crash-safe file writes: write to a temporary file, fsync, rename, fsync the directory."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .faults import fault_point


def fsync_dir(path: str | Path) -> None:
    fd = os.open(str(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Produce ``path`` atomically: ``write(tmp_path)`` fills a temporary sibling first.

    A crash at any moment leaves either the previous file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        fault_point("atomic_write.before_rename")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def fsync_tree(path: str | Path) -> None:
    """fsync every file below ``path`` and every directory, deepest first (before renaming the tree into place)."""
    root = Path(path)
    for current, _dirs, names in os.walk(root, topdown=False):
        for name in names:
            with open(Path(current) / name, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(current)
