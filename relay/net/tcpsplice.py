"""Splicing a relay stream with a TCP connection, as the two ends of a forwarded port do.

Both directions run at once and keep TCP's semantics across the tunnel:

- half-close: a FIN from the TCP peer becomes the stream's write_eof, and the stream's
  EOF becomes a FIN (shutdown(SHUT_WR)) towards the TCP peer; the other direction
  carries on until it ends too;
- abort: a TCP error (RST, broken pipe) resets the stream with CANCEL; a reset stream
  aborts the socket with an RST (SO_LINGER 0), so neither side mistakes it for an end;
- bounded memory: one read of at most `read_size` per direction in flight, and writes
  to the socket wait on drain() above the transport's high-water mark, so a slow
  reader on either side stops the credit (or the TCP window) of its writer;
- optional bounds in time (the workstation's forwards use them): a TCP peer that takes
  nothing for `stall_timeout` while our bytes wait for it is reset (STALLED), and a
  connection with no byte either way for `idle_timeout` is closed (IDLE: the stream
  reset, a FIN towards the peer), so neither holds its stream's window or a slot forever.

`splice` returns when both directions are done and leaves no task behind, also when
cancelled (then the stream is reset and the socket aborted). The socket is closed when
it returns: one whose peer does not take the FIN and our last bytes within
CLOSE_TIMEOUT is aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass
from enum import Enum
from typing import Final

from relay.net.bytestream import ByteStream, StreamResetError
from relay.proto import ErrorCode

__all__ = ["READ_SIZE", "SpliceResult", "SpliceStats", "abort_socket", "splice", "tune_socket"]

READ_SIZE: Final = 64 * 1024
WRITE_HIGH: Final = 256 * 1024  # transport buffer towards the TCP peer before drain() waits
CLOSE_TIMEOUT: Final = 5.0


class SpliceResult(Enum):
    """How a splice ended, for logs and metrics."""

    CLOSED = "closed"  # both directions ended cleanly
    STREAM_RESET = "stream_reset"  # the stream was reset (by the peer or a codec)
    TCP_ERROR = "tcp_error"  # the TCP connection failed; the stream was reset
    STALLED = "stalled"  # the TCP peer took nothing for stall_timeout; both reset
    IDLE = "idle"  # nothing moved either way for idle_timeout; stream reset, FIN sent


@dataclass
class SpliceStats:
    """Bytes moved by one splice (application bytes: before compression, if any)."""

    tcp_to_stream: int = 0
    stream_to_tcp: int = 0
    reset_code: int | None = None


class _StreamGone(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class _TcpGone(Exception):
    pass


class _Stalled(Exception):
    pass


class _Moved:
    """When bytes last moved, either way (loop time): what idle_timeout is measured on."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.at = loop.time()

    def now(self) -> None:
        self.at = self.loop.time()


def tune_socket(writer: asyncio.StreamWriter) -> None:
    """TCP_NODELAY (small messages must not wait) and keepalive on one of our sockets."""
    # uvloop hands out a placeholder with fd -1 once the transport is closed: ValueError.
    with contextlib.suppress(OSError, ValueError):
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def abort_socket(writer: asyncio.StreamWriter) -> None:
    """Close with an RST rather than a FIN, so the peer sees an abort, not an end; also
    after close(), whose buffered bytes and FIN the peer never took (the kernel drops
    them at once instead of keeping them for a peer that does not read)."""
    # A socket the transport has closed already: EBADF (OSError), or uvloop's
    # placeholder with fd -1 (ValueError); then abort() has nothing left to do.
    with contextlib.suppress(OSError, ValueError):
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _tcp_to_stream(
    reader: asyncio.StreamReader,
    stream: ByteStream,
    read_size: int,
    stats: SpliceStats,
    moved: _Moved,
) -> None:
    while True:
        try:
            data = await reader.read(read_size)
        except (ConnectionError, OSError) as exc:
            raise _TcpGone(str(exc)) from None
        moved.now()
        try:
            if not data:
                await stream.write_eof()
                return
            await stream.write(data)
        except StreamResetError as exc:
            raise _StreamGone(exc.code) from None
        stats.tcp_to_stream += len(data)


async def _stream_to_tcp(
    stream: ByteStream,
    writer: asyncio.StreamWriter,
    read_size: int,
    stats: SpliceStats,
    *,
    moved: _Moved,
    stall_timeout: float | None,
) -> None:
    while True:
        try:
            data = await stream.read(read_size)
        except StreamResetError as exc:
            raise _StreamGone(exc.code) from None
        moved.now()
        try:
            if not data:
                if writer.can_write_eof() and not writer.is_closing():
                    writer.write_eof()
                return
            writer.write(data)
            await _drain(writer, moved, stall_timeout)
        except (ConnectionError, OSError, RuntimeError) as exc:
            raise _TcpGone(str(exc)) from None
        stats.stream_to_tcp += len(data)


async def _drain(writer: asyncio.StreamWriter, moved: _Moved, stall_timeout: float | None) -> None:
    """writer.drain(), but a peer that takes none of our buffered bytes for
    `stall_timeout` raises _Stalled. Taking any counts (the buffer shrank), so a slow
    reader is not a stalled one; looked at four times per timeout."""
    if stall_timeout is None:
        await writer.drain()
        return
    transport = writer.transport
    left = transport.get_write_buffer_size()
    taken_at = moved.loop.time()
    while True:
        try:
            async with asyncio.timeout(stall_timeout / 4):
                await writer.drain()
            return
        except TimeoutError:
            now_left = transport.get_write_buffer_size()
            if now_left < left:
                left, taken_at = now_left, moved.loop.time()
                moved.now()
            elif moved.loop.time() - taken_at >= stall_timeout:
                raise _Stalled from None


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close; a peer that has not taken our last bytes and FIN within CLOSE_TIMEOUT (one
    that half-closed and stopped reading) gets an RST: close() alone would keep the
    socket and its buffer for as long as that peer lives."""
    writer.close()
    closed = False
    with contextlib.suppress(Exception):
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await writer.wait_closed()
        closed = True
    if not closed:
        abort_socket(writer)


async def splice(
    stream: ByteStream,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    read_size: int = READ_SIZE,
    stats: SpliceStats | None = None,
    stall_timeout: float | None = None,
    idle_timeout: float | None = None,
) -> SpliceResult:
    """Move bytes both ways until both directions end; see the module docstring."""
    stats = stats if stats is not None else SpliceStats()
    tune_socket(writer)
    with contextlib.suppress(AttributeError, NotImplementedError):
        writer.transport.set_write_buffer_limits(high=WRITE_HIGH)
    moved = _Moved(asyncio.get_running_loop())
    up = asyncio.ensure_future(_tcp_to_stream(reader, stream, read_size, stats, moved))
    down = asyncio.ensure_future(
        _stream_to_tcp(stream, writer, read_size, stats, moved=moved, stall_timeout=stall_timeout)
    )
    tasks = {up, down}
    result = SpliceResult.CLOSED
    try:
        pending = tasks
        while pending:
            timeout = None
            if idle_timeout is not None:
                timeout = max(0.0, moved.at + idle_timeout - moved.loop.time())
            done, pending = await asyncio.wait(
                pending, timeout=timeout, return_when=asyncio.FIRST_EXCEPTION
            )
            if idle_timeout is not None and not done:
                if moved.loop.time() - moved.at < idle_timeout:
                    continue
                stats.reset_code = ErrorCode.CANCEL
                result = SpliceResult.IDLE
                stream.reset(ErrorCode.CANCEL)
                break  # _close sends the peer a FIN
            error = next((t.exception() for t in done if t.exception() is not None), None)
            if isinstance(error, _Stalled):
                stats.reset_code = ErrorCode.CANCEL
                result = SpliceResult.STALLED
                stream.reset(ErrorCode.CANCEL)
                abort_socket(writer)
                break
            if isinstance(error, _StreamGone):
                stats.reset_code = error.code
                result = SpliceResult.STREAM_RESET
                abort_socket(writer)
                break
            if error is not None:  # _TcpGone, or a bug: never leave the stream dangling
                stats.reset_code = ErrorCode.CANCEL
                result = SpliceResult.TCP_ERROR
                stream.reset(ErrorCode.CANCEL)
                abort_socket(writer)
                if not isinstance(error, _TcpGone):
                    raise error
                break
    except asyncio.CancelledError:
        stats.reset_code = ErrorCode.CANCEL
        stream.reset(ErrorCode.CANCEL)
        abort_socket(writer)
        raise
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await _close(writer)
    return result
