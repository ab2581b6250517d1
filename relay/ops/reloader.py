"""One reload at a time, its file work off the event loop, in every role.

A reload reads the config file (a FIFO may hold that read for PIPE_DEADLINE, a network
share for longer), reads certificates and keys and builds TLS contexts. On the loop,
that stalled every link's heartbeats, stream and DICOM association of the process. So
a reload has two steps: `prepare` (all reading, parsing, checking and context building)
runs in a worker thread and returns the prepared objects; `apply` runs on the loop and
only swaps them in. A prepare that fails with one of `errors` goes to `refuse` on the
loop (the role's one error line and count); the running configuration stays.

Requests are serialised and coalesced: while a round runs, any number of requests make
at most one more round, which starts after the running one has applied (so it reads
the file as the last request found it). Since rounds never overlap, the running state
a prepare read is still the running state when its apply runs: only apply changes it.

The worker is a daemon thread of its own, not the loop's default executor: at a stop a
prepare stuck on a FIFO or a dead share is abandoned (`close`), and neither the loop's
shutdown (which joins the default executor) nor the interpreter's exit waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["ReloadStopped", "Reloader", "in_daemon_thread"]

log = logging.getLogger(__name__)

P = TypeVar("P")  # what a prepare built
R = TypeVar("R")  # a round's outcome, as apply or refuse gives it
T = TypeVar("T")


class ReloadStopped(Exception):
    """The process stopped before the reload awaited was applied."""


class Reloader(Generic[P, R]):
    """Serialised, coalesced reloads: `prepare` in a thread, `apply` or `refuse` on the loop.

    `request` is for a signal handler (fire and forget); `reload` awaits the outcome of a
    round that reads the files after the call (the control endpoint's answer).
    """

    def __init__(
        self,
        prepare: Callable[[], P],
        apply: Callable[[P], R],
        refuse: Callable[[Exception], R],
        errors: tuple[type[Exception], ...],
    ) -> None:
        self._prepare = prepare
        self._apply = apply
        self._refuse = refuse
        self._errors = errors
        self._task: asyncio.Task[None] | None = None
        self._current: asyncio.Future[R] | None = None  # the round under way
        self._next: asyncio.Future[R] | None = None  # at most one round waits for it
        self._closed = False
        self.prepares = 0  # rounds started: coalescing bounds it, tests count it

    @property
    def running(self) -> bool:
        return self._task is not None

    @property
    def waiting(self) -> bool:
        """A round is asked for after the one under way."""
        return self._current is not None and self._next is not None

    def request(self) -> asyncio.Future[R]:
        """Reload soon (SIGHUP); the future is the outcome of the round that will read the
        files after this call: the next one if a round is under way. Loop thread only."""
        loop = asyncio.get_running_loop()
        if self._closed:
            stopped: asyncio.Future[R] = loop.create_future()
            self._fail(stopped)
            return stopped
        if self._next is None:
            self._next = loop.create_future()
        if self._task is None:
            self._task = loop.create_task(self._rounds(), name="reload")
        return self._next

    async def reload(self) -> R:
        """Request a reload and wait for its outcome; ReloadStopped if the process stops
        first."""
        return await asyncio.shield(self.request())

    def close(self) -> None:
        """At a stop: no more rounds; a prepare under way is abandoned (its thread ends on
        its own), its apply never runs, and whoever awaits a round hears ReloadStopped."""
        self._closed = True
        for waiting in (self._current, self._next):
            if waiting is not None:
                self._fail(waiting)
        self._current = self._next = None
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _rounds(self) -> None:
        try:
            while self._next is not None and not self._closed:
                self._current, self._next = self._next, None
                outcome = await self._round()
                if self._current is not None and not self._current.done():
                    self._current.set_result(outcome)
                self._current = None
        finally:
            if self._task is asyncio.current_task():
                self._task = None

    async def _round(self) -> R:
        self.prepares += 1
        log.info("reloading configuration and certificates")
        try:
            prepared = await in_daemon_thread(self._prepare)
        except self._errors as exc:
            return self._refuse(exc)
        except Exception as exc:  # a bug: the traceback, then the role's error line and count
            log.exception("reload: unexpected error while preparing")
            return self._refuse(exc)
        try:
            return self._apply(prepared)
        except Exception as exc:  # a bug, perhaps half applied: said, and counted
            log.exception("reload: unexpected error while applying")
            return self._refuse(exc)

    @staticmethod
    def _fail(waiting: asyncio.Future[Any]) -> None:
        if not waiting.done():
            waiting.set_exception(ReloadStopped("stopping: the reload was not applied"))
            # Nobody may await it (a signal's request): no "never retrieved" warning.
            waiting.add_done_callback(_consume)


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def in_daemon_thread(work: Callable[[], T]) -> T:
    """`work()` in a daemon thread of its own; cancelling the wait abandons the thread."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        try:
            result = work()
        except BaseException as exc:  # raised where it is awaited, whatever it is
            hand_over(done.set_exception, exc)
        else:
            hand_over(done.set_result, result)

    def hand_over(setter: Callable[[Any], None], value: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(_settle, done, setter, value)

    threading.Thread(target=run, name="reload prepare", daemon=True).start()
    return await done


def _settle(done: asyncio.Future[Any], setter: Callable[[Any], None], value: object) -> None:
    if not done.done():  # cancelled meanwhile: nobody wants it
        setter(value)
