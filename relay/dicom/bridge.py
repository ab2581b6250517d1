"""A bounded FIFO between pynetdicom's threads and the asyncio side.

pynetdicom is thread-based and blocks; the relay's streams live on an event loop. A
`Channel` lets either side put and get with the other side's primitives, and its bound is
what makes backpressure work end to end: a full channel blocks the PACS's C-STORE handler
(so the PACS waits), or stops the workstation reading its stream (so tunnel credit stops and
the agent waits). Thread-side calls take a timeout; loop-side calls are awaited (callers add
their own timeouts with asyncio.timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class ChannelClosed(Exception):
    """The channel was closed (for a get: and is empty). `reason` says why."""

    def __init__(self, reason: str = "closed") -> None:
        super().__init__(reason)
        self.reason = reason


class Woken(TimeoutError):
    """A thread's `get_sync` returned early because `wake()` was called: look around."""


class Channel(Generic[T]):
    """Bounded FIFO; `put`/`get` for the loop, `put_sync`/`get_sync` for threads."""

    def __init__(self, loop: asyncio.AbstractEventLoop, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self._loop = loop
        self._maxsize = maxsize
        self._items: deque[T] = deque()
        self._closed: str | None = None
        self._wakes = 0
        self._cond = threading.Condition()
        self._waiters: set[asyncio.Future[None]] = set()

    @property
    def maxsize(self) -> int:
        return self._maxsize

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed is not None

    # -- called with the lock held --------------------------------------------------

    def _changed(self) -> None:
        self._cond.notify_all()
        if not self._waiters:
            return
        waiters, self._waiters = self._waiters, set()

        def wake() -> None:
            for w in waiters:
                if not w.done():
                    w.set_result(None)

        with contextlib.suppress(RuntimeError):  # loop closed: nobody is waiting any more
            self._loop.call_soon_threadsafe(wake)

    # -- loop side ------------------------------------------------------------------

    async def put(self, item: T) -> None:
        while True:
            with self._cond:
                if self._closed is not None:
                    raise ChannelClosed(self._closed)
                if len(self._items) < self._maxsize:
                    self._items.append(item)
                    self._changed()
                    return
                fut = self._loop.create_future()
                self._waiters.add(fut)
            await self._wait(fut)

    async def get(self) -> T:
        while True:
            with self._cond:
                if self._items:
                    item = self._items.popleft()
                    self._changed()
                    return item
                if self._closed is not None:
                    raise ChannelClosed(self._closed)
                fut = self._loop.create_future()
                self._waiters.add(fut)
            await self._wait(fut)

    async def _wait(self, fut: asyncio.Future[None]) -> None:
        try:
            await fut
        finally:
            with self._cond:
                self._waiters.discard(fut)

    # -- thread side ----------------------------------------------------------------

    def put_sync(self, item: T, timeout: float) -> None:
        """Block while full; TimeoutError after `timeout` seconds, ChannelClosed if closed."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if self._closed is not None:
                    raise ChannelClosed(self._closed)
                if len(self._items) < self._maxsize:
                    self._items.append(item)
                    self._changed()
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("channel full")
                self._cond.wait(left)

    def get_sync(self, timeout: float) -> T:
        """Block while empty; TimeoutError after `timeout`, ChannelClosed once drained,
        Woken as soon as `wake()` is called (something else needs the waiting thread)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            wakes = self._wakes
            while True:
                if self._items:
                    item = self._items.popleft()
                    self._changed()
                    return item
                if self._closed is not None:
                    raise ChannelClosed(self._closed)
                if self._wakes != wakes:
                    raise Woken("woken")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("channel empty")
                self._cond.wait(left)

    # -- either side ----------------------------------------------------------------

    def wake(self) -> None:
        """Make a thread waiting in `get_sync` return now (Woken) if nothing is queued."""
        with self._cond:
            self._wakes += 1
            self._cond.notify_all()

    def close(self, reason: str = "closed") -> None:
        """No more puts; gets drain what is queued, then raise ChannelClosed(reason)."""
        with self._cond:
            if self._closed is None:
                self._closed = reason
            self._changed()

    def abort(self, reason: str = "aborted") -> None:
        """Close and drop what is queued, so blocked producers and memory are released."""
        with self._cond:
            if self._closed is None:
                self._closed = reason
            self._items.clear()
            self._changed()
