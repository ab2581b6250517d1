"""Writes that survive a power cut: the file's bytes on disk before its name points at them.

A PC switched off at the end of a shift can otherwise keep a file renamed into place
with none of its data (zero length), or an index that names files whose renames were
never written. Before an index names files, the cache syncs them (`sync_file`, in one
batch at the commit: the kernel has written most of them back by then) and their
directory (`sync_directory`), then writes the index (`write_file`, synced) and renames it.

Portability: every sync goes through `sync_fd`, chosen once by `choose_sync` for the
platform. `os.fsync` on a file works everywhere (FlushFileBuffers on Windows). On macOS
`fsync` only hands the data to the drive, whose own cache a power cut loses:
`fcntl(F_FULLFSYNC)` flushes that too, so it is used where fcntl has it (a file system
that refuses it, a network share, falls back to fsync). Windows has no fcntl module. A
directory cannot be opened for syncing on Windows (NTFS journals the rename itself), so
`sync_directory` does nothing there.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["choose_sync", "sync_directory", "sync_fd", "sync_file", "write_file"]


def _fsync(fd: int) -> None:
    os.fsync(fd)


def choose_sync(platform: str, fcntl_module: object | None) -> Callable[[int], None]:
    """The call that puts an open file's bytes on the medium on `platform`, given its
    fcntl module (None where there is none): F_FULLFSYNC where fcntl has it (macOS; an
    fsync there leaves them in the drive's cache), else fsync."""
    full = getattr(fcntl_module, "F_FULLFSYNC", None) if platform != "win32" else None
    control = getattr(fcntl_module, "fcntl", None)
    if not isinstance(full, int) or control is None:
        return _fsync

    def full_fsync(fd: int) -> None:
        try:
            control(fd, full)
        except OSError:  # a file system that cannot (SMB, FAT): fsync's ordering at least
            os.fsync(fd)

    return full_fsync


def _platform_fcntl() -> object | None:
    if sys.platform == "win32":
        return None
    import fcntl  # POSIX only: Windows has no fcntl module

    return fcntl


#: This platform's sync (choose_sync): what write_file, sync_file and sync_directory call.
sync_fd = choose_sync(sys.platform, _platform_fcntl())


def write_file(path: Path, data: bytes, *, sync: bool) -> None:
    """Write `data` to a new file at `path`; with `sync`, on disk before returning."""
    with path.open("wb") as f:
        f.write(data)
        if sync:
            f.flush()
            sync_fd(f.fileno())


def sync_file(path: Path) -> None:
    """Put the bytes of a file written earlier on disk (FileNotFoundError: it is gone).
    Windows flushes only a handle open for writing (FlushFileBuffers)."""
    flags = os.O_RDWR | getattr(os, "O_BINARY", 0) if sys.platform == "win32" else os.O_RDONLY
    fd = os.open(path, flags)
    try:
        sync_fd(fd)
    finally:
        os.close(fd)


def sync_directory(path: Path) -> None:
    """Make the renames made in `path` so far durable (POSIX; nothing on Windows)."""
    if sys.platform == "win32":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        sync_fd(fd)
    finally:
        os.close(fd)
