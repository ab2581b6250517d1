"""Forwarded connections that misbehave must not hurt the session or the other forwards.

The whole chain in-process (gateway, agent, workstation, real TLS, real sockets): local
programs that stop reading their downloads, or hold idle kept-alive connections, while
another program uses another forward. Timeouts are made short through the Forwarder's
attributes; the defaults (STALL_TIMEOUT, IDLE_TIMEOUT) are minutes of a test.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.net.aio import Link
from relay.ops.config import Address
from relay.workstation.forwardbudget import FORWARD_BUFFER_LIMIT
from relay.workstation.service import Workstation
from tests.ends_helpers import (
    WAIT,
    agent_config,
    device_identity_dir,
    forward_zero,
    forwarded,
    running_gateway,
    tcp_exchange,
    tcp_service,
    wait_until,
    workstation_config,
)
from tests.pki_helpers import make_pki
from tests.workstation.test_ws_forward import agent_up, workstation_up

STALLED = 20  # 20 x 1 MiB stream windows: more than the session's 16 MiB link window


async def download(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A service that answers a request with an endless download (a report archive)."""
    with contextlib.suppress(Exception):
        await reader.read(100)
        chunk = b"d" * 65536
        while True:
            writer.write(chunk)
            await writer.drain()


@dataclass
class Chain:
    ws: Workstation

    def port(self, service: str) -> Address:
        return forwarded(self.ws, service)


@pytest.fixture
async def chain(tmp_path: Path) -> AsyncIterator[Chain]:
    pki = make_pki(tmp_path / "pki")
    async with (
        running_gateway(pki, tmp_path) as gw,
        tcp_service() as echo,
        tcp_service(download) as dl,
    ):
        services = {"echo": (echo.port, False), "dl": (dl.port, False)}
        a_config = agent_config(pki, tmp_path, [gw.port], services)
        w_config = workstation_config(
            device_identity_dir(pki, tmp_path), tmp_path, gw.port, forward_zero("echo", "dl")
        )
        async with agent_up(a_config), workstation_up(w_config) as (ws, _, _):
            await asyncio.wait_for(ws.kept.up.wait(), WAIT)
            await wait_until(lambda: gw.server.router.sites() == ["main"])
            yield Chain(ws)


def _stalled_downloads(address: Address, count: int) -> list[socket.socket]:
    """A program that asks for downloads and never reads them."""
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((address.host, address.port))
        sock.sendall(b"GET /archive\n")
        socks.append(sock)
    return socks


def _unread(ws: Workstation) -> int:
    """Bytes the session's inner Link holds unread, over all its streams."""
    links: set[Link] = ws.session.links
    return sum(s.unacked for link in links for s in link.conn._streams.values())


async def _steady(ws: Workstation) -> int:
    """Wait until the stalled streams hold all they can (no change for 0.3 s)."""
    last, since = -1, time.monotonic()
    async with asyncio.timeout(WAIT):
        while time.monotonic() - since < 0.3:
            await asyncio.sleep(0.05)
            now = _unread(ws)
            if now != last:
                last, since = now, time.monotonic()
    return last


async def test_stalled_downloads_leave_the_session_to_another_program(chain: Chain) -> None:
    """Twenty forwarded downloads whose program stops reading used to hold the whole
    link window (1 MiB unread each): every other stream of the session, here another
    program's forward, got no answer until they were closed."""
    socks = _stalled_downloads(chain.port("dl"), STALLED)
    try:
        unread = await _steady(chain.ws)
        budget, outcomes = chain.ws.session.forward_budget, chain.ws.forwarder.stats.outcomes
        before = (budget.evicted, outcomes["stream_reset"], outcomes["stalled"])
        got = await asyncio.wait_for(tcp_exchange(chain.port("echo"), b"hello"), WAIT)
        assert got == b"hello"
        # Answered while the stalled downloads still held what they held: none of them was
        # reset (the forward budget) or ended (the stall timeout) to make room, which is
        # how the echo got through when they held the whole link window. Counts, not a
        # clock: a slow machine cannot fail this, a regression does.
        assert (budget.evicted, outcomes["stream_reset"], outcomes["stalled"]) == before
        assert _unread(chain.ws) >= unread
        # Each held most of its own window, far beyond the link credit it holds (the rest
        # waits in the socket buffers), until together they met the forward budget
        # (test_forward_budget.py): here about 16 MiB, and beyond it the longest unread
        # are reset.
        assert 8 * 1024 * 1024 < unread <= FORWARD_BUFFER_LIMIT
    finally:
        for sock in socks:
            sock.close()


async def test_a_stalled_download_is_reset_and_frees_its_slot(chain: Chain) -> None:
    forwarder = chain.ws.forwarder
    forwarder.stall_timeout = 0.5
    socks = _stalled_downloads(chain.port("dl"), 4)
    try:
        await wait_until(lambda: forwarder.stats.outcomes["stalled"] == 4)
        assert forwarder.active == 0
        for sock in socks:
            sock.settimeout(WAIT)
            with pytest.raises(ConnectionResetError):
                while sock.recv(65536):
                    pass
    finally:
        for sock in socks:
            sock.close()
    assert await asyncio.wait_for(tcp_exchange(chain.port("echo"), b"still"), WAIT) == b"still"


async def test_one_forwards_idle_connections_do_not_refuse_another_forward(chain: Chain) -> None:
    """All 256 slots used to be one pool: a program holding that many idle kept-alive
    connections to one service made every other forward answer with an RST."""
    forwarder = chain.ws.forwarder
    forwarder.share = 4
    echo = chain.port("echo")
    held = [await asyncio.open_connection(echo.host, echo.port) for _ in range(4)]
    try:
        await wait_until(lambda: forwarder.active == 4)
        with pytest.raises(ConnectionResetError):  # over this forward's share
            await asyncio.wait_for(tcp_exchange(echo, b"fifth"), WAIT)
        assert forwarder.stats.refused == 1
        # Another forward still has its own share.
        dl = chain.port("dl")
        reader, writer = await asyncio.open_connection(dl.host, dl.port)
        writer.write(b"GET /archive\n")
        assert len(await asyncio.wait_for(reader.readexactly(1000), WAIT)) == 1000
        writer.close()
    finally:
        for _, writer in held:
            writer.close()


async def test_idle_connections_are_closed_and_free_their_share(chain: Chain) -> None:
    forwarder = chain.ws.forwarder
    forwarder.share = 2
    forwarder.idle_timeout = 0.4
    echo = chain.port("echo")
    held = [await asyncio.open_connection(echo.host, echo.port) for _ in range(2)]
    try:
        for reader, _ in held:  # closed with a FIN, as a server ends a kept-alive connection
            assert await asyncio.wait_for(reader.read(), WAIT) == b""
        await wait_until(lambda: forwarder.stats.outcomes["idle"] == 2 and forwarder.active == 0)
        assert await asyncio.wait_for(tcp_exchange(echo, b"again"), WAIT) == b"again"
    finally:
        for _, writer in held:
            writer.close()


def test_each_forward_gets_a_share_of_the_connections() -> None:
    from relay.workstation.forward import MAX_CONNECTIONS, MIN_SHARE, Forwarder

    def share(forwards: int, limit: int = MAX_CONNECTIONS) -> int:
        addresses = {Address(f"127.0.0.{i + 1}", 0): f"s{i}" for i in range(forwards)}
        return Forwarder(None, addresses, max_connections=limit).share  # type: ignore[arg-type]

    assert share(1) == MAX_CONNECTIONS
    assert share(4) == MAX_CONNECTIONS // 4
    assert share(100) == MIN_SHARE
    assert share(1, limit=8) == 8  # never more than the whole
