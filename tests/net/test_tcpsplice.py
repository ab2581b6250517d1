"""Splicing a ByteStream with a real loopback TCP connection."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import os
import socket
import struct
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, cast

import pytest

from relay.net import tcpsplice
from relay.net.bytestream import ByteStream, StreamResetError, pipe
from relay.net.compression import CodecStream
from relay.net.tcpsplice import WRITE_HIGH, SpliceResult, SpliceStats, splice
from relay.proto import ErrorCode
from tests.pki_helpers import LOOP_KINDS, run

HOST = "127.0.0.1"
WAIT = 10.0


def on_both_loops(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on asyncio's loop and on uvloop (production), whose transports differ."""
    signature = inspect.signature(fn)

    def test(loop_kind: Any, **kwargs: Any) -> None:
        run(loop_kind, fn(**kwargs))

    loop_param = inspect.Parameter("loop_kind", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    test.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[loop_param, *signature.parameters.values()]
    )
    test.__name__, test.__doc__ = fn.__name__, fn.__doc__
    marked: Callable[..., None] = pytest.mark.parametrize("loop_kind", LOOP_KINDS)(test)
    return marked


@dataclass
class Rig:
    """A spliced pair: `stream` is the far end of the relay stream, `client` a TCP peer."""

    stream: ByteStream
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    task: asyncio.Task[SpliceResult]
    stats: SpliceStats
    server_writer: asyncio.StreamWriter


@contextlib.asynccontextmanager
async def listener() -> AsyncIterator[
    tuple[int, asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
]:
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def on_client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await accepted.put((r, w))

    server = await asyncio.start_server(on_client, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, accepted
    finally:
        server.close()
        await server.wait_closed()


async def make_rig(
    port: int,
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
    codec: bool = False,
    *,
    stall_timeout: float | None = None,
    idle_timeout: float | None = None,
    rcvbuf: int | None = None,
) -> Rig:
    near, far = pipe({"codec": "zstd"} if codec else {})
    if codec:
        near, far = CodecStream(near, True), CodecStream(far, True)
    sock = socket.socket()
    if rcvbuf is not None:  # before connecting: the TCP window follows it
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (HOST, port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s_reader, s_writer = await asyncio.wait_for(accepted.get(), WAIT)
    stats = SpliceStats()
    task = asyncio.create_task(
        splice(
            near,
            s_reader,
            s_writer,
            stats=stats,
            stall_timeout=stall_timeout,
            idle_timeout=idle_timeout,
        )
    )
    return Rig(far, reader, writer, task, stats, s_writer)


async def read_all_stream(stream: ByteStream) -> bytes:
    parts = []
    while chunk := await stream.read():
        parts.append(chunk)
    return b"".join(parts)


async def write_stream(stream: ByteStream, data: bytes, step: int = 100_000) -> None:
    for i in range(0, len(data), step):
        await stream.write(data[i : i + step])
    await stream.write_eof()


async def write_tcp(writer: asyncio.StreamWriter, data: bytes, step: int = 100_000) -> None:
    for i in range(0, len(data), step):
        writer.write(data[i : i + step])
        await writer.drain()
    writer.write_eof()


def pipe_full(far: ByteStream) -> bool:
    """The in-memory stream towards the splice holds all it may: its reader stopped."""
    near: Any = getattr(far, "peer")  # noqa: B009 - relay.net.bytestream's pipe end
    return bool(near._inbox_bytes >= near._limit)


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll a state that has no event to wait on (bounded)."""
    async with asyncio.timeout(WAIT):
        while not condition():  # noqa: ASYNC110 - polling plain state
            await asyncio.sleep(0.01)


def rst_close(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@pytest.mark.parametrize("codec", [False, True])
@on_both_loops
async def test_bytes_both_ways(codec: bool) -> None:
    up, down = os.urandom(3_000_000), os.urandom(2_000_000) + bytes(2_000_000)
    async with listener() as (port, accepted):
        rig = await make_rig(port, accepted, codec)
        async with asyncio.timeout(WAIT * 3):
            _, _, got_up, got_down = await asyncio.gather(
                write_tcp(rig.writer, up),
                write_stream(rig.stream, down),
                read_all_stream(rig.stream),
                rig.reader.read(),
            )
            assert await rig.task is SpliceResult.CLOSED
    assert hashlib.sha256(got_up).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(got_down).digest() == hashlib.sha256(down).digest()
    assert (rig.stats.tcp_to_stream, rig.stats.stream_to_tcp) == (len(up), len(down))
    rig.writer.close()


@on_both_loops
async def test_tcp_half_close_reaches_the_stream_and_the_reply_still_flows() -> None:
    async with listener() as (port, accepted):
        rig = await make_rig(port, accepted)
        async with asyncio.timeout(WAIT):
            rig.writer.write(b"request")
            rig.writer.write_eof()  # client: shutdown(SHUT_WR)
            assert await read_all_stream(rig.stream) == b"request"  # EOF arrived
            assert not rig.task.done()
            await rig.stream.write(b"reply after the client's FIN")
            assert await rig.reader.readexactly(28) == b"reply after the client's FIN"
            await rig.stream.write_eof()
            assert await rig.reader.read() == b""
            assert await rig.task is SpliceResult.CLOSED
        rig.writer.close()


@on_both_loops
async def test_stream_half_close_reaches_tcp_and_the_client_can_still_send() -> None:
    async with listener() as (port, accepted):
        rig = await make_rig(port, accepted)
        async with asyncio.timeout(WAIT):
            await rig.stream.write(b"banner")
            await rig.stream.write_eof()
            assert await rig.reader.read() == b"banner"  # FIN seen by the client
            rig.writer.write(b"late data")
            await rig.writer.drain()
            assert await rig.stream.read() == b"late data"
            rig.writer.write_eof()
            assert await rig.stream.read() == b""
            assert await rig.task is SpliceResult.CLOSED
        rig.writer.close()


@on_both_loops
async def test_stream_reset_aborts_the_socket_with_rst() -> None:
    async with listener() as (port, accepted):
        rig = await make_rig(port, accepted)
        async with asyncio.timeout(WAIT):
            await rig.stream.write(b"partial")
            assert await rig.reader.readexactly(7) == b"partial"
            rig.stream.reset(ErrorCode.INTERNAL_ERROR)
            assert await rig.task is SpliceResult.STREAM_RESET
            with pytest.raises(ConnectionResetError):
                await rig.reader.read()  # an RST, not a clean FIN
        assert rig.stats.reset_code == ErrorCode.INTERNAL_ERROR
        rig.writer.close()


@on_both_loops
async def test_tcp_reset_resets_the_stream() -> None:
    async with listener() as (port, accepted):
        rig = await make_rig(port, accepted)
        async with asyncio.timeout(WAIT):
            rig.writer.write(b"hello")
            await rig.writer.drain()
            assert await rig.stream.read() == b"hello"
            rst_close(rig.writer)
            with pytest.raises(StreamResetError) as info:
                await rig.stream.read()
            assert info.value.code == ErrorCode.CANCEL
            assert await rig.task is SpliceResult.TCP_ERROR


@on_both_loops
async def test_tcp_reset_while_the_stream_writes() -> None:
    async with listener() as (port, accepted):
        rig = await make_rig(port, accepted)
        rst_close(rig.writer)
        with pytest.raises(StreamResetError):
            async with asyncio.timeout(WAIT):
                for _ in range(1000):
                    await rig.stream.write(bytes(65536))
        assert await asyncio.wait_for(rig.task, WAIT) is SpliceResult.TCP_ERROR


@on_both_loops
async def test_twenty_concurrent_splices() -> None:
    async with listener() as (port, accepted):
        rigs = [await make_rig(port, accepted, codec=i % 2 == 0) for i in range(20)]

        async def exchange(i: int, rig: Rig) -> None:
            up = os.urandom(50_000 + i * 1000)
            down = bytes([i]) * (80_000 + i)
            _, _, got_up, got_down = await asyncio.gather(
                write_tcp(rig.writer, up, 7000),
                write_stream(rig.stream, down, 9000),
                read_all_stream(rig.stream),
                rig.reader.read(),
            )
            assert (got_up, got_down) == (up, down)
            assert await rig.task is SpliceResult.CLOSED
            rig.writer.close()

        async with asyncio.timeout(WAIT * 3):
            await asyncio.gather(*(exchange(i, r) for i, r in enumerate(rigs)))


@on_both_loops
async def test_cancel_resets_the_stream_and_leaves_no_task() -> None:
    async with listener() as (port, accepted):
        before = asyncio.all_tasks()
        rig = await make_rig(port, accepted)
        await rig.stream.write(b"x")
        assert await asyncio.wait_for(rig.reader.readexactly(1), WAIT) == b"x"
        rig.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await rig.task
        with pytest.raises(StreamResetError) as info:
            await rig.stream.read()
        assert info.value.code == ErrorCode.CANCEL
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(rig.reader.read(), WAIT)
        await asyncio.sleep(0)
        assert asyncio.all_tasks() - before - {asyncio.current_task()} == set()
        rig.writer.close()


@on_both_loops
async def test_a_client_that_does_not_read_stops_the_stream_writer() -> None:
    """Bounded buffers: the socket's buffer stays near the high-water mark, the writer waits."""
    async with listener() as (port, accepted):
        rig = await make_rig(port, accepted)
        # uvloop's transports do not subclass asyncio.ReadTransport: cast, as relay.net.aio does
        cast(asyncio.Transport, rig.writer.transport).pause_reading()  # the client stops reading
        total = 200 * 1024 * 1024

        async def flood() -> None:
            chunk = bytes(1024 * 1024)
            for _ in range(total // len(chunk)):
                await rig.stream.write(chunk)

        writer = asyncio.create_task(flood())
        # Saturated: the splice stopped reading the stream, whose buffer is now full (one
        # that kept reading would empty it into an ever larger socket buffer instead).
        await wait_until(lambda: pipe_full(rig.stream))
        assert not writer.done()
        transport_buffer = rig.server_writer.transport.get_write_buffer_size()
        assert transport_buffer <= WRITE_HIGH + 64 * 1024
        assert rig.stats.stream_to_tcp < total
        writer.cancel()
        rig.task.cancel()
        await asyncio.gather(writer, rig.task, return_exceptions=True)
        rig.writer.close()


async def _fill_socket(rig: Rig, level: int = WRITE_HIGH) -> None:
    """The far end writes until the splice's socket buffer holds `level` bytes (the client
    reads nothing): bytes wait for the TCP peer (and, past WRITE_HIGH, the splice too)."""
    transport = rig.server_writer.transport
    async with asyncio.timeout(WAIT):
        while transport.get_write_buffer_size() < level:
            await rig.stream.write(bytes(16384))
            await asyncio.sleep(0)


@on_both_loops
async def test_socket_closed_when_a_half_closed_peer_does_not_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A peer that half-closed and stopped reading used to keep our socket and its buffer
    after splice returned (close() marks the transport closing, so the abort meant for
    after CLOSE_TIMEOUT never ran): the fd was gone only when that peer went away."""
    monkeypatch.setattr(tcpsplice, "CLOSE_TIMEOUT", 0.2)
    async with listener() as (port, accepted):
        rig = await make_rig(port, accepted, rcvbuf=4096)
        rig.writer.write_eof()  # the client's request is complete; it reads no answer
        assert await asyncio.wait_for(rig.stream.read(), WAIT) == b""
        await _fill_socket(rig, WRITE_HIGH // 2)  # below the mark: the splice can end
        await rig.stream.write_eof()
        assert await asyncio.wait_for(rig.task, WAIT) is SpliceResult.CLOSED
        sock = rig.server_writer.get_extra_info("socket")
        await wait_until(lambda: sock.fileno() == -1)  # closed: fd and buffer freed
        assert rig.server_writer.transport.get_write_buffer_size() == 0
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(rig.reader.read(), WAIT)  # aborted, not a late FIN
        rig.writer.close()


@on_both_loops
async def test_a_peer_that_takes_nothing_is_reset_after_the_stall_timeout() -> None:
    async with listener() as (port, accepted):
        rig = await make_rig(port, accepted, stall_timeout=0.4, rcvbuf=4096)
        await _fill_socket(rig)
        assert await asyncio.wait_for(rig.task, WAIT) is SpliceResult.STALLED
        assert rig.stats.reset_code == ErrorCode.CANCEL
        with pytest.raises(StreamResetError):
            async with asyncio.timeout(WAIT):
                while True:  # the far end's writes fail once the reset arrives
                    await rig.stream.write(bytes(16384))
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(WAIT):
                while await rig.reader.read(65536):
                    pass
        rig.writer.close()


@on_both_loops
async def test_a_slow_reader_is_not_a_stalled_one() -> None:
    """Taking anything restarts the stall timeout: a program that reads slowly keeps its
    connection, however long the whole takes."""
    async with listener() as (port, accepted):
        rig = await make_rig(port, accepted, stall_timeout=0.4, rcvbuf=4096)
        total = 3 * 1024 * 1024
        sender = asyncio.create_task(write_stream(rig.stream, bytes(total), 65536))
        got = 0
        async with asyncio.timeout(WAIT * 3):
            while chunk := await rig.reader.read(8192):
                got += len(chunk)
                await asyncio.sleep(0.004)  # about 2 MB/s: each stall check sees progress
        assert got == total
        await sender
        rig.writer.write_eof()
        assert await asyncio.wait_for(rig.task, WAIT) is SpliceResult.CLOSED
        rig.writer.close()


@on_both_loops
async def test_a_connection_idle_both_ways_is_closed() -> None:
    async with listener() as (port, accepted):
        rig = await make_rig(port, accepted, idle_timeout=0.3)
        async with asyncio.timeout(WAIT):
            for _ in range(6):  # 0.6 s in all, but never 0.3 s without a byte
                rig.writer.write(b"k")
                assert await rig.stream.read() == b"k"
                await asyncio.sleep(0.1)
            assert not rig.task.done()
            assert await rig.task is SpliceResult.IDLE  # now idle
            assert await rig.reader.read() == b""  # a FIN: a kept-alive client reconnects
            with pytest.raises(StreamResetError):
                await rig.stream.read()
        rig.writer.close()
