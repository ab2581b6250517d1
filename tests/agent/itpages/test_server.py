"""The IT pages' listener (relay.agent.itpages.server) over real HTTPS on loopback: its
connection cap, counted before any TLS handshake, and its deadline for a TLS handshake
and a request head (relay.ops.admission); an honest browser request is served meanwhile."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from relay.agent.itpages.server import LIMITS, ItPagesServer
from relay.ops.admission import ConnectionLimits
from tests.agent.itpages.test_units import agent_with_pages
from tests.ops.test_http import closed, until
from tests.pki_helpers import HOST

WAIT = 10.0  # an upper bound on every wait; never an assertion on time


@dataclass
class Served:
    server: ItPagesServer
    registry: CollectorRegistry
    url: str


@pytest.fixture
def limits() -> ConnectionLimits:
    return ConnectionLimits(max_connections=3, head_timeout=1.0)


@pytest.fixture
async def served(tmp_path: Path, limits: ConnectionLimits) -> AsyncIterator[Served]:
    config, authority = agent_with_pages(
        tmp_path,
        lambda pki: (
            f"{{listen: '{HOST}:0', admins_file: {tmp_path / 'admins'}, "
            # the gateway's certificate names 127.0.0.1
            f"tls: {{cert: {pki.gateway.cert}, key: {pki.gateway.key}}}}}"
        ),
    )
    registry = CollectorRegistry()
    server = ItPagesServer(config, authority, lambda _: None, registry, limits=limits)
    await server.start()
    try:
        yield Served(server, registry, f"https://{HOST}:{server.port}")
    finally:
        await server.stop()
        authority.close()


async def honest(served: Served) -> int:
    """A browser's GET of the login page over HTTPS."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{served.url}/login", ssl=False, allow_redirects=False) as r,
    ):
        return r.status


def metric(served: Served, name: str) -> float:
    return served.registry.get_sample_value(name) or 0.0


def test_the_it_pages_defaults_are_a_few_tens_of_connections() -> None:
    assert 16 <= LIMITS.max_connections <= 64 and LIMITS.head_timeout <= 30
    assert LIMITS.body_timeout is not None and LIMITS.body_timeout <= 30


@pytest.mark.parametrize(
    "limits", [ConnectionLimits(max_connections=3, head_timeout=60.0, body_timeout=1.0)]
)
async def test_a_login_form_dripped_after_its_head_is_closed_at_the_deadline(
    served: Served,
) -> None:
    """No login needed to POST /login: a head, then a few bytes of the form and silence,
    held the connection (and, 32 times over, the IT pages) for as long as the client
    liked. Closed once the body is overdue, counted; a browser is served meanwhile."""
    client = ssl.create_default_context()
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    reader, writer = await asyncio.open_connection(HOST, served.server.port, ssl=client)
    port = served.server.port
    writer.write(
        f"POST /login HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Origin: https://127.0.0.1:{port}\r\n".encode()
        + b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 4000\r\n\r\n"
        b"user=it"
    )
    try:
        assert await honest(served) in (200, 303)
        assert await closed(reader) == b""
    finally:
        writer.close()
    assert served.server.admission is not None and served.server.admission.timed_out == 1
    assert metric(served, "relay_it_connections_timed_out_total") == 1


async def test_tls_handshakes_never_finished_are_closed_and_an_honest_one_is_served(
    served: Served,
) -> None:
    """One connection sends nothing, one half a ClientHello: both are closed once the
    deadline passes, counted; a browser's request is served meanwhile."""
    silent = await asyncio.open_connection(HOST, served.server.port)
    half = await asyncio.open_connection(HOST, served.server.port)
    half[1].write(bytes.fromhex("16030100c8010000c40303") + bytes(16))  # a hello, cut
    try:
        assert await honest(served) in (200, 303)
        assert await closed(silent[0]) == b""
        assert await closed(half[0]) == b""
    finally:
        silent[1].close()
        half[1].close()
    admission = served.server.admission
    assert admission is not None and admission.timed_out == 2
    assert metric(served, "relay_it_connections_timed_out_total") == 2


async def test_half_a_head_inside_tls_is_closed_at_the_deadline(served: Served) -> None:
    client = ssl.create_default_context()
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    reader, writer = await asyncio.open_connection(HOST, served.server.port, ssl=client)
    writer.write(b"GET /login HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    try:
        assert await closed(reader) == b""
    finally:
        writer.close()
    assert served.server.admission is not None and served.server.admission.timed_out == 1


@pytest.mark.parametrize("limits", [ConnectionLimits(max_connections=3, head_timeout=60.0)])
async def test_a_connection_over_the_cap_is_closed_before_its_handshake(
    served: Served,
) -> None:
    admission = served.server.admission
    assert admission is not None
    idle = [await asyncio.open_connection(HOST, served.server.port) for _ in range(3)]
    try:
        await until(lambda: admission.open == 3)  # three handshakes under way
        reader, writer = await asyncio.open_connection(HOST, served.server.port)
        writer.write(bytes.fromhex("16030100c8010000c40303"))
        assert await closed(reader) == b""  # no ServerHello: closed unread
        writer.close()
        assert admission.over_cap == 1
        assert metric(served, "relay_it_connections_over_limit_total") == 1
        idle.pop()[1].close()
        await until(lambda: admission.open == 2)
        assert await honest(served) in (200, 303)
    finally:
        for _, w in idle:
            w.close()
