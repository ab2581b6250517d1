"""Per-device and per-source limits, fair sharing of an agent link, and the issuer's site:
the gateway in-process with real TLS links (DESIGN.md section 11).

Each limit must bite for the device (or address) over it, be counted in
relay_limit_hits_total, and leave another device's streams working.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.control import MAX_SITES, REFUSAL_BURST, RefusalReporter
from gateway.lifecycle import reload
from gateway.limits import (
    SESSION_OPEN_BURST,
    SESSION_OPENS_PER_SECOND,
    DeviceLedger,
    DeviceLimits,
    SourceLimits,
)
from gateway.metrics import GatewayMetrics
from gateway.router import Router
from relay import wire
from relay.net import tls
from relay.net.aio import Link, Stream
from relay.net.bytestream import StreamResetError
from relay.ops.loglimit import LOG_BURST
from relay.proto import ErrorCode, LinkSettings
from relay.trust.identity import Identity, parse_spiffe_uri
from tests.gateway.test_gateway_links import (
    WAIT,
    World,
    announce,
    connect,
    expect_refused,
    roundtrip,
    start_world,
    wait_for_agents,
    world,
)
from tests.pki_helpers import HOST, Pair

__all__ = ["world"]  # the fixture, shared with test_gateway_links


def hits(world: World, limit: str) -> float:
    value = world.server.metrics.registry.get_sample_value(
        "relay_limit_hits_total", {"limit": limit}
    )
    return value or 0.0


async def until(check: object, what: str) -> None:
    for _ in range(500):
        if check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


async def reset_code(stream: Stream) -> int:
    with pytest.raises(StreamResetError) as info:
        await asyncio.wait_for(stream.read(), WAIT)
    return info.value.code


async def agent_with(world: World, settings: LinkSettings) -> Link:
    """An agent link that announces `settings` (its MAX_STREAMS bounds the gateway)."""
    loop = asyncio.get_running_loop()
    pair = world.pki.agent
    ctx = tls.client_context(pair.cert, pair.key, world.pki.ca, wire.ALPN_AGENT)
    held: list[Stream] = []  # streams are held open, never answered
    _, link = await loop.create_connection(
        lambda: Link(client=True, settings=settings, on_stream=held.append),
        HOST,
        world.port,
        ssl=ctx,
        server_hostname=HOST,
    )
    announce(link)
    await wait_for_agents(world, "main")
    return link


# --------------------------------------------------------------------------- the issuer's site


async def test_device_of_another_site_from_this_sites_ca_is_refused(world: World) -> None:
    forged = world.pki.issue("forged", Identity.device(world.pki.trust_domain, "siteb", "ws9"))
    await expect_refused(world, "wrong_site", connect(world, forged, wire.ALPN_DEVICE))


async def test_agent_of_another_site_from_this_sites_ca_is_refused(world: World) -> None:
    forged = world.pki.issue("forged-agent", Identity.agent(world.pki.trust_domain, "siteb"))
    await expect_refused(world, "wrong_site", connect(world, forged, wire.ALPN_AGENT))


async def test_each_site_ca_admits_its_own_devices(world: World) -> None:
    """Both CAs of the bundle are trusted, each for its own site only."""
    own_b = await connect(world, world.pki_b.device("ws9"), wire.ALPN_DEVICE)
    own_main = await connect(world, world.pki.device("ws1"), wire.ALPN_DEVICE)
    await until(lambda: len(world.server.links.devices) == 2, "both devices linked")
    forged = world.pki_b.issue("forged", Identity.device(world.pki.trust_domain, "main", "wsx"))
    await expect_refused(world, "wrong_site", connect(world, forged, wire.ALPN_DEVICE))
    own_b.close()
    own_main.close()


# --------------------------------------------------------------------------- per device


async def test_links_per_device(tmp_path: Path) -> None:
    async with start_world(tmp_path, per_device=DeviceLimits(links=2)) as world:
        pair = world.pki.device("ws1")
        links = [await connect(world, pair, wire.ALPN_DEVICE) for _ in range(2)]
        await until(lambda: world.server.devices.usage(pair_uri(world)).links == 2, "2 links")
        await expect_refused(world, "device_links", connect(world, pair, wire.ALPN_DEVICE))
        assert hits(world, "device_links") == 1
        other = await connect(world, world.pki.device("ws2"), wire.ALPN_DEVICE)
        await until(lambda: len(world.server.links.devices) == 2, "another device links")
        links[0].close()
        await until(lambda: world.server.devices.usage(pair_uri(world)).links == 1, "1 link")
        again = await connect(world, pair, wire.ALPN_DEVICE)  # a freed slot is usable again
        await until(lambda: world.server.devices.usage(pair_uri(world)).links == 2, "relinked")
        for link in (links[1], other, again):
            link.close()


async def test_a_reload_changes_the_caps_for_new_links(tmp_path: Path) -> None:
    async with start_world(tmp_path, per_device=DeviceLimits(links=1)) as world:
        pair = world.pki.device("ws1")
        first = await connect(world, pair, wire.ALPN_DEVICE)
        await expect_refused(world, "device_links", connect(world, pair, wire.ALPN_DEVICE))
        config = dataclasses.replace(world.server.config, per_device=DeviceLimits(links=2))
        assert await reload(world.server, lambda _: config)
        second = await connect(world, pair, wire.ALPN_DEVICE)
        await until(lambda: world.server.devices.usage(pair_uri(world)).links == 2, "2 links")
        first.close()
        second.close()


def pair_uri(world: World, name: str = "ws1") -> str:
    return Identity.device(world.pki.trust_domain, "main", name).uri


async def test_streams_per_device_refuse_that_device_only(tmp_path: Path) -> None:
    async with start_world(tmp_path, per_device=DeviceLimits(streams=4)) as world:
        agent = await connect(world, world.pki.agent, wire.ALPN_AGENT, serve=True)
        await wait_for_agents(world, "main")
        greedy = await connect(world, world.pki.device("ws1"), wire.ALPN_DEVICE)
        idle = [greedy.open_stream({"target": "session"}) for _ in range(4)]
        await until(lambda: world.server.devices.usage(pair_uri(world)).streams == 4, "4 open")
        over = greedy.open_stream({"target": "session"})
        assert await reset_code(over) == ErrorCode.LIMIT_EXCEEDED
        assert hits(world, "device_streams") == 1
        polite = await connect(world, world.pki.device("ws2"), wire.ALPN_DEVICE)
        assert await asyncio.wait_for(roundtrip(polite, b"ping"), WAIT) == b"ping"
        idle[0].reset()
        await until(lambda: world.server.devices.usage(pair_uri(world)).streams == 3, "freed")
        assert await asyncio.wait_for(roundtrip(greedy, b"again"), WAIT) == b"again"
        greedy.close()
        polite.close()
        agent.close()
        await until(lambda: len(world.server.devices) == 0, "ledger emptied")


async def test_a_reconnect_brings_no_new_burst_of_session_opens(tmp_path: Path) -> None:
    """A device spends its burst of session opens, drops its link (the gateway then holds
    nothing of it) and links again: its next opens are still refused, at the refill rate;
    another device opens as usual."""
    limits = DeviceLimits(streams=SESSION_OPEN_BURST + 8)  # the burst held open at once
    async with start_world(tmp_path, per_device=limits) as world:
        loop = asyncio.get_running_loop()
        agent = await connect(world, world.pki.agent, wire.ALPN_AGENT, serve=True)
        await wait_for_agents(world, "main")
        greedy = await connect(world, world.pki.device("ws1"), wire.ALPN_DEVICE)
        burst = [greedy.open_stream({"target": "session"}) for _ in range(SESSION_OPEN_BURST)]
        await until(
            lambda: world.server.devices.usage(pair_uri(world)).streams == SESSION_OPEN_BURST,
            "the burst routed",
        )
        spent_at = loop.time()
        greedy.close()
        await until(lambda: len(world.server.devices) == 0, "the device forgotten")
        again = await connect(world, world.pki.device("ws1"), wire.ALPN_DEVICE)
        outcomes = [await open_outcome(again) for _ in range(3)]
        elapsed = loop.time() - spent_at
        assert outcomes.count("routed") <= 1 + int(elapsed * SESSION_OPENS_PER_SECOND)
        assert hits(world, "device_opens") == outcomes.count("refused") >= 1
        polite = await connect(world, world.pki.device("ws2"), wire.ALPN_DEVICE)
        assert await asyncio.wait_for(roundtrip(polite, b"ok"), WAIT) == b"ok"
        assert len(burst) == SESSION_OPEN_BURST
        for link in (again, polite, agent):
            link.close()


async def open_outcome(device: Link) -> str:
    """Open one session and say what became of it: echoed ("routed") or "refused"."""
    try:
        got = await asyncio.wait_for(roundtrip(device, b"x"), WAIT)
    except StreamResetError as exc:
        assert exc.code == ErrorCode.LIMIT_EXCEEDED
        return "refused"
    assert got == b"x"
    return "routed"


async def test_agent_link_keeps_a_reserve_for_other_devices(tmp_path: Path) -> None:
    """An agent link of 8 streams, 4 kept in reserve: the first device stops at 4 although
    its own cap is 100, and the others each still get a stream."""
    limits = DeviceLimits(streams=100, agent_reserve=4)
    async with start_world(tmp_path, per_device=limits) as world:
        agent = await agent_with(world, LinkSettings(max_streams=8))
        greedy = await connect(world, world.pki.device("ws1"), wire.ALPN_DEVICE)
        held = [greedy.open_stream({"target": "session"}) for _ in range(4)]
        await until(lambda: world.server.devices.usage(pair_uri(world)).streams == 4, "4 open")
        over = greedy.open_stream({"target": "session"})
        assert await reset_code(over) == ErrorCode.LIMIT_EXCEEDED
        assert hits(world, "agent_share") == 1
        others = [
            await connect(world, world.pki.device(f"ws{i}"), wire.ALPN_DEVICE) for i in (2, 3)
        ]
        for i, link in enumerate(others, start=2):
            link.open_stream({"target": "session"})
            await until(
                lambda i=i: world.server.devices.usage(pair_uri(world, f"ws{i}")).streams == 1,
                f"ws{i} routed",
            )
        assert hits(world, "agent_share") == 1
        assert len(held) == 4
        for link in (greedy, *others, agent):
            link.close()


async def test_bytes_buffered_per_device(tmp_path: Path) -> None:
    """A device that stops reading: the agent's replies pile up in the gateway until the
    device's budget is spent; then its stream is reset, and another device still works."""
    window = 64 * 1024
    gateway_limits = LinkSettings(stream_window=window, link_window=16 * window)
    budget = 2 * window
    async with start_world(
        tmp_path, limits=gateway_limits, per_device=DeviceLimits(buffered=budget)
    ) as world:
        loop = asyncio.get_running_loop()
        flood = os.urandom(4 * window)

        async def answer(stream: Stream) -> None:
            with contextlib.suppress(StreamResetError):
                await stream.read()
                await stream.write(flood)
                await stream.write_eof()

        tasks: set[asyncio.Task[None]] = set()

        def on_stream(stream: Stream) -> None:
            task = loop.create_task(answer(stream))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        pair = world.pki.agent
        ctx = tls.client_context(pair.cert, pair.key, world.pki.ca, wire.ALPN_AGENT)
        _, agent = await loop.create_connection(
            lambda: Link(client=True, settings=LinkSettings(), on_stream=on_stream),
            HOST,
            world.port,
            ssl=ctx,
            server_hostname=HOST,
        )
        announce(agent)
        await wait_for_agents(world, "main")
        # The device announces a small window and never reads: it takes 64 KiB per stream.
        stalled = await dial_device(
            world, world.pki.device("ws1"), LinkSettings(stream_window=window)
        )
        streams = [stalled.open_stream({"target": "session"}) for _ in range(3)]
        for stream in streams:
            await stream.write(b"send me a lot")
        await until(lambda: hits(world, "device_buffered") >= 1, "budget hit")
        await until(
            lambda: any(s.reset_code == ErrorCode.LIMIT_EXCEEDED for s in streams),
            "a stream of the device reset with LIMIT_EXCEEDED",
        )
        usage = world.server.devices.usage(pair_uri(world))
        assert usage.buffered <= budget
        polite = await connect(world, world.pki.device("ws2"), wire.ALPN_DEVICE)
        got = await asyncio.wait_for(roundtrip(polite, b"hello"), WAIT)
        assert got == flood
        stalled.close()
        polite.close()
        agent.close()


async def dial_device(world: World, pair: Pair, settings: LinkSettings) -> Link:
    loop = asyncio.get_running_loop()
    ctx = tls.client_context(pair.cert, pair.key, world.pki.ca, wire.ALPN_DEVICE)
    _, link = await loop.create_connection(
        lambda: Link(client=True, settings=settings),
        HOST,
        world.port,
        ssl=ctx,
        server_hostname=HOST,
    )
    return link


# --------------------------------------------------------------------------- per source


@contextlib.asynccontextmanager
async def silent_connections(
    port: int, count: int, source: str
) -> AsyncIterator[list[socket.socket]]:
    """`count` TCP connections from `source` that never start TLS."""
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            sock.bind((source, 0))
            socks.append(sock)
            await loop.sock_connect(sock, (HOST, port))
        yield socks
    finally:
        for sock in socks:
            sock.close()


async def test_unfinished_handshakes_per_source(tmp_path: Path) -> None:
    async with start_world(tmp_path, per_source=SourceLimits(handshakes=3)) as world:
        agent = await connect(world, world.pki.agent, wire.ALPN_AGENT, serve=True)
        await wait_for_agents(world, "main")
        async with silent_connections(world.port, 6, "127.0.0.2") as socks:
            await until(lambda: hits(world, "source_handshakes") == 3, "3 refused")
            assert world.refusals("source_handshakes") == 3
            # The refused ones are closed by the gateway at once.
            loop = asyncio.get_running_loop()
            assert await asyncio.wait_for(loop.sock_recv(socks[-1], 1), WAIT) == b""
            # Another address is not affected.
            device = await connect(world, world.pki.device("ws1"), wire.ALPN_DEVICE)
            assert await asyncio.wait_for(roundtrip(device, b"ok"), WAIT) == b"ok"
            device.close()
        await until(lambda: len(world.server.sources) == 0, "pending handshakes forgotten")
        agent.close()


async def test_a_source_beyond_its_handshake_rate_is_refused(tmp_path: Path) -> None:
    """Connections that each end at once never fill the handshake slots; the rate stops
    one source asking the gateway for handshakes faster than per_source allows."""
    limits = SourceLimits(handshakes=1000, handshake_rate=1, handshake_burst=3)
    async with start_world(tmp_path, per_source=limits) as world:
        async with silent_connections(world.port, 6, "127.0.0.3") as socks:
            await until(lambda: hits(world, "source_rate") == 3, "3 refused")
            assert world.refusals("source_rate") == 3
            loop = asyncio.get_running_loop()
            assert await asyncio.wait_for(loop.sock_recv(socks[-1], 1), WAIT) == b""
            device = await connect(world, world.pki.device("ws1"), wire.ALPN_DEVICE)
            device.close()  # another source: its own bucket
        assert hits(world, "source_rate") == 3


async def test_junk_connections_cannot_flood_the_log(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Anyone can open connections that fail their handshake: each is counted, but one
    address gets LOG_BURST lines; another address is still logged."""
    caplog.set_level(logging.WARNING, logger="gateway.server")
    loop = asyncio.get_running_loop()
    flood = 3 * LOG_BURST

    async def junk(source: str) -> None:
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((source, 0))
        try:
            await loop.sock_connect(sock, (HOST, world.port))
            await loop.sock_sendall(sock, b"GET / HTTP/1.0\r\n\r\n" * 4)
            await asyncio.wait_for(loop.sock_recv(sock, 100), WAIT)  # closed on us
        finally:
            sock.close()

    for _ in range(flood):
        await junk("127.0.0.2")
    await until(lambda: world.refusals("protocol") == flood, "every refusal counted")
    lines = [r for r in caplog.records if r.getMessage() == "connection refused"]
    assert len(lines) == LOG_BURST
    await junk("127.0.0.3")
    await until(
        lambda: any(
            str(getattr(r, "peer", "")).startswith("127.0.0.3:")
            for r in caplog.records
            if r.getMessage() == "connection refused"
        ),
        "another address logged",
    )


def test_held_back_refusal_reports_are_bounded_by_site() -> None:
    """A CA naming ever new sites in refused certificates cannot grow the gateway."""
    router = Router(GatewayMetrics(), DeviceLedger(DeviceLimits(), lambda _: None))
    reporter = RefusalReporter(router)
    for i in range(MAX_SITES + 500):
        identity = parse_spiffe_uri(f"spiffe://hospital.test/device/site{i}/ws")
        for _ in range(REFUSAL_BURST + 2):
            reporter.report("revoked", identity, "10.0.0.1:5", 0.0)
    assert len(reporter.suppressed) <= MAX_SITES
