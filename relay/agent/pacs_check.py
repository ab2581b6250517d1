"""Is the PACS answering? For the agent's /readyz: a C-ECHO, off the event loop, bounded,
at most one at a time, its answer cached briefly (so a busy prober costs the PACS one
association every CACHE_TTL at most)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

__all__ = ["CACHE_TTL", "ECHO_TIMEOUT", "PacsCheck"]

CACHE_TTL = 5.0  # seconds an answer is reused
ECHO_TIMEOUT = 3.0  # seconds for each wait of one C-ECHO (connect, association, answer)

Echo = Callable[[], tuple[bool, str]]


class PacsCheck:
    """`await check()` -> (ready, why). `echo` blocks (pynetdicom is thread-based) and runs
    in a worker thread; callers wait at most `wait` seconds for it, and a new echo starts
    only when none is running and the cached answer is older than `ttl`."""

    def __init__(
        self,
        echo: Echo,
        *,
        ttl: float = CACHE_TTL,
        wait: float = ECHO_TIMEOUT + 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.echo = echo
        self.ttl = ttl
        self.wait = wait
        self.clock = clock
        self.echoes = 0  # C-ECHOs started
        self._answer: tuple[bool, str] | None = None
        self._answered_at = 0.0
        self._running: asyncio.Future[tuple[bool, str]] | None = None

    async def __call__(self) -> tuple[bool, str]:
        if self._answer is not None and self.clock() - self._answered_at < self.ttl:
            return self._answer
        if self._running is None:
            self.echoes += 1
            self._running = asyncio.ensure_future(asyncio.to_thread(self.echo))
            self._running.add_done_callback(self._done)
        try:
            async with asyncio.timeout(self.wait):
                return await asyncio.shield(self._running)
        except TimeoutError:
            return False, f"no answer to C-ECHO within {self.wait:g} s"

    def _done(self, future: asyncio.Future[tuple[bool, str]]) -> None:
        self._running = None
        answer: tuple[bool, str] = (False, "C-ECHO could not run")
        with contextlib.suppress(Exception, asyncio.CancelledError):
            answer = future.result()
        self._answer = answer
        self._answered_at = self.clock()
