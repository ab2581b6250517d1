"""All sources' handshake budget (`all_sources:`) on the gateway in-process, with real TLS
from many loopback source addresses (127.0.0.x): the TLS handshakes run on the event loop
that relays every established link, so many sources, each within its own limits, could
take all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import ssl
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway.lifecycle import reload
from gateway.limits import AllSourcesLimits, SourceLimits
from relay import wire
from relay.net import tls
from relay.net.aio import Stream
from tests.gateway.test_gateway_limits import hits, silent_connections, until
from tests.gateway.test_gateway_links import (
    WAIT,
    World,
    connect,
    expect_refused,
    roundtrip,
    start_world,
    wait_for_agents,
)
from tests.pki_helpers import HOST, Pair

BUDGET_LINE = "connection refused: all sources' handshake budget is spent"
FLOOD_SOURCES = [f"127.0.1.{i}" for i in range(1, 65)]
FLOOD_THREADS = 4
FLOOD_MAX = 5_000  # attempts, all threads together: the flood ends even if the test hangs
EXCHANGES = 30  # round trips the established link makes while the flood runs
CHUNK = 64 * 1024


def pending_metric(world: World) -> float | None:
    return world.server.metrics.registry.get_sample_value("relay_handshakes_pending")


def handshakes_done(world: World) -> float:
    registry = world.server.metrics.registry
    return sum(
        registry.get_sample_value("relay_handshakes_total", {"result": result}) or 0.0
        for result in ("ok", "failed")
    )


@dataclass
class Flood:
    """Full mTLS handshakes from FLOOD_SOURCES, each closed at once, as fast as
    FLOOD_THREADS blocking clients can (threads: the handshake's crypto runs without the
    GIL, beside the gateway's event loop)."""

    port: int
    context: ssl.SSLContext
    stop: threading.Event
    lock: threading.Lock = field(default_factory=threading.Lock)
    attempts: int = 0  # connections the gateway accepted
    completed: int = 0  # handshakes the client saw through

    def run(self, first: int) -> None:
        for i in range(first, FLOOD_MAX, FLOOD_THREADS):
            if self.stop.is_set():
                return
            with socket.socket() as raw:
                raw.settimeout(WAIT)
                raw.bind((FLOOD_SOURCES[i % len(FLOOD_SOURCES)], 0))
                raw.connect((HOST, self.port))
                with self.lock:
                    self.attempts += 1
                with (
                    contextlib.suppress(OSError),
                    self.context.wrap_socket(raw, server_hostname=HOST),
                    self.lock,
                ):
                    self.completed += 1


@contextlib.asynccontextmanager
async def flooding(world: World, pair: Pair) -> AsyncIterator[Flood]:
    context = tls.client_context(pair.cert, pair.key, world.pki.ca, wire.ALPN_DEVICE)
    flood = Flood(world.port, context, threading.Event())
    threads = [asyncio.create_task(asyncio.to_thread(flood.run, i)) for i in range(FLOOD_THREADS)]
    try:
        yield flood
    finally:
        flood.stop.set()
        await asyncio.gather(*threads)


async def exchange(stream: Stream, payload: bytes) -> bytes:
    """One round trip on an open session stream (the agent echoes it)."""
    await stream.write(payload)
    got = bytearray()
    while len(got) < len(payload):
        chunk = await asyncio.wait_for(stream.read(1 << 20), WAIT)
        assert chunk, "the echo ended early"
        got += chunk
    return bytes(got)


async def test_all_sources_handshake_rate_holds_across_many_sources_during_a_flood(
    tmp_path: Path,
) -> None:
    """64 sources, each far below its own rate, flood the gateway with full mTLS
    handshakes; before all_sources it handshook every one (hundreds a second, all on the
    loop). Now it starts no more than the bucket allows (burst + rate x elapsed), refuses
    the rest before any TLS work, and the established link keeps making its round trips
    meanwhile."""
    total = AllSourcesLimits(handshakes=1000, handshake_rate=20, handshake_burst=10)
    async with start_world(tmp_path, all_sources=total) as world:
        loop = asyncio.get_running_loop()
        agent = await connect(world, world.pki.agent, wire.ALPN_AGENT, serve=True)
        await wait_for_agents(world, "main")
        device = await connect(world, world.pki.device("ws1"), wire.ALPN_DEVICE)
        stream = device.open_stream({"target": "session"})
        payload = os.urandom(CHUNK)
        assert await exchange(stream, payload) == payload
        before, began = handshakes_done(world), loop.time()
        async with flooding(world, world.pki.device("ws2")) as flood:
            await until(lambda: world.refusals("all_sources_rate") >= 1, "the flood is refused")
            done = 0
            for _ in range(EXCHANGES):
                done += await exchange(stream, payload) == payload
        elapsed = loop.time() - began
        await until(lambda: world.server.sources.pending == 0, "the flood's handshakes end")
        started = handshakes_done(world) - before
        assert done == EXCHANGES  # the link made every round trip while the flood ran
        assert started <= total.handshake_burst + total.handshake_rate * elapsed + 1
        refused = world.refusals("all_sources_rate")
        assert refused >= flood.attempts - started - 1  # every other attempt refused
        assert hits(world, "all_sources_rate") == refused
        assert flood.completed <= started
        stream.reset()
        device.close()
        agent.close()


async def test_all_sources_handshake_slots_leave_a_reserve_for_quiet_sources(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Half-done handshakes from many sources fill all sources' slots and the next
    connection is closed before any TLS work; one busy source cannot take the last
    eighth, so a device dialling from a quiet source still gets in. The flood is one log
    line, not one per source."""
    caplog.set_level(logging.WARNING, logger="gateway.server")
    total = AllSourcesLimits(handshakes=16)
    async with start_world(tmp_path, all_sources=total, handshake_timeout=30.0) as world:
        assert world.refusals("all_sources_handshakes") == 0  # exported before any refusal
        agent = await connect(world, world.pki.agent, wire.ALPN_AGENT, serve=True)
        await wait_for_agents(world, "main")
        loop = asyncio.get_running_loop()
        async with contextlib.AsyncExitStack() as stack:
            busy = await stack.enter_async_context(silent_connections(world.port, 20, "127.0.2.1"))
            await until(lambda: world.refusals("all_sources_handshakes") == 6, "6 refused")
            assert world.server.sources.pending == 14  # 16 - 16 // 8
            assert pending_metric(world) == 14
            assert await asyncio.wait_for(loop.sock_recv(busy[-1], 1), WAIT) == b""
            device = await connect(world, world.pki.device("ws1"), wire.ALPN_DEVICE)
            assert await asyncio.wait_for(roundtrip(device, b"ok"), WAIT) == b"ok"
            device.close()
            for i in range(1, 5):  # quiet sources take the rest of the reserve, then none
                await stack.enter_async_context(silent_connections(world.port, 1, f"127.0.3.{i}"))
            await until(lambda: world.refusals("all_sources_handshakes") == 8, "8 refused")
            await expect_refused(
                world,
                "all_sources_handshakes",
                connect(world, world.pki.device("ws2"), wire.ALPN_DEVICE),
            )
            assert hits(world, "all_sources_handshakes") == 9
        await until(lambda: world.server.sources.pending == 0, "the slots are given back")
        assert pending_metric(world) == 0
        device = await connect(world, world.pki.device("ws2"), wire.ALPN_DEVICE)
        assert await asyncio.wait_for(roundtrip(device, b"ok"), WAIT) == b"ok"
        device.close()
        agent.close()
    lines = [r for r in caplog.records if r.getMessage() == BUDGET_LINE]
    assert len(lines) == 1 and getattr(lines[0], "reason", "") == "all_sources_handshakes"
    refused = [r for r in caplog.records if r.getMessage() == "connection refused"]
    assert not [r for r in refused if str(getattr(r, "reason", "")).startswith("all_sources")]


async def test_a_source_over_its_own_rate_spends_nothing_of_all_sources_budget(
    tmp_path: Path,
) -> None:
    """The source's limits are asked first for free: one source hammering beyond its own
    rate does not empty the bucket every other source shares."""
    own = SourceLimits(handshakes=1000, handshake_rate=1, handshake_burst=2)
    total = AllSourcesLimits(handshake_rate=1, handshake_burst=4)
    async with start_world(tmp_path, per_source=own, all_sources=total) as world:
        async with silent_connections(world.port, 10, "127.0.4.1"):
            await until(lambda: world.refusals("source_rate") >= 7, "7 refused by its own rate")
        assert world.refusals("all_sources_rate") == 0
        device = await connect(world, world.pki.device("ws1"), wire.ALPN_DEVICE)
        device.close()
        assert world.refusals("all_sources_rate") == 0


async def test_a_reload_changes_all_sources_budget(tmp_path: Path) -> None:
    """SIGHUP applies `all_sources:` to new connections; the handshakes under way stay
    counted."""
    total = AllSourcesLimits(handshakes=2)
    async with start_world(tmp_path, all_sources=total, handshake_timeout=30.0) as world:
        async with silent_connections(world.port, 3, "127.0.5.1"):
            await until(lambda: world.refusals("all_sources_handshakes") == 1, "1 refused")
            wider = AllSourcesLimits(handshakes=4)
            config = dataclasses.replace(world.server.config, all_sources=wider)
            assert await reload(world.server, lambda _: config)
            async with silent_connections(world.port, 3, "127.0.5.2"):
                await until(lambda: world.refusals("all_sources_handshakes") == 2, "2 refused")
                assert world.server.sources.pending == 4
        await until(lambda: world.server.sources.pending == 0, "the slots are given back")
