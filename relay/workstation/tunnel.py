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
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from relay.net.aio import Link, Stream
from relay.net.backoff import ExponentialBackoff, Uniform
from relay.net.bytestream import StreamResetError
from relay.ops.config import Address
from relay.proto import ErrorCode, LinkClosedError, StreamStateError

__all__ = [
    "DEFAULT_OPEN_TIMEOUT",
    "REPLAY_CHUNK_COST",
    "REPLAY_LIMIT",
    "RETRY_CODES",
    "RoutedStream",
    "Tunnel",
    "TunnelStats",
    "TunnelUnavailable",
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


class TunnelUnavailable(ConnectionError):
    """No stream could be opened before the deadline (no link, or no route to the agent)."""


@dataclass
class TunnelStats:
    """Counters for the metrics layer."""

    opened: int = 0  # streams handed to callers
    rerouted: int = 0  # NO_ROUTE / REFUSED_STREAM retried transparently
    unavailable: int = 0  # opens that gave up


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
        except TunnelUnavailable:
            self.stats.unavailable += 1
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
            try:
                async with asyncio.timeout(remaining):
                    await self.kept.up.wait()
            except TimeoutError:
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


class RoutedStream:
    """A ByteStream over the current attempt; see the module docstring."""

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
        self._lock = asyncio.Lock()
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

    def _record(self, data: bytes) -> bool:
        """Keep a copy for a possible replay; False once that is no longer possible."""
        if self._confirmed or self._replay is None:
            return False
        cost = len(data) + REPLAY_CHUNK_COST
        if self._replay_size + cost > self._tunnel.replay_limit:
            self._drop_replay()  # too much to keep: a NO_ROUTE now reaches the caller
            return False
        self._replay.append(data)
        self._replay_size += cost
        return True

    async def read(self, max_bytes: int = 65536) -> bytes:
        while True:
            stream, generation = self._stream, self._generation
            try:
                data = await stream.read(max_bytes)
            except StreamResetError as exc:
                if await self._reroute(exc, generation):
                    continue
                raise
            self._confirm()
            return data

    async def write(self, data: bytes) -> None:
        recorded = self._record(data)
        stream, generation = self._stream, self._generation
        try:
            await stream.write(data)
        except StreamResetError as exc:
            if recorded and await self._reroute(exc, generation):
                return  # the replay on the new stream included `data`
            raise

    async def write_eof(self) -> None:
        self._eof_written = True
        stream, generation = self._stream, self._generation
        try:
            await stream.write_eof()
        except StreamResetError as exc:
            if await self._reroute(exc, generation):
                return  # the replay ended with the EOF
            raise

    def reset(self, code: int) -> None:
        self._confirm()  # no retry after the caller gave up
        self._stream.reset(code)

    def release(self) -> None:
        """Return the credit of unread data (the caller is done reading)."""
        self._stream.release()

    async def _reroute(self, exc: StreamResetError, generation: int) -> bool:
        """After a retryable reset of attempt `generation`: True once a newer attempt
        carries everything written so far; False if the reset must reach the caller."""
        if exc.code not in RETRY_CODES:
            return False
        loop = asyncio.get_running_loop()
        async with self._lock:
            if self._generation != generation:
                return True  # another reader/writer already moved us on
            while True:
                if self._confirmed or self._replay is None:
                    return False
                delay = self._backoff.next_delay()
                if loop.time() + delay >= self._deadline:
                    return False
                await asyncio.sleep(delay)
                try:
                    stream = await self._tunnel._open(self._headers, self._deadline, self._backoff)
                except TunnelUnavailable:
                    return False
                replay = self._replay
                if self._confirmed or replay is None:  # the deadline passed while opening
                    stream.reset(ErrorCode.CANCEL)
                    return False
                self.attempts += 1
                self._tunnel.stats.rerouted += 1
                try:
                    for chunk in list(replay):
                        await stream.write(chunk)
                    if self._eof_written:
                        await stream.write_eof()
                except StreamResetError as again:
                    if again.code in RETRY_CODES:
                        continue
                    self._stream = stream
                    self._generation += 1
                    return True  # the caller meets this new reset on its next call
                self._stream = stream
                self._generation += 1
                return True
