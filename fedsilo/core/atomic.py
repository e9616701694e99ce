"""One atomic-write helper: readers see the old file or the whole new one, also after a kill."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_write_with", "fsync_dir"]


def atomic_write(path: Path, data_chunks) -> None:
    """Writes ``data_chunks`` (bytes, or an iterable of byte chunks) to ``path`` via a temporary
    file, fsync and rename."""
    if isinstance(data_chunks, (bytes, bytearray, memoryview)):
        data_chunks = [data_chunks]

    def write(f: BinaryIO) -> None:
        for chunk in data_chunks:
            f.write(chunk)

    atomic_write_with(path, write)


def atomic_write_with(path: Path, write: Callable[[BinaryIO], None], *, mode: int = 0o666) -> None:
    """Lets ``write`` fill a temporary file (created with ``mode``, less the umask), then
    fsyncs it, renames it over ``path`` and fsyncs the folder: readers see the old file or
    the whole new one, also after a kill or power loss."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Makes a rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
