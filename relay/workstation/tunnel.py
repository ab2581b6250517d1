"""Opening streams to the agent through the workstation's one link, riding out NO_ROUTE.

A gateway that has no link to our site's agent yet (it just restarted, the agent is
still backing off) refuses a new stream with NO_ROUTE. Opening a stream costs no round
trip, so that verdict arrives after `open_stream()` has returned and the caller may
already have written its request. The stream returned is therefore a `RoutedStream`:
until the first byte (or EOF) comes back from the agent, it keeps a copy of what was
written (at most `replay_limit` bytes, each write counted with `REPLAY_CHUNK_COST` more,
and only until the open deadline); on NO_ROUTE or REFUSED_STREAM (our OPEN crossed the
gateway's goaway) it opens a new stream after a jittered pause and replays that copy,
until the open deadline. Neither code can come once the agent has answered, and neither
means the agent saw anything, so the replay never duplicates work. Other resets, and
these ones after the deadline or beyond the replay limit, reach the caller unchanged.
Every write is either carried, in order, by the attempt that is finally answered, or
fails (and so does every call after it): see `RoutedStream`.

Offline: a source that can tell the link is known down (`OfflineAware`: the
SessionKeeper's `offline()`, reconnect attempts failing for a while) makes an open fail
at once with `TunnelOffline`, whose message says so, instead of waiting the whole open
timeout; an open already waiting looks again every `OFFLINE_POLL`. A brief blip (no
attempt failed yet) still waits for the link. `TunnelOffline.retry_after` says when to
try again: the source's next reconnect attempt (`RetryAware`, the keeper's backoff) if it
knows it, bounded to RETRY_AFTER_MIN..RETRY_AFTER_MAX seconds, else RETRY_AFTER_MIN.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, NoReturn, Protocol, runtime_checkable

from relay.net.aio import Link, Stream
from relay.net.backoff import ExponentialBackoff, Uniform
from relay.net.bytestream import StreamResetError
from relay.ops.config import Address
from relay.proto import ErrorCode, LinkClosedError, StreamStateError

__all__ = [
    "DEFAULT_OPEN_TIMEOUT",
    "OFFLINE_POLL",
    "REPLAY_CHUNK_COST",
    "REPLAY_LIMIT",
    "RETRY_AFTER_MAX",
    "RETRY_AFTER_MIN",
    "RETRY_CODES",
    "RetryAware",
    "RoutedStream",
    "Tunnel",
    "TunnelOffline",
    "TunnelStats",
    "TunnelUnavailable",
    "retry_after",
]

DEFAULT_OPEN_TIMEOUT: Final = 15.0
#: Bytes of one stream kept for a replay until the agent answers: a DICOM request, or a
#: forwarded program's first exchange, fits; a larger upload is not replayed (its NO_ROUTE
#: reaches the caller). A peer that never answers holds this much per stream, and only
#: until the open deadline.
REPLAY_LIMIT: Final = 256 * 1024
#: What one kept write costs besides its bytes (a bytes object and its list slot, ~41 B
#: measured), so a caller writing a byte at a time cannot hold 40 times REPLAY_LIMIT.
REPLAY_CHUNK_COST: Final = 64
RETRY_CODES: Final = frozenset({ErrorCode.NO_ROUTE, ErrorCode.REFUSED_STREAM})
# Pauses between attempts: short (an agent usually reconnects within seconds), jittered.
RETRY_BASE: Final = 0.05
RETRY_CAP: Final = 2.0
#: How often an open waiting for the link asks whether it is known down meanwhile.
OFFLINE_POLL: Final = 0.25
#: Bounds of an offline failure's `retry_after` (s): at least the busy 503's 1 s; at most
#: 30 s, so a viewer that honours it is never told to wait out a long backoff's whole cap
#: (the session may come back sooner: a gateway dial that succeeds early).
RETRY_AFTER_MIN: Final = 1
RETRY_AFTER_MAX: Final = 30


class TunnelUnavailable(ConnectionError):
    """No stream could be opened before the deadline (no link, or no route to the agent)."""


class TunnelOffline(TunnelUnavailable):
    """No stream, at once: the link is known down (its message says why);
    `retry_after`: whole seconds until the next reconnect attempt, bounded."""

    def __init__(self, why: str, retry_after: int = RETRY_AFTER_MIN) -> None:
        super().__init__(why)
        self.retry_after = retry_after


def retry_after(seconds: float | None) -> int:
    """Whole seconds a client should wait (rounded up, so it never comes before the
    attempt), within RETRY_AFTER_MIN..RETRY_AFTER_MAX; RETRY_AFTER_MIN when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return RETRY_AFTER_MIN
    return min(RETRY_AFTER_MAX, max(RETRY_AFTER_MIN, math.ceil(seconds)))


@dataclass
class TunnelStats:
    """Counters for the metrics layer."""

    opened: int = 0  # streams handed to callers
    rerouted: int = 0  # NO_ROUTE / REFUSED_STREAM retried transparently
    unavailable: int = 0  # opens that gave up
    offline: int = 0  # of those, failed at once: the link known down


class LinkSource(Protocol):
    """Where the Tunnel's streams go: the sealed session (or, in tests, a KeptLink)."""

    up: asyncio.Event

    @property
    def link(self) -> Link | None: ...

    @property
    def address(self) -> Address: ...

    @property
    def stats(self) -> _HasLastError: ...


class _HasLastError(Protocol):
    last_error: str


@runtime_checkable
class OfflineAware(Protocol):
    """A source that can tell the link is known down (the SessionKeeper)."""

    def offline(self) -> str | None: ...


@runtime_checkable
class RetryAware(Protocol):
    """A source that can tell when its next reconnect attempt is due (the SessionKeeper)."""

    def retry_in(self) -> float | None: ...


class Tunnel:
    """Streams to the agent over a `KeptLink`; what the forwarder and DICOM node call."""

    def __init__(
        self,
        kept: LinkSource,
        *,
        open_timeout: float = DEFAULT_OPEN_TIMEOUT,
        replay_limit: int = REPLAY_LIMIT,
        rng: Uniform | None = None,
    ) -> None:
        self.kept = kept
        self.open_timeout = open_timeout
        self.replay_limit = replay_limit
        self.rng = rng
        self.stats = TunnelStats()

    def _backoff(self) -> ExponentialBackoff:
        return ExponentialBackoff(RETRY_BASE, RETRY_CAP, rng=self.rng)

    async def open_stream(
        self,
        headers: Mapping[str, str],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the deadline also bounds retries later
    ) -> RoutedStream:
        """A stream to the agent, waiting at most `timeout` (default `open_timeout`) for
        the link; NO_ROUTE is retried until the same deadline. Raises TunnelUnavailable."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.open_timeout if timeout is None else timeout)
        try:
            stream = await self._open(headers, deadline, self._backoff())
        except TunnelUnavailable as exc:
            self.stats.unavailable += 1
            self.stats.offline += isinstance(exc, TunnelOffline)
            raise
        self.stats.opened += 1
        return RoutedStream(self, headers, stream, deadline)

    async def _open(
        self, headers: Mapping[str, str], deadline: float, backoff: ExponentialBackoff
    ) -> Stream:
        loop = asyncio.get_running_loop()
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TunnelUnavailable("no link to the gateway within the open timeout")
            if not self.kept.up.is_set():
                self._raise_if_offline()
                try:
                    async with asyncio.timeout(min(remaining, OFFLINE_POLL)):
                        await self.kept.up.wait()
                except TimeoutError:
                    if remaining > OFFLINE_POLL:
                        continue  # known down meanwhile?
                    raise TunnelUnavailable(
                        f"no link to the gateway {self.kept.address} "
                        f"({self.kept.stats.last_error or 'down'})"
                    ) from None
            link = self.kept.link
            if link is not None:
                try:
                    return link.open_stream(headers)
                except (LinkClosedError, StreamStateError):
                    pass  # goaway being processed, or the peer's stream limit: wait a little
            delay = backoff.next_delay()
            if loop.time() + delay >= deadline:
                raise TunnelUnavailable("no usable link to the gateway within the open timeout")
            await asyncio.sleep(delay)

    def _raise_if_offline(self) -> None:
        if isinstance(self.kept, OfflineAware):
            why = self.kept.offline()
            if why is not None:
                due = self.kept.retry_in() if isinstance(self.kept, RetryAware) else None
                raise TunnelOffline(why, retry_after(due))


class RoutedStream:
    """A ByteStream over the current attempt; see the module docstring.

    Writes, the EOF and replays run one at a time under one lock: a write that comes
    while a replay is under way waits for it and then goes, after the copy, to the new
    attempt (or fails with the replay). Once a reset has reached the caller, every later
    call meets it: no write can succeed past one that failed."""

    def __init__(
        self, tunnel: Tunnel, headers: Mapping[str, str], stream: Stream, deadline: float
    ) -> None:
        self._tunnel = tunnel
        self._headers = dict(headers)
        self._stream = stream
        self._deadline = deadline
        self._generation = 0
        self._confirmed = False
        self._replay: list[bytes] | None = []  # None: replay no longer possible
        self._replay_size = 0  # its bytes, and REPLAY_CHUNK_COST per chunk
        self._eof_written = False
        self._replaying: Stream | None = None  # the new attempt a replay is writing to
        self._failed: int | None = None  # the reset code every call meets from now on
        self._lock = asyncio.Lock()  # writes, EOF and replays, one at a time
        self._backoff = tunnel._backoff()
        self.attempts = 1
        # Past the deadline no replay can happen: the copy must not outlive it.
        self._expiry = asyncio.get_running_loop().call_at(deadline, self._drop_replay)

    @property
    def headers(self) -> Mapping[str, str]:
        return self._headers

    @property
    def stream(self) -> Stream:
        """The current underlying stream (changes when a NO_ROUTE is retried)."""
        return self._stream

    @property
    def replay_held(self) -> int:
        """Bytes kept for a replay (chunk costs included); 0 once none can happen."""
        return self._replay_size

    @property
    def confirmed(self) -> bool:
        """True once the agent has sent something: no replay is possible or needed."""
        return self._confirmed

    def _confirm(self) -> None:
        if not self._confirmed:
            self._confirmed = True
            self._drop_replay()

    def _drop_replay(self) -> None:
        """No replay from now on (confirmed, too much to keep, or past the deadline)."""
        self._replay = None
        self._replay_size = 0
        self._expiry.cancel()

    def _replayable(self) -> bool:
        return not self._confirmed and self._replay is not None and self._failed is None

    def _record(self, data: bytes) -> None:
        """Keep a copy for a possible replay, while one is possible."""
        if self._replay is None:
            return
        cost = len(data) + REPLAY_CHUNK_COST
        if self._replay_size + cost > self._tunnel.replay_limit:
            self._drop_replay()  # too much to keep: a NO_ROUTE now reaches the caller
            return
        self._replay.append(data)
        self._replay_size += cost

    def _raise_if_failed(self) -> None:
        if self._failed is not None:
            raise StreamResetError(self._failed)

    def _fail(self, exc: StreamResetError) -> NoReturn:
        """This reset reaches the caller, now and at every later call (the first one
        recorded wins: the caller's own reset, if it came first)."""
        self._drop_replay()
        if self._failed is None:
            self._failed = exc.code
        if exc.code == self._failed:
            raise exc
        raise StreamResetError(self._failed)

    async def read(self, max_bytes: int = 65536) -> bytes:
        while True:
            self._raise_if_failed()
            stream, generation = self._stream, self._generation
            try:
                data = await stream.read(max_bytes)
            except StreamResetError as exc:
                if self._generation == generation:  # else a writer moved us on already
                    async with self._lock:
                        if self._generation == generation:
                            await self._recover(exc)
                continue
            self._confirm()
            return data

    async def write(self, data: bytes) -> None:
        async with self._lock:
            self._raise_if_failed()
            if self._eof_written:
                raise StreamResetError(ErrorCode.STREAM_CLOSED, "write after write_eof")
            self._record(data)
            try:
                await self._stream.write(data)
            except StreamResetError as exc:
                await self._recover(exc)  # the replay on the new stream included `data`

    async def write_eof(self) -> None:
        async with self._lock:
            self._raise_if_failed()
            self._eof_written = True
            try:
                await self._stream.write_eof()
            except StreamResetError as exc:
                await self._recover(exc)  # the replay ended with the EOF

    def reset(self, code: int) -> None:
        self._confirm()  # no retry after the caller gave up
        if self._failed is None:
            self._failed = code
        self._stream.reset(code)
        if self._replaying is not None:
            self._replaying.reset(code)  # it would carry the request to the agent

    def release(self) -> None:
        """Return the credit of unread data (the caller is done reading)."""
        self._stream.release()

    async def _recover(self, exc: StreamResetError) -> None:
        """After a reset of the current attempt, with the lock held: returns once a new
        attempt carries everything written so far; else raises the reset for the caller."""
        if exc.code not in RETRY_CODES:
            self._fail(exc)
        while True:
            stream, replay = await self._next_attempt(exc)
            try:
                await self._replay_onto(stream, replay)
            except StreamResetError as again:
                if again.code in RETRY_CODES:
                    continue
                self._switch_to(stream)
                self._fail(again)
            self._switch_to(stream)
            return

    async def _next_attempt(self, exc: StreamResetError) -> tuple[Stream, tuple[bytes, ...]]:
        """A new stream, after the backoff's pause, and the copy to replay on it; raises
        `exc` for the caller once no replay can happen (deadline, caller's reset, no link)."""
        loop = asyncio.get_running_loop()
        delay = self._backoff.next_delay()
        if not self._replayable() or loop.time() + delay >= self._deadline:
            self._fail(exc)
        await asyncio.sleep(delay)
        try:
            stream = await self._tunnel._open(self._headers, self._deadline, self._backoff)
        except TunnelUnavailable:
            self._fail(exc)
        replay = self._replay
        if replay is None or not self._replayable():  # past the deadline, or reset, meanwhile
            stream.reset(ErrorCode.CANCEL)
            self._fail(exc)
        return stream, tuple(replay)

    def _switch_to(self, stream: Stream) -> None:
        """Make `stream` the current attempt: readers and writers of the old one move on."""
        self._stream = stream
        self._generation += 1

    async def _replay_onto(self, stream: Stream, replay: tuple[bytes, ...]) -> None:
        """Write the copy, and the EOF if the caller wrote it, to a new attempt (a reset
        of the caller's stops it: see reset)."""
        self.attempts += 1
        self._tunnel.stats.rerouted += 1
        self._replaying = stream
        try:
            for chunk in replay:
                await stream.write(chunk)
            if self._eof_written:
                await stream.write_eof()
        finally:
            self._replaying = None
