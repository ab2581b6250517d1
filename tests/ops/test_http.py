"""The metrics/health listener (relay.ops.http) over real loopback connections: its
connection cap and its deadline for a request head (relay.ops.admission)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from relay.ops.admission import ConnectionLimits
from relay.ops.config import Address
from relay.ops.http import LIMITS, AdminServer

HOST = "127.0.0.1"
WAIT = 10.0  # an upper bound on every wait; never an assertion on time

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def until(check: Callable[[], bool]) -> None:
    for _ in range(int(WAIT / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def closed(reader: asyncio.StreamReader) -> bytes:
    """What the server sent before it closed the connection (it must close it)."""
    async with asyncio.timeout(WAIT):
        try:
            return await reader.read()
        except ConnectionResetError:
            return b""


async def started(limits: ConnectionLimits) -> AdminServer:
    admin = AdminServer(Address(HOST, 0), CollectorRegistry(), lambda: (True, "ready"),
                        limits=limits)  # fmt: skip
    await admin.start()
    return admin


@pytest.fixture
async def conns() -> AsyncIterator[list[Conn]]:
    opened: list[Conn] = []
    yield opened
    for _, writer in opened:
        writer.close()


async def healthz(admin: AdminServer) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://{HOST}:{admin.port}/healthz") as r,
    ):
        return r.status


def test_the_metrics_listener_defaults_are_a_handful_of_connections() -> None:
    assert LIMITS.max_connections == 8 and LIMITS.busy is None


async def test_a_connection_over_the_cap_is_closed_at_once_and_counted(
    conns: list[Conn],
) -> None:
    admin = await started(ConnectionLimits(max_connections=3, head_timeout=60.0))
    try:
        assert admin.admission is not None
        for _ in range(3):
            conns.append(await asyncio.open_connection(HOST, admin.port))
        await until(lambda: admin.admission is not None and admin.admission.open == 3)
        reader, writer = await asyncio.open_connection(HOST, admin.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await closed(reader) == b""  # nothing read, nothing answered
        writer.close()
        assert admin.admission.over_cap == 1
        conns.pop()[1].close()
        await until(lambda: admin.admission is not None and admin.admission.open == 2)
        assert await healthz(admin) == 200  # a place again
        text = (await _scrape(admin)).decode()
        assert "relay_metrics_connections_over_limit_total 1.0" in text
    finally:
        await admin.stop()


async def _scrape(admin: AdminServer) -> bytes:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://{HOST}:{admin.port}/metrics") as r,
    ):
        return await r.read()


async def test_half_a_head_then_silence_is_closed_at_the_deadline(conns: list[Conn]) -> None:
    """A slowloris: the request line and one header, then nothing. Closed once the head
    is overdue; an honest request is served meanwhile."""
    admin = await started(ConnectionLimits(max_connections=4, head_timeout=1.0))
    try:
        assert admin.admission is not None
        reader, writer = await asyncio.open_connection(HOST, admin.port)
        conns.append((reader, writer))
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        silent = await asyncio.open_connection(HOST, admin.port)  # not a byte
        conns.append(silent)
        assert await healthz(admin) == 200
        assert await closed(reader) == b""
        assert await closed(silent[0]) == b""
        assert admin.admission.timed_out == 2
        await until(lambda: admin.admission is not None and admin.admission.open == 0)
    finally:
        await admin.stop()


async def test_a_later_head_on_a_kept_alive_connection_has_the_same_deadline(
    conns: list[Conn],
) -> None:
    admin = await started(ConnectionLimits(max_connections=4, head_timeout=1.0))
    try:
        reader, writer = await asyncio.open_connection(HOST, admin.port)
        conns.append((reader, writer))
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(WAIT):
            assert (await reader.readuntil(b"ok\n")).startswith(b"HTTP/1.1 200 ")
        writer.write(b"GET /healthz HTTP/1.1\r\nHo")  # the next one, never finished
        assert await closed(reader) == b""
    finally:
        await admin.stop()


async def test_stop_ends_connections_still_on_their_way_in(conns: list[Conn]) -> None:
    admin = await started(ConnectionLimits(max_connections=4, head_timeout=60.0))
    reader, writer = await asyncio.open_connection(HOST, admin.port)
    conns.append((reader, writer))
    await until(lambda: admin.admission is not None and admin.admission.open == 1)
    await admin.stop()
    assert await closed(reader) == b""
