"""The asyncio adapter: a sealed session over one outer relay stream, as a Transport.

`SealTransport` drives a `SealCore` with the bytes of an outer `ByteStream` (a stream
through the gateway) and presents an asyncio Transport to a protocol built when the
handshake completes: the relay/proto `Link`, unchanged, so the inner request streams are
multiplexed inside the TLS by the same core as the outer ones.

Flow control. Outwards: sealed bytes wait in a queue that one writer task drains into
the outer stream as its credit allows; above the high-water mark the protocol is paused
(`pause_writing`), below the low one resumed, and above `write_hard` the session is
aborted: nothing grows without a bound. Inwards: the reader takes outer data only as
fast as the core consumes it, and everything the inner Link accepts is bounded by the
inner per-stream and per-link windows, so a stalled inner stream stalls only itself.

Shutdown. `close()` sends a TLS close_notify after what is queued, then half-closes the
outer stream; `abort()` resets it. A failure (a record that does not authenticate, the
outer stream reset) reaches the protocol as `connection_lost(SealError)` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from relay.net.bytestream import ByteStream, StreamResetError
from relay.proto import ErrorCode
from relay.seal.core import (
    HandshakeComplete,
    PlaintextReceived,
    SealBufferFull,
    SealCore,
    SealEvent,
    SealStateError,
    SessionClosed,
    SessionFailed,
)
from relay.trust.identity import Identity

__all__ = [
    "READ_SIZE",
    "WRITE_HARD",
    "WRITE_HIGH",
    "WRITE_LOW",
    "SealError",
    "SealTransport",
    "sealed_peer",
]

log = logging.getLogger(__name__)

# The inner Link sets its own marks (relay.net.aio.WRITE_HIGH/LOW, 256/64 KiB) and keeps
# the rest of its DATA in its core, where urgent streams can pass: these are defaults only.
WRITE_HIGH: Final = 256 * 1024
WRITE_LOW: Final = 64 * 1024
WRITE_HARD: Final = 8 * 1024 * 1024  # the inner Link pauses at WRITE_HIGH; this is a bug catch
READ_SIZE: Final = 256 * 1024
WRITE_BATCH: Final = 64 * 1024  # sealed chunks joined into one outer write
LINGER: Final = 5.0  # after our half-close, how long we wait for the peer's before a reset


class SealError(ConnectionError):
    """The session failed: `reason` is one of relay.seal.core.FAILURE_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"sealed session failed ({reason}): {detail}")
        self.reason = reason
        self.detail = detail


ProtocolFactory = Callable[[HandshakeComplete], asyncio.Protocol]


class SealTransport(asyncio.Transport):
    """See the module docstring. Call `begin()`, then await `established`."""

    def __init__(
        self,
        outer: ByteStream,
        core: SealCore,
        protocol_factory: ProtocolFactory,
        *,
        name: str = "session",
        write_hard: int = WRITE_HARD,
        read_size: int = READ_SIZE,
        linger: float = LINGER,
    ) -> None:
        super().__init__()
        self.loop = asyncio.get_running_loop()
        self.outer = outer
        self.core = core
        self.name = name
        self._factory = protocol_factory
        self._protocol: asyncio.Protocol | None = None
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._high, self._low, self._hard = WRITE_HIGH, WRITE_LOW, write_hard
        self._paused = False
        self._read_size = read_size
        self._linger = linger
        self._wake = asyncio.Event()
        self._reading = asyncio.Event()
        self._reading.set()
        self._closing = False
        self._lost = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._writer: asyncio.Task[None] | None = None
        self.failure: SessionFailed | None = None
        self.established: asyncio.Future[HandshakeComplete] = self.loop.create_future()
        self.finished: asyncio.Future[SessionFailed | None] = self.loop.create_future()
        self._extra: dict[str, Any] = {"outer": outer}

    def __repr__(self) -> str:
        return f"<SealTransport {self.name} {self.core.state}>"

    def begin(self) -> None:
        """Start reading and writing the outer stream (the client's hello goes out)."""
        self._spawn(self._read_loop(), "read")
        self._writer = self._spawn(self._write_loop(), "write")
        self._pump()

    async def wait_established(self, timeout: float) -> HandshakeComplete:  # noqa: ASYNC109
        """The handshake's outcome within `timeout`; raises SealError (reason timeout...)."""
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(self.established)
        except TimeoutError:
            self._fail(SessionFailed("timeout", f"no handshake within {timeout:g} s"))
            self.abort()
            raise SealError("timeout", f"no handshake within {timeout:g} s") from None

    # -- asyncio.Transport

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peer":
            return self.core.peer
        return self._extra.get(name, default)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self.core.close()
        self._pump()
        self._wake.set()
        self._lose(None)

    def abort(self) -> None:
        self._closing = True
        self._queue.clear()
        self._queued = 0
        with contextlib.suppress(Exception):
            self.outer.reset(ErrorCode.CANCEL)
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        self._lose(self._error())
        self._settle()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            return
        try:
            self.core.send(bytes(data))
        except (SealStateError, SealBufferFull) as exc:
            self._fail(SessionFailed("buffer", str(exc)))
            self.abort()
            return
        self._pump()

    def write_eof(self) -> None:
        self.close()

    def can_write_eof(self) -> bool:
        return True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = WRITE_HIGH if high is None else high
        self._low = self._high // 4 if low is None else low

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def get_write_buffer_size(self) -> int:
        return self._queued

    def is_reading(self) -> bool:
        return self._reading.is_set()

    def pause_reading(self) -> None:
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol  # type: ignore[return-value]

    # -- internals

    def _spawn(self, coro: Any, what: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = self.loop.create_task(coro, name=f"{self.name} {what}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _error(self) -> SealError | None:
        f = self.failure
        return SealError(f.reason, f.detail) if f is not None else None

    def _pump(self) -> None:
        """Move sealed bytes from the core to the writer's queue; apply the marks."""
        data = self.core.data_to_send()
        if not data:
            return
        self._queue.append(data)
        self._queued += len(data)
        self._wake.set()
        if self._queued > self._hard:
            self._fail(SessionFailed("buffer", f"outer stream write queue over {self._hard} bytes"))
            self.abort()
        elif not self._paused and self._queued > self._high and self._protocol is not None:
            self._paused = True
            self._protocol.pause_writing()

    def _handle(self, events: list[SealEvent]) -> None:
        for event in events:
            match event:
                case PlaintextReceived(data=data):
                    if self._protocol is not None and not self._lost:
                        try:
                            self._protocol.data_received(data)
                        except Exception as exc:
                            self._protocol_failed("data_received", exc)
                            return
                case HandshakeComplete():
                    try:
                        protocol = self._factory(event)
                    except Exception as exc:  # a bug, or the owner refusing late
                        log.exception("session protocol factory failed")
                        self._fail(SessionFailed("other", f"protocol factory: {exc}"))
                        self.abort()
                        return
                    self._protocol = protocol
                    if not self.established.done():
                        self.established.set_result(event)
                    protocol.connection_made(self)
                case SessionClosed():
                    if self._protocol is not None and not self._lost:
                        try:
                            self._protocol.eof_received()
                        except Exception as exc:
                            self._protocol_failed("eof_received", exc)
                            return
                    self.close()
                case SessionFailed():
                    self._fail(event)
                    self._pump()  # the alert, or our refusal, goes out before the half-close
                    self._closing = True
                    self._wake.set()
                    self._lose(self._error())

    def _protocol_failed(self, call: str, exc: Exception) -> None:
        """The inner protocol raised on what the peer sent (a bug the peer can reach):
        fail and abort this session, as asyncio's own transports do, instead of letting
        the exception end the reader and leave the session open until its keepalive.
        Logged once, with the exception's type only: its text may quote the peer's bytes."""
        what = f"inner protocol {call}() raised {type(exc).__name__}"
        log.error("session %s: %s; aborting the session", self.name, what)
        self._fail(SessionFailed("other", what))
        self.abort()

    def _fail(self, failure: SessionFailed) -> None:
        if self.failure is None:
            self.failure = failure
        if not self.established.done():
            self.established.set_exception(SealError(failure.reason, failure.detail))
            self.established.exception()  # retrieved: a caller may never await it

    def _lose(self, exc: Exception | None) -> None:
        """Tell the protocol once (soon, like asyncio's transports)."""
        if self._lost:
            return
        self._lost = True
        if self._protocol is not None:
            self.loop.call_soon(self._protocol.connection_lost, exc)
        if not self.established.done():
            failure = self.failure or SessionFailed("eof", "closed before the handshake")
            self._fail(failure)

    def _settle(self) -> None:
        if not self.finished.done():
            self.finished.set_result(self.failure)

    async def _read_loop(self) -> None:
        try:
            while self.core.state in ("handshake", "open") and not self._lost:
                await self._reading.wait()
                try:
                    data = await self.outer.read(self._read_size)
                except StreamResetError as exc:
                    name = ErrorCode.name_of(exc.code)
                    self._handle([SessionFailed("outer_reset", f"outer stream reset ({name})")])
                    break
                self._handle(self.core.receive_data(data))
                self._pump()
            await self._linger_then_reset()
        finally:
            self._settle()

    async def _linger_then_reset(self) -> None:
        """After the session ended: read the peer's remaining bytes (unread, bounded by
        the outer window) until its half-close, then give up with a reset."""
        with contextlib.suppress(TimeoutError, StreamResetError):
            async with asyncio.timeout(self._linger):
                while await self.outer.read(self._read_size):
                    pass
                if self._writer is not None:  # our own half-close
                    await asyncio.wait({self._writer})
                return
        with contextlib.suppress(Exception):
            self.outer.reset(ErrorCode.CANCEL)

    async def _write_loop(self) -> None:
        outer = self.outer
        try:
            while True:
                while not self._queue:
                    if self._closing:
                        await outer.write_eof()
                        return
                    self._wake.clear()
                    await self._wake.wait()
                chunk = self._take()
                await outer.write(chunk)
                self._queued -= len(chunk)
                if self._paused and self._queued <= self._low:
                    self._paused = False
                    if self._protocol is not None and not self._lost:
                        self._protocol.resume_writing()
        except StreamResetError as exc:
            name = ErrorCode.name_of(exc.code)
            self._handle([SessionFailed("outer_reset", f"outer stream reset ({name})")])

    def _take(self) -> bytes:
        queue = self._queue
        if len(queue) == 1 or len(queue[0]) >= WRITE_BATCH:
            return queue.popleft()
        parts, size = [], 0
        while queue and size + len(queue[0]) <= WRITE_BATCH:
            part = queue.popleft()
            parts.append(part)
            size += len(part)
        return b"".join(parts)


def sealed_peer(stream: object) -> Identity | None:
    """The identity of the device (or agent) at the other end of an inner stream, from the
    inner TLS certificate; None for a stream that is not inside a sealed session (an
    outer link's peer is the gateway, which vouches for nobody)."""
    link = getattr(stream, "link", None)
    if link is None or not isinstance(getattr(link, "transport", None), SealTransport):
        return None
    peer = getattr(link, "peer", None)
    return peer if isinstance(peer, Identity) else None
