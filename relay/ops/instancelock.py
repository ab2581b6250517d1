"""One process per state directory, by the operating system's own file lock.

Why a lock as well as asking the running process (relay.workstation.control): the process
writes its control endpoint only once it is up, so two started at the same instant both
find none and both start, then fight over the cache. A lock is taken atomically, and the
operating system lets it go when its process ends, however it ends: a crash leaves
nothing stale behind. POSIX: `fcntl.flock` on the whole file. Windows: `msvcrt.locking`
on its first byte (a mandatory lock, taken without waiting). The file holds nothing; the
lock is on the open file, not its contents.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from types import TracebackType
from typing import Final

__all__ = ["InstanceLock", "InstanceLocked"]


class InstanceLocked(Exception):
    """Another process holds the lock; one line that names the file."""


class InstanceLock:
    """An exclusive lock on `path`, created if needed, held from `acquire` to `release`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock without waiting; InstanceLocked if another process has it,
        OSError if none can be taken on this file system."""
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o600)
        try:
            _lock(fd)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in HELD:  # no lock to be had here: not "another process"
                raise
            raise InstanceLocked(f"{self.path} is locked by another process") from exc
        self._fd = fd

    def release(self) -> None:
        """Let the lock go (closing the file does; the file stays for the next one)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            _unlock(fd)
        except OSError:
            pass  # closing releases it anyway
        finally:
            os.close(fd)

    def __enter__(self) -> InstanceLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


if sys.platform == "win32":  # a literal test: mypy checks each branch on its platform
    import msvcrt

    # msvcrt.locking: EACCES when another handle holds the byte (LK_NBLCK), EDEADLOCK
    # after LK_LOCK's retries
    HELD: Final = frozenset({errno.EACCES, errno.EDEADLOCK})

    def _lock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # OSError if another handle holds it

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    # flock: EWOULDBLOCK when another open file holds it. Anything else (ENOLCK,
    # EOPNOTSUPP: a network home directory whose file system has no such locks) means no
    # lock can be had here, which is not another workstation running.
    HELD: Final = frozenset({errno.EAGAIN, errno.EWOULDBLOCK})

    def _lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError if held

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
