"""Encoded frames kept for their next byte range (issue 14), bounded: an LRU.

A progressive viewer asks for the same HTJ2K frame twice (a prefix, then the rest, see
byterange.py). The second request must get the rest of the *same* codestream and should
not pay for a second encoding, so each encoded frame is kept here keyed by (SOP Instance
UID, frame number, transfer syntax), within `max_entries` and `max_bytes` (the least
recently used go first; a codestream larger than `max_bytes` alone is not kept). The
encoder is deterministic, so a frame evicted between the two requests is encoded again
to the same bytes (test_progressive checks that); the ETag lets a client check it.
`obtain` encodes a frame once for the requests that want it at the same moment (the
viewport's first range and the prefetcher's whole frame often coincide).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Final

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_ENTRIES", "CodestreamCache", "Key"]

DEFAULT_MAX_ENTRIES: Final = 512  # frames (a CT series of 512x512 slices: ~0.1 MB each)
DEFAULT_MAX_BYTES: Final = 64 * 1024 * 1024

Key = tuple[str, int, str]  # (SOP Instance UID, frame number from 1, transfer syntax)


class CodestreamCache:
    """LRU of encoded frames; `hits`, `misses` and `evictions` are counted."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:  # fmt: skip
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("a codestream cache holds at least one entry and one byte")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: OrderedDict[Key, bytes] = OrderedDict()
        self._making: dict[Key, asyncio.Future[bytes]] = {}  # one entry per encoding running
        self.bytes = 0
        self.shared = 0  # requests that waited for another's encoding
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Key) -> bytes | None:
        data = self._items.get(key)
        if data is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return data

    def put(self, key: Key, data: bytes) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= len(old)
        if len(data) > self.max_bytes:
            return  # alone larger than the whole budget: served, not kept
        self._items[key] = data
        self.bytes += len(data)
        while len(self._items) > self.max_entries or self.bytes > self.max_bytes:
            _, dropped = self._items.popitem(last=False)
            self.bytes -= len(dropped)
            self.evictions += 1

    async def obtain(self, key: Key, make: Callable[[], Awaitable[bytes]]) -> bytes:
        """The kept codestream, else the one being made for another request, else
        `make()`'s (kept). `make`'s exception reaches every request that waited for it; a
        request whose maker was cancelled (its client went away) makes its own."""
        while True:
            data = self.get(key)
            if data is not None:
                return data
            pending = self._making.get(key)
            if pending is None:
                break
            self.shared += 1
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                if not pending.cancelled():
                    raise  # this request itself was cancelled
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._making[key] = future
        try:
            data = await make()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning without waiters
            raise
        finally:
            del self._making[key]
        self.put(key, data)
        future.set_result(data)
        return data
