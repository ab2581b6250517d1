"""Running a role's main coroutine: uvloop where it exists, and a heap that stops churning.

uvloop halves the memory of an idle TLS link (its SSL transport does not zero-fill a
256 KiB buffer per connection as the default loop does) and relays faster.

glibc returns freed memory to the kernel eagerly and maps large buffers one by one; a
relay that allocates and frees 64 KiB-1 MiB buffers all the time then page-faults them
back in (90,000-310,000 minor faults per GB relayed, measured in tests/bench). Raising
the mmap and trim thresholds keeps those buffers in the heap; at most TRIM_THRESHOLD of
freed memory stays resident after a burst.

uvloop does not exist on Windows (pyproject leaves it out there): the ends then run on
the stdlib loop (the Proactor loop on Windows), which every module here supports.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# mallopt(3) parameters
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 8 * 1024 * 1024
TRIM_THRESHOLD = 32 * 1024 * 1024
TOP_PAD = 4 * 1024 * 1024


def tune_malloc() -> bool:
    """Apply the thresholds above with glibc's mallopt; False where there is no glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(name)
        ok = all(
            libc.mallopt(param, value) == 1
            for param, value in (
                (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                (_M_TOP_PAD, TOP_PAD),
            )
        )
        return ok
    return False


def loop_factory() -> tuple[str, Callable[[], asyncio.AbstractEventLoop]]:
    """uvloop's loop where it can be imported, else the stdlib's; and which one it is."""
    try:
        import uvloop
    except ImportError:
        return "asyncio", asyncio.new_event_loop
    return "uvloop", uvloop.new_event_loop


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run a role's main coroutine to the end on the best loop this platform has."""
    tune_malloc()
    name, factory = loop_factory()
    log.debug("event loop", extra={"loop": name})
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
