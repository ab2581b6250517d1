"""Bytes kept for their next request, bounded: an LRU with one maker per key at a time.

Two things are kept this way: encoded HTJ2K frames (codestreams.py) and the instances of
cached series read from the disk cache (retrieve.py). Each is kept within `max_entries`
and `max_bytes` (the least recently used go first; one larger than `max_bytes` alone is
served, not kept). `obtain` makes a key's bytes once for the requests that want them at
the same moment.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["KeptBytes"]

K = TypeVar("K", bound=Hashable)


class KeptBytes(Generic[K]):
    """LRU of bytes by key; `hits`, `misses`, `shared` and `evictions` are counted."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("a cache of bytes holds at least one entry and one byte")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: OrderedDict[K, bytes] = OrderedDict()
        self._making: dict[K, asyncio.Future[bytes]] = {}  # one entry per maker running
        self.bytes = 0
        self.shared = 0  # requests that waited for another's maker
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.generation = 0  # clear() moves it on: a maker started before puts nothing

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: K) -> bytes | None:
        data = self._items.get(key)
        if data is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return data

    def put(self, key: K, data: bytes) -> None:
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

    def discard(self, key: K) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= len(old)

    def drop(self) -> None:
        """Give the memory back (room is needed elsewhere); makers under way still keep
        what they make, unlike `clear`."""
        self.evictions += len(self._items)
        self._items.clear()
        self.bytes = 0

    def clear(self) -> None:
        """Forget everything kept, and what makers under way would keep (a cache wipe:
        no decrypted copy outlives it here)."""
        self._items.clear()
        self.bytes = 0
        self.generation += 1

    async def obtain(self, key: K, make: Callable[[], Awaitable[bytes]]) -> bytes:
        """The kept bytes, else the ones being made for another request, else `make()`'s
        (kept). `make`'s exception reaches every request that waited for it; a request
        whose maker was cancelled (its client went away) makes its own."""
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
        generation = self.generation
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
        if generation == self.generation:
            self.put(key, data)
        future.set_result(data)
        return data
