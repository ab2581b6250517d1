"""Writes that survive a power cut: the file's bytes on disk before its name points at them.

A PC switched off at the end of a shift can otherwise keep a file renamed into place
with none of its data (zero length), or an index that names files whose renames were
never written. Before an index names files, the cache syncs them (`sync_file`, in one
batch at the commit: the kernel has written most of them back by then) and their
directory (`sync_directory`), then writes the index (`write_file`, synced) and renames it.

Portability: `os.fsync` on a file works everywhere (FlushFileBuffers on Windows). A
directory cannot be opened for syncing on Windows (NTFS journals the rename itself), so
`sync_directory` does nothing there. On macOS `fsync` leaves the drive's own cache
unflushed (F_FULLFSYNC would); the ordering it gives is what the cache relies on.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["sync_directory", "sync_file", "write_file"]


def write_file(path: Path, data: bytes, *, sync: bool) -> None:
    """Write `data` to a new file at `path`; with `sync`, on disk before returning."""
    with path.open("wb") as f:
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())


def sync_file(path: Path) -> None:
    """Put the bytes of a file written earlier on disk (FileNotFoundError: it is gone).
    Windows flushes only a handle open for writing (FlushFileBuffers)."""
    flags = os.O_RDWR | getattr(os, "O_BINARY", 0) if sys.platform == "win32" else os.O_RDONLY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_directory(path: Path) -> None:
    """Make the renames made in `path` so far durable (POSIX; nothing on Windows)."""
    if sys.platform == "win32":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
