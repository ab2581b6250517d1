"""Handing freed heap memory back to the kernel after a burst (glibc only).

glibc returns memory to the kernel only from the top of its heap. A burst of short-lived
connections (a flood of TLS handshakes that never finish: OpenSSL state and uvloop's
256 KiB read buffer each) frees hundreds of MB in the middle of the heap, held there by a
few live objects above it, so RSS stays up after every wave (measured on `relay gateway`:
+25-35 MB per wave of 700, while tracemalloc shows Python's own memory flat). It is the
allocator, not a leak: `malloc_trim(0)` releases free pages anywhere in the heap
(madvise), and RSS returns to its baseline.

`keep_trimmed` checks the heap's free bytes (mallinfo2) every `interval` seconds and trims
once they exceed `slack`. The slack keeps the relay's own buffer churn in the heap (see
relay.ops.runtime) and bounds the cost: a trim walks the heap, so it runs at most once an
interval, and only after a burst.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
from collections.abc import Callable
from typing import Final

#: Seconds between checks.
CHECK_INTERVAL: Final = 1.0


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


class Heap:
    """glibc's heap statistics and trim; `available` is False elsewhere (musl, macOS)."""

    def __init__(self) -> None:
        self._libc: ctypes.CDLL | None = None
        name = ctypes.util.find_library("c")
        with contextlib.suppress(OSError, AttributeError, TypeError):
            libc = ctypes.CDLL(name)
            libc.mallinfo2.restype = _Mallinfo2
            libc.malloc_trim.argtypes = [ctypes.c_size_t]
            libc.malloc_trim.restype = ctypes.c_int
            self._libc = libc

    @property
    def available(self) -> bool:
        return self._libc is not None

    def free_bytes(self) -> int:
        """Bytes in free heap chunks (all arenas), which the process may still hold."""
        if self._libc is None:
            return 0
        info: _Mallinfo2 = self._libc.mallinfo2()
        return int(info.fordblks)

    def trim(self) -> None:
        """Return every free page of the heap to the kernel."""
        if self._libc is not None:
            self._libc.malloc_trim(0)


async def keep_trimmed(
    slack: int,
    *,
    interval: float = CHECK_INTERVAL,
    on_trim: Callable[[int], None] = lambda freed: None,
    heap: Heap | None = None,
) -> None:
    """Forever: trim the heap whenever more than `slack` bytes of it are free.

    `on_trim` gets the free bytes seen before each trim (for a metric). Returns at once
    where there is no glibc.
    """
    heap = heap or Heap()
    if not heap.available:
        return
    while True:
        await asyncio.sleep(interval)
        free = heap.free_bytes()
        if free > slack:
            heap.trim()
            on_trim(free)
