"""The agent serving streams that a device opens through the real gateway (in-process).

A device-shaped client dials the gateway with a device certificate and opens streams
with chosen headers; the agent (run_agent) dials the same gateway and serves them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay import wire
from relay.agent.config import AgentConfig, ServiceConfig
from relay.agent.dispatch import (
    MAX_DEVICE_PACS_OPERATIONS,
    MAX_DEVICE_TCP_STREAMS,
    STREAM_OPEN_BURST,
    STREAM_OPEN_RATE,
    StreamDispatcher,
    TargetHandler,
)
from relay.agent.service import Agent, run_agent
from relay.net import tls
from relay.net.aio import Link, Stream
from relay.net.bytestream import ByteStream, StreamResetError
from relay.net.compression import MARKER_RAW, MARKER_ZSTD, CodecStream
from relay.net.dialer import dial
from relay.ops.config import Address
from relay.ops.loglimit import LOG_BURST, LogLimiter
from relay.ops.ratelimit import RateLimiter
from relay.proto import ErrorCode, LinkSettings
from relay.seal.transport import sealed_peer
from tests.ends_helpers import (
    WAIT,
    GatewayHandle,
    TcpService,
    agent_config,
    running_gateway,
    tcp_service,
    wait_until,
)
from tests.pki_helpers import HOST, SitePki, make_pki
from tests.ports import dead_port
from tests.session_helpers import sealed

SETTINGS = LinkSettings()
SECRET = b"PAYLOAD-MUST-NOT-BE-LOGGED-7d1f"


@dataclass
class World:
    pki: SitePki
    gateway: GatewayHandle
    agent: Agent
    echo: TcpService
    device: Link
    seen: list[Mapping[str, str]]

    def open(self, headers: Mapping[str, str]) -> Stream:
        return self.device.open_stream(headers)


async def device_link(pki: SitePki, port: int, name: str = "ws1") -> Link:
    pair = pki.device(name)
    ctx = tls.client_context(pair.cert, pair.key, pki.ca, alpn=wire.ALPN_DEVICE)
    return await dial(
        Address(HOST, port), ctx, SETTINGS, alpn=wire.ALPN_DEVICE, name=name, timeout=WAIT
    )


@contextlib.asynccontextmanager
async def running_agent(
    config: AgentConfig, handlers: Mapping[str, TargetHandler] | None = None
) -> AsyncIterator[Agent]:
    stop = asyncio.Event()
    started: asyncio.Future[Agent] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        run_agent(
            config,
            stop=stop,
            handlers=handlers if handlers is not None else {},
            started=started.set_result,
            handle_signals=False,
        )
    )
    agent = await asyncio.wait_for(started, WAIT)
    try:
        yield agent
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    pki = make_pki(tmp_path / "pki")
    seen: list[Mapping[str, str]] = []

    async def dicom(stream: Stream) -> None:
        peer = sealed_peer(stream)
        seen.append({**stream.headers, "peer": peer.uri if peer is not None else ""})
        data = await stream.read()
        await stream.write(b"dicom handler got " + data)
        await stream.write_eof()

    with dead_port() as dead:  # a service that is down for the whole test
        async with running_gateway(pki, tmp_path) as gw, tcp_service() as echo:
            config = agent_config(
                pki,
                tmp_path,
                [gw.port],
                {"echo": (echo.port, False), "zecho": (echo.port, True), "dead": (dead, False)},
            )
            async with running_agent(config, {"dicom": dicom}) as agent:
                await asyncio.wait_for(
                    agent.gateways.links[next(iter(agent.gateways.links))].up.wait(), WAIT
                )
                await wait_until(lambda: gw.server.router.sites() == ["main"])
                outer = await device_link(pki, gw.port)
                device = await sealed(outer, pki, pki.device("ws1"))
                yield World(pki, gw, agent, echo, device, seen)
                device.close()
                outer.close()


async def read_all(stream: ByteStream) -> bytes:
    parts = []
    while chunk := await stream.read():
        parts.append(chunk)
    return b"".join(parts)


async def expect_reset(stream: Stream) -> int:
    with pytest.raises(StreamResetError) as info:
        async with asyncio.timeout(WAIT):
            await stream.read()
    return info.value.code


async def test_tcp_service_round_trip_with_half_close(world: World) -> None:
    stream = world.open({"target": "tcp:echo"})
    payload = os.urandom(2_000_000)
    await stream.write(payload)
    await stream.write_eof()  # the echo service answers everything, then half-closes
    async with asyncio.timeout(WAIT):
        got = await read_all(stream)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    assert world.agent.dispatcher.stats.streams["tcp:echo"] == 1
    await wait_until(lambda: world.agent.dispatcher.stats.outcomes["closed"] == 1)


@pytest.mark.parametrize(
    ("target", "code", "reason"),
    [
        ("tcp:nope", ErrorCode.FORBIDDEN, "unknown_service"),
        ("tcp:", ErrorCode.FORBIDDEN, "unknown_service"),
        ("smtp", ErrorCode.FORBIDDEN, "unknown_target"),
        ("", ErrorCode.FORBIDDEN, "unknown_target"),
        ("tcp:dead", ErrorCode.CONNECT_FAILED, "connect_failed"),
    ],
)
async def test_refusals_carry_a_code(world: World, target: str, code: int, reason: str) -> None:
    stream = world.open({"target": target})
    assert await expect_reset(stream) == code
    await wait_until(lambda: world.agent.dispatcher.stats.refused[reason] == 1)


async def test_dicom_without_a_handler_is_forbidden(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    async with running_gateway(pki, tmp_path) as gw:
        config = agent_config(pki, tmp_path, [gw.port], {})
        async with running_agent(config, handlers={}):
            await wait_until(lambda: gw.server.router.sites() == ["main"])
            outer = await device_link(pki, gw.port)
            device = await sealed(outer, pki, pki.device("ws1"))
            stream = device.open_stream({"target": "dicom"})
            assert await expect_reset(stream) == ErrorCode.FORBIDDEN
            # Outside a session, the gateway itself refuses any request stream.
            unsealed = outer.open_stream({"target": "dicom"})
            assert await expect_reset(unsealed) == ErrorCode.FORBIDDEN
            device.close()
            outer.close()


async def test_handler_knows_the_device_from_the_inner_certificate_only(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    stream = world.open({"target": "dicom", "x-relay-device": "spiffe://forged/device/x/y"})
    await stream.write(SECRET)
    await stream.write_eof()
    async with asyncio.timeout(WAIT):
        assert await read_all(stream) == b"dicom handler got " + SECRET
    (headers,) = world.seen
    # A header claiming another identity is just a header: nobody reads it.
    assert headers["peer"] == "spiffe://hospital.test/device/main/ws1"
    assert headers["target"] == "dicom"
    opened = [r for r in caplog.records if r.getMessage() == "stream open"]
    assert opened and all(getattr(r, "device", "") == headers["peer"] for r in opened)
    assert all(SECRET.decode() not in r.getMessage() + str(r.__dict__) for r in caplog.records)


@pytest.mark.parametrize(("service", "marker"), [("zecho", MARKER_ZSTD), ("echo", MARKER_RAW)])
async def test_agent_compresses_iff_configured_and_offered(
    world: World, service: str, marker: int
) -> None:
    stream = world.open({"target": f"tcp:{service}", "codec": "zstd"})
    async with asyncio.timeout(WAIT):
        assert await stream.read(1) == bytes([marker])  # sent eagerly, before any data
    stream.reset(ErrorCode.CANCEL)
    # The whole exchange, with a codec on our side too.
    fresh = world.open({"target": f"tcp:{service}", "codec": "zstd"})
    ours = CodecStream(fresh, send_zstd=True)
    payload = b"compressible text " * 50_000
    await ours.write(payload)
    await ours.write_eof()
    async with asyncio.timeout(WAIT):
        assert await read_all(ours) == payload
    assert ours.peer_zstd is (marker == MARKER_ZSTD)
    if ours.peer_zstd:
        assert ours.stats.wire_in < ours.stats.raw_in / 10
    else:
        assert ours.stats.wire_in == ours.stats.raw_in + 1


async def test_no_codec_offer_means_plain_bytes(world: World) -> None:
    stream = world.open({"target": "tcp:zecho"})  # compress: true, but nothing offered
    await stream.write(b"plain")
    await stream.write_eof()
    async with asyncio.timeout(WAIT):
        assert await read_all(stream) == b"plain"


async def test_twenty_concurrent_streams(world: World) -> None:
    async def one(i: int) -> None:
        headers = {"target": "tcp:zecho" if i % 2 else "tcp:echo", "codec": "zstd"}
        codec = CodecStream(world.open(headers), send_zstd=i % 3 == 0)
        payload = os.urandom(100_000) + bytes(100_000 + i)
        await codec.write(payload)
        await codec.write_eof()
        assert await read_all(codec) == payload

    async with asyncio.timeout(WAIT * 2):
        await asyncio.gather(*(one(i) for i in range(20)))
    assert sum(world.agent.dispatcher.stats.streams.values()) == 20


async def test_a_device_reset_closes_the_service_connection(world: World) -> None:
    closed = asyncio.Event()

    async def holder(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.read()
        closed.set()
        writer.close()

    async with tcp_service(holder) as svc:
        hold = ServiceConfig("hold", Address(HOST, svc.port))
        world.agent.dispatcher.services = {**world.agent.dispatcher.services, "hold": hold}
        stream = world.open({"target": "tcp:hold"})
        await stream.write(b"x")
        await wait_until(lambda: svc.connections == 1)
        stream.reset(ErrorCode.CANCEL)
        await asyncio.wait_for(closed.wait(), WAIT)


async def test_connects_are_limited_but_all_served(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At most max_connects connects to services in progress; the others wait their turn."""
    real = asyncio.open_connection
    now = peak = 0

    async def slow_connect(
        host: str, port: int, **kwargs: object
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        nonlocal now, peak
        now += 1
        peak = max(peak, now)
        await asyncio.sleep(0.05)
        now -= 1
        return await real(host, port)

    monkeypatch.setattr(asyncio, "open_connection", slow_connect)
    world.agent.dispatcher._connects = asyncio.Semaphore(2)

    async def one(i: int) -> None:
        stream = world.open({"target": "tcp:echo"})
        await stream.write(b"n%d" % i)
        await stream.write_eof()
        assert await read_all(stream) == b"n%d" % i

    async with asyncio.timeout(WAIT):
        await asyncio.gather(*(one(i) for i in range(6)))
    assert peak == 2


async def test_a_device_whose_connects_hang_leaves_connect_slots_to_the_others(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One device opening streams to a service whose connects hang (a host dropping SYNs)
    holds at most its share of the connect slots: another device's forward still
    connects (it used to wait for a slot until its connect timeout, then fail)."""
    real = asyncio.open_connection
    echo_port = world.echo.port
    answer = asyncio.Event()

    async def connect(
        host: str, port: int, **kwargs: object
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if port != echo_port:
            await answer.wait()  # tcp:dead hangs until the test ends it (then refused)
        return await real(host, port)

    monkeypatch.setattr(asyncio, "open_connection", connect)
    dispatcher = world.agent.dispatcher
    dispatcher._connects = asyncio.Semaphore(4)
    dispatcher.device_connects.per_device = 1  # of the 4 (a quarter, as the defaults)
    hanging = [world.open({"target": "tcp:dead"}) for _ in range(4)]
    await wait_until(lambda: dispatcher.active == 4)
    dispatcher.connect_timeout = 1.5  # for ws2's forward (ws1's began with the default)
    outer = await device_link(world.pki, world.gateway.port, "ws2")
    other = await sealed(outer, world.pki, world.pki.device("ws2"))
    try:
        stream = other.open_stream({"target": "tcp:echo"})
        await stream.write(b"through")
        await stream.write_eof()
        assert await read_all(stream) == b"through"
        answer.set()
        for held in hanging:
            assert await expect_reset(held) == ErrorCode.CONNECT_FAILED
        await wait_until(lambda: len(dispatcher.device_connects) == 0)
    finally:
        other.close()
        outer.close()


async def test_a_devices_session_lines_are_limited(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """The "session open" / "session closed" lines are limited per device: a device
    opening sessions in a loop (as a compromised gateway lets it) wrote two a session."""
    caplog.set_level(logging.INFO, logger="relay.agent.sessions")
    world.agent.sessions.session_lines = LogLimiter(0.001, 4)
    outer = await device_link(world.pki, world.gateway.port, "ws2")
    try:
        for _ in range(4):
            inner = await sealed(outer, world.pki, world.pki.device("ws2"))
            inner.close()
            await inner.wait_closed()
        await wait_until(lambda: len(world.agent.sessions.sessions) == 1)  # ws1's
        lines = [
            r
            for r in caplog.records
            if r.getMessage() in ("session open", "session closed")
            and getattr(r, "device", "").endswith("/ws2")
        ]
        assert len(lines) == 4
    finally:
        outer.close()


async def test_a_drain_resets_a_handlers_stream_with_shutdown(world: World) -> None:
    """A handler cut by the drain (agent restart) resets with SHUTDOWN, which the
    workstation resumes; CANCEL would say the agent gave up on the request."""

    async def hang(stream: Stream) -> None:
        await asyncio.Event().wait()

    world.agent.dispatcher.handlers["hang"] = hang
    stream = world.open({"target": "hang"})
    await wait_until(lambda: world.agent.dispatcher.active == 1)
    assert await world.agent.dispatcher.drain(0.05) == 1
    assert await expect_reset(stream) == ErrorCode.SHUTDOWN


async def test_a_handler_that_leaves_its_stream_open_resets_with_cancel(world: World) -> None:
    async def leave(stream: Stream) -> None:
        return None

    world.agent.dispatcher.handlers["leave"] = leave
    stream = world.open({"target": "leave"})
    assert await expect_reset(stream) == ErrorCode.CANCEL
    await wait_until(lambda: world.agent.dispatcher.stats.outcomes["handled"] == 1)


async def test_a_devices_refused_streams_cannot_flood_the_log(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Every refusal is counted, but one device gets LOG_BURST lines at once, the next
    saying how many were held back; another device's refusals are still logged."""
    caplog.set_level(logging.WARNING, logger="relay.agent.dispatch")
    flood = 3 * LOG_BURST
    for _ in range(flood):
        assert await expect_reset(world.open({"target": "smtp"})) == ErrorCode.FORBIDDEN
    await wait_until(lambda: world.agent.dispatcher.stats.refused["unknown_target"] == flood)
    lines = [r for r in caplog.records if r.getMessage() == "stream refused"]
    assert len(lines) == LOG_BURST
    assert all(getattr(r, "device", "").endswith("/ws1") for r in lines)

    outer = await device_link(world.pki, world.gateway.port, "ws2")
    other = await sealed(outer, world.pki, world.pki.device("ws2"))
    try:
        assert await expect_reset(other.open_stream({"target": "smtp"})) == ErrorCode.FORBIDDEN
        await wait_until(
            lambda: any(
                getattr(r, "device", "").endswith("/ws2")
                for r in caplog.records
                if r.getMessage() == "stream refused"
            )
        )
    finally:
        other.close()
        outer.close()


WS1 = "spiffe://hospital.test/device/main/ws1"


async def echoed(stream: Stream, payload: bytes = b"ping") -> bytes:
    """Send `payload`, half-close, and read the whole answer."""
    await stream.write(payload)
    await stream.write_eof()
    async with asyncio.timeout(WAIT):
        return await read_all(stream)


async def test_a_device_opening_streams_faster_than_its_rate_is_refused(world: World) -> None:
    """The caps bound streams held, not churn: beyond its burst a device's streams are
    reset with LIMIT_EXCEEDED, counted by kind, and reach no service; another device is
    not refused for it, and a refused target is still FORBIDDEN, spending no token."""
    dispatcher = world.agent.dispatcher
    dispatcher.open_limit = RateLimiter(rate=0.001, burst=4)
    assert await expect_reset(world.open({"target": "smtp"})) == ErrorCode.FORBIDDEN
    for _ in range(3):
        assert await echoed(world.open({"target": "tcp:echo"})) == b"ping"
    assert await echoed(world.open({"target": "dicom"})) == b"dicom handler got ping"
    assert world.echo.connections == 3
    over = [world.open({"target": "tcp:echo"}) for _ in range(5)]
    over.append(world.open({"target": "dicom"}))
    for stream in over:
        assert await expect_reset(stream) == ErrorCode.LIMIT_EXCEEDED
    await wait_until(lambda: dispatcher.stats.refused["tcp_rate"] == 5)
    assert dispatcher.stats.refused["dicom_rate"] == 1
    assert world.echo.connections == 3 and len(world.seen) == 1

    outer = await device_link(world.pki, world.gateway.port, "ws2")
    other = await sealed(outer, world.pki, world.pki.device("ws2"))
    try:
        assert await echoed(other.open_stream({"target": "tcp:echo"})) == b"ping"
        assert await echoed(other.open_stream({"target": "dicom"})) == b"dicom handler got ping"
    finally:
        other.close()
        outer.close()
    assert dispatcher.stats.refused["tcp_rate"] == 5


async def test_a_devices_stream_budget_refills_at_its_rate(world: World) -> None:
    world.agent.dispatcher.open_limit = RateLimiter(rate=2.0, burst=2)
    first = [world.open({"target": "tcp:echo"}) for _ in range(3)]
    assert await echoed(first[0]) == b"ping"
    assert await echoed(first[1]) == b"ping"
    assert await expect_reset(first[2]) == ErrorCode.LIMIT_EXCEEDED
    await asyncio.sleep(0.6)  # one token back
    assert await echoed(world.open({"target": "tcp:echo"})) == b"ping"


async def test_the_default_stream_rate_admits_a_workstations_largest_burst(
    world: World,
) -> None:
    """A workstation at its peak: 256 forwarded connections opened at once by a browser
    (relay.workstation.forward.MAX_CONNECTIONS) while its viewer holds its 32 DICOM
    operations, all on the same instant. None is refused."""
    dispatcher = world.agent.dispatcher
    assert (dispatcher.open_limit.burst, dispatcher.open_limit.rate) == (
        STREAM_OPEN_BURST,
        STREAM_OPEN_RATE,
    )
    assert STREAM_OPEN_BURST >= MAX_DEVICE_TCP_STREAMS + MAX_DEVICE_PACS_OPERATIONS
    fresh = StreamDispatcher({}, open_burst=7, open_rate=3.0)
    assert (fresh.open_limit.burst, fresh.open_limit.rate) == (7, 3.0)
    streams = [world.open({"target": "tcp:echo"}) for _ in range(MAX_DEVICE_TCP_STREAMS)]
    streams += [world.open({"target": "dicom"}) for _ in range(MAX_DEVICE_PACS_OPERATIONS)]
    async with asyncio.timeout(WAIT * 4):
        answers = await asyncio.gather(*(echoed(s, b"n%d" % i) for i, s in enumerate(streams)))
    tcp = MAX_DEVICE_TCP_STREAMS
    assert answers[:tcp] == [b"n%d" % i for i in range(tcp)]
    assert answers[tcp:] == [b"dicom handler got n%d" % i for i in range(tcp, len(streams))]
    assert not dispatcher.stats.refused


async def test_a_devices_stream_lines_are_limited_by_their_own_budget(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """A device churning admitted streams writes a bounded number of INFO lines (the
    rest held back and counted), and its refusal warnings still have their own budget;
    another device's lines are still written."""
    caplog.set_level(logging.INFO, logger="relay.agent.dispatch")
    dispatcher = world.agent.dispatcher
    dispatcher.stream_log_limit = LogLimiter(rate=0.001, burst=6)
    for _ in range(5):
        assert await echoed(world.open({"target": "tcp:echo"})) == b"ping"
    assert await echoed(world.open({"target": "dicom"})) == b"dicom handler got ping"
    await wait_until(lambda: dispatcher.stats.outcomes["handled"] == 1)

    def lines(device: str) -> list[logging.LogRecord]:
        return [
            r
            for r in caplog.records
            if r.getMessage() in ("stream open", "stream closed")
            and getattr(r, "device", "") == device
        ]

    await wait_until(lambda: dispatcher.stats.outcomes["closed"] == 5)
    assert len(lines(WS1)) == 6  # of 12
    assert dispatcher.stream_log_limit.allow(WS1, time.monotonic() + 3600) == 6
    assert await expect_reset(world.open({"target": "smtp"})) == ErrorCode.FORBIDDEN
    await wait_until(lambda: any(r.getMessage() == "stream refused" for r in caplog.records))

    outer = await device_link(world.pki, world.gateway.port, "ws2")
    other = await sealed(outer, world.pki, world.pki.device("ws2"))
    try:
        assert await echoed(other.open_stream({"target": "tcp:echo"})) == b"ping"
        ws2 = WS1.replace("/ws1", "/ws2")
        await wait_until(lambda: len(lines(ws2)) == 2)
    finally:
        other.close()
        outer.close()
