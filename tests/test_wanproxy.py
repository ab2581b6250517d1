"""Correctness of the benchmarks' WAN-delay proxy (tests/bench/wanproxy.py) over loopback.

These check the tool (it adds at least the delay it is told, its rate limit holds, its
buffers stay bounded), not the speed of our product.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tests.bench.wanproxy import QUANTUM, WanProxy, parse_delay, parse_rate

HOST = "127.0.0.1"
WAIT = 5.0

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[int]:
    srv = await asyncio.start_server(handler, HOST, 0)
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        srv.close()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()


async def roundtrip(port: int, payload: bytes) -> float:
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(HOST, port)
    started = loop.time()
    writer.write(payload)
    await asyncio.wait_for(reader.readexactly(len(payload)), WAIT)
    elapsed = loop.time() - started
    writer.close()
    return elapsed


async def test_adds_at_least_the_delay_each_way() -> None:
    delay = 0.1
    async with server(echo) as port, WanProxy((HOST, port), delay=delay) as proxy:
        rtts = [await roundtrip(proxy.port, b"ping %d" % i) for i in range(3)]
    assert min(rtts) >= 2 * delay


async def test_rate_limit_holds_within_20_percent() -> None:
    rate, size = 2e6, 2_000_000
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[tuple[int, float]] = loop.create_future()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        total = 0
        while data := await reader.read(65536):
            total += len(data)
        finished.set_result((total, loop.time()))
        writer.close()

    async with server(sink) as port, WanProxy((HOST, port), rate=rate) as proxy:
        _, writer = await asyncio.open_connection(HOST, proxy.port)
        started = loop.time()
        writer.write(b"\x00" * size)
        writer.write_eof()
        total, ended = await asyncio.wait_for(finished, WAIT)
        writer.close()
    assert total == size
    measured = size / (ended - started)
    assert 0.8 * rate <= measured <= 1.2 * rate


async def test_buffer_stays_bounded_when_the_receiver_stalls() -> None:
    max_buffer = 4 * QUANTUM
    release = asyncio.Event()

    async def stalled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        writer.close()

    async with (
        server(stalled) as port,
        WanProxy((HOST, port), delay=0.01, max_buffer=max_buffer) as proxy,
    ):
        _, writer = await asyncio.open_connection(HOST, proxy.port)
        writer.write(b"\x00" * (16 * 1024 * 1024))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(writer.drain(), 0.5)
        pipe = proxy.pipes[0]
        assert pipe.max_queued > 0  # it did take data in
        assert pipe.max_queued <= max_buffer
        assert writer.transport.get_write_buffer_size() > 0  # the sender is held back
        release.set()
        writer.transport.abort()


async def test_half_close_and_bytes_pass_through_intact() -> None:
    async def reply_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()
        writer.write(data[::-1])
        writer.close()

    payload = bytes(range(256)) * 1000
    async with server(reply_after_eof) as port, WanProxy((HOST, port), delay=0.005) as proxy:
        reader, writer = await asyncio.open_connection(HOST, proxy.port)
        writer.write(payload)
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(), WAIT)
        writer.close()
    assert got == payload[::-1]


async def test_connections_beyond_the_limit_are_refused() -> None:
    async with server(echo) as port, WanProxy((HOST, port), max_connections=1) as proxy:
        r1, w1 = await asyncio.open_connection(HOST, proxy.port)
        w1.write(b"a")
        assert await asyncio.wait_for(r1.readexactly(1), WAIT) == b"a"
        r2, w2 = await asyncio.open_connection(HOST, proxy.port)
        assert await asyncio.wait_for(r2.read(), WAIT) == b""
        assert proxy.refused == 1
        w1.close()
        w2.close()


def test_parsers() -> None:
    assert parse_rate("100Mbit") == 12.5e6
    assert parse_rate("12.5MB") == 12.5e6
    assert parse_rate("1MiB/s") == 1024 * 1024
    assert parse_rate("500") == 500
    assert parse_delay("40ms") == pytest.approx(0.04)
    assert parse_delay("0.5") == 0.5
    for bad in ("fast", "10 parsecs"):
        with pytest.raises(ValueError):
            parse_rate(bad)
    with pytest.raises(ValueError):
        parse_delay("soon")
    with pytest.raises(ValueError):
        WanProxy((HOST, 1), rate=0)
