"""The gateway in-process, with real TLS links from agent- and device-shaped clients.

Covers routing by site, splicing, half-close, concurrency, and every refusal: each one
must be counted in relay_refusals_total with its reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography import x509

from gateway import server as gateway_server
from gateway.config import GatewayConfig
from gateway.limits import DeviceLimits
from gateway.server import GatewayServer
from gateway.service import run_gateway
from relay import wire
from relay.net import tls
from relay.net.aio import Link, Stream
from relay.net.bytestream import StreamResetError
from relay.ops.config import Address, TlsFiles
from relay.ops.loglimit import LogLimiter
from relay.proto import ErrorCode, LinkClosedError, LinkSettings
from relay.trust.identity import Identity
from relay.trust.notice import sign_notice
from relay.trust.revocation import (
    KIND_REFUSAL,
    KIND_REVOKE,
    REVOKED_REASON,
    decode_refusal,
    encode_revocations,
    goaway_reason,
)
from tests.pki_helpers import HOST, Pair, SitePki, make_pki

WAIT = 10.0
SETTINGS = LinkSettings()


@dataclass
class World:
    pki: SitePki
    server: GatewayServer
    pki_b: SitePki  # a second site's CA, of the same trust domain, in the gateway's bundle

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    def refusals(self, reason: str) -> float:
        value = self.server.metrics.registry.get_sample_value(
            "relay_refusals_total", {"reason": reason}
        )
        return value or 0.0


@contextlib.asynccontextmanager
async def start_world(tmp_path: Path, **overrides: Any) -> AsyncIterator[World]:
    """A gateway in-process; `overrides` are GatewayConfig fields (per_device, ...)."""
    site_pki = make_pki(tmp_path / "pki")
    site_b = make_pki(tmp_path / "pki-b", site="siteb")
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(site_pki.ca.read_bytes() + site_b.ca.read_bytes())
    config = GatewayConfig(
        path=tmp_path / "gateway.yaml",
        listen=Address(HOST, 0),
        metrics_listen=None,
        tls=TlsFiles(site_pki.gateway.cert, site_pki.gateway.key, bundle),
        **{"limits": LinkSettings(), "drain_grace": 1.0, "handshake_timeout": 5.0, **overrides},
    )
    stop = asyncio.Event()
    started: asyncio.Future[GatewayServer] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        run_gateway(config, stop=stop, started=started.set_result, handle_signals=False)
    )
    server = await asyncio.wait_for(started, WAIT)
    try:
        yield World(site_pki, server, site_b)
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with start_world(tmp_path) as found:
        yield found


async def echo(stream: Stream) -> None:
    with contextlib.suppress(StreamResetError):
        while data := await stream.read():
            await stream.write(data)
        await stream.write_eof()


async def connect(
    world: World, pair: Pair | None, alpn: str, *, serve: bool = False, ca: Path | None = None
) -> Link:
    loop = asyncio.get_running_loop()
    ctx = tls.client_context(
        pair.cert if pair else None, pair.key if pair else None, ca or world.pki.ca, alpn
    )

    tasks: set[asyncio.Task[None]] = set()

    def on_stream(stream: Stream) -> None:
        task = loop.create_task(echo(stream))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    _, link = await loop.create_connection(
        lambda: Link(client=True, settings=SETTINGS, on_stream=on_stream if serve else None),
        HOST,
        world.port,
        ssl=ctx,
        server_hostname=HOST,
    )
    if alpn == wire.ALPN_AGENT and serve:
        announce(link)
    return link


def announce(agent: Link, revoked: tuple[str, ...] = (), *, full: bool = True) -> None:
    """What a real agent sends first: its site's revocation list."""
    for body in encode_revocations(revoked, full=full):
        agent.send_control(KIND_REVOKE, body)


async def until(condition: Callable[[], bool]) -> None:
    """Poll a condition of the gateway's state (bounded), for states with no event."""
    async with asyncio.timeout(WAIT):
        while not condition():  # noqa: ASYNC110 - polling plain state
            await asyncio.sleep(0.01)


async def wait_for_agents(world: World, site: str, count: int = 1) -> None:
    for _ in range(200):
        if len(world.server.router.agent_links(site)) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("agent link never registered")


async def roundtrip(link: Link, payload: bytes) -> bytes:
    stream = link.open_stream({"target": "session"})

    async def send() -> None:
        await stream.write(payload)
        await stream.write_eof()

    sender = asyncio.create_task(send())
    parts = []
    while chunk := await stream.read(1 << 20):
        parts.append(chunk)
    await sender
    return b"".join(parts)


async def test_device_stream_reaches_agent_of_its_site(world: World) -> None:
    agent = await connect(world, world.pki.agent, wire.ALPN_AGENT, serve=True)
    await wait_for_agents(world, "main")
    device = await connect(world, world.pki.device("ws1"), wire.ALPN_DEVICE)
    payload = os.urandom(3_000_000)
    got = await asyncio.wait_for(roundtrip(device, payload), WAIT)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    sample = world.server.metrics.registry.get_sample_value(
        "relay_bytes_total", {"direction": "device_to_agent"}
    )
    assert sample == len(payload)
    device.close()
    agent.close()


async def test_own_certificate_expiry_is_exported(world: World) -> None:
    expiry = world.server.metrics.registry.get_sample_value(
        "relay_certificate_expiry_timestamp_seconds", {"role": "gateway"}
    )
    cert = x509.load_pem_x509_certificate(world.pki.gateway.cert.read_bytes())
    assert expiry == cert.not_valid_after_utc.timestamp()


async def test_twenty_concurrent_streams(world: World) -> None:
    world.server.devices.limits = DeviceLimits(streams=20)  # above the session cap of 8
    agent = await connect(world, world.pki.agent, wire.ALPN_AGENT, serve=True)
    await wait_for_agents(world, "main")
    device = await connect(world, world.pki.device("ws1"), wire.ALPN_DEVICE)
    payloads = [os.urandom(200_000 + i) for i in range(20)]
    results = await asyncio.wait_for(
        asyncio.gather(*(roundtrip(device, p) for p in payloads)), WAIT
    )
    assert results == payloads
    device.close()
    agent.close()


async def test_half_close_passes_through(world: World) -> None:
    """The device half-closes first and still receives everything the agent sends after."""
    loop = asyncio.get_running_loop()
    late = b"reply after your EOF"

    async def reply_after_eof(stream: Stream) -> None:
        assert await stream.read() == b"question"
        assert await stream.read() == b""
        await stream.write(late)
        await stream.write_eof()

    tasks: set[asyncio.Task[None]] = set()

    def spawn(coro: Coroutine[Any, Any, None]) -> None:
        task = loop.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    agent_pair = world.pki.agent
    ctx = tls.client_context(agent_pair.cert, agent_pair.key, world.pki.ca, wire.ALPN_AGENT)
    _, agent = await loop.create_connection(
        lambda: Link(
            client=True,
            settings=SETTINGS,
            on_stream=lambda s: spawn(reply_after_eof(s)),
        ),
        HOST,
        world.port,
        ssl=ctx,
        server_hostname=HOST,
    )
    announce(agent)
    await wait_for_agents(world, "main")
    device = await connect(world, world.pki.device("ws1"), wire.ALPN_DEVICE)
    stream = device.open_stream({"target": "session"})
    await stream.write(b"question")
    await stream.write_eof()
    assert await asyncio.wait_for(stream.read(), WAIT) == late
    assert await asyncio.wait_for(stream.read(), WAIT) == b""
    agent.close()
    device.close()


async def test_no_agent_for_site_resets_with_no_route(world: World, tmp_path: Path) -> None:
    other = world.pki_b.device("ws9")
    agent = await connect(world, world.pki.agent, wire.ALPN_AGENT, serve=True)
    await wait_for_agents(world, "main")
    device_b = await connect(world, other, wire.ALPN_DEVICE)
    stream = device_b.open_stream({"target": "session"})
    with pytest.raises(StreamResetError) as info:
        await asyncio.wait_for(stream.read(), WAIT)
    assert info.value.code == ErrorCode.NO_ROUTE
    assert (
        world.server.metrics.registry.get_sample_value(
            "relay_streams_total", {"site": "siteb", "outcome": "no_route"}
        )
        == 1.0
    )
    device_b.close()
    agent.close()


async def test_a_device_opens_only_sessions_and_says_nothing_about_itself(world: World) -> None:
    """Request streams travel inside sealed sessions only; the gateway adds no identity
    header (the agent takes the device from the session's inner certificate) and strips
    any x-relay-* header a device sends."""
    loop = asyncio.get_running_loop()
    seen: asyncio.Future[dict[str, str]] = loop.create_future()

    def on_stream(stream: Stream) -> None:
        seen.set_result(dict(stream.headers))
        stream.reset(ErrorCode.CANCEL)

    agent_pair = world.pki.agent
    ctx = tls.client_context(agent_pair.cert, agent_pair.key, world.pki.ca, wire.ALPN_AGENT)
    _, agent = await loop.create_connection(
        lambda: Link(client=True, settings=SETTINGS, on_stream=on_stream),
        HOST,
        world.port,
        ssl=ctx,
        server_hostname=HOST,
    )
    announce(agent)
    await wait_for_agents(world, "main")
    device = await connect(world, world.pki.device("ws1"), wire.ALPN_DEVICE)
    for target in ("dicom", "tcp:x", "renew", "enroll", ""):
        refused = device.open_stream({"target": target})
        with pytest.raises(StreamResetError) as info:
            await asyncio.wait_for(refused.read(), WAIT)
        assert info.value.code == ErrorCode.FORBIDDEN
    forbidden = world.server.metrics.registry.get_sample_value(
        "relay_streams_total", {"site": "main", "outcome": "forbidden"}
    )
    assert forbidden == 5.0
    device.open_stream({"target": "session", "x-relay-device": "spiffe://evil/device/main/boss"})
    headers = await asyncio.wait_for(seen, WAIT)
    assert headers == {"target": "session"}
    device.close()
    agent.close()


async def expect_refused(world: World, reason: str, link_factory: object) -> None:
    before = world.refusals(reason)
    try:
        link = await link_factory  # type: ignore[misc]
    except (TimeoutError, OSError, ConnectionError):
        pass  # refused during the handshake, as the client saw it
    else:
        await asyncio.wait_for(link.wait_closed(), WAIT)
    for _ in range(200):
        if world.refusals(reason) > before:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"no refusal counted for {reason}")


async def test_device_certificate_on_agent_endpoint_is_refused(world: World) -> None:
    await expect_refused(
        world, "wrong_role", connect(world, world.pki.device("ws1"), wire.ALPN_AGENT)
    )
    assert world.server.router.agent_links() == []


async def test_agent_certificate_on_device_endpoint_is_refused(world: World) -> None:
    await expect_refused(world, "wrong_role", connect(world, world.pki.agent, wire.ALPN_DEVICE))


async def test_expired_certificate_is_refused(world: World) -> None:
    expired = world.pki.device(
        "old", lifetime=timedelta(hours=1), not_before=datetime.now(UTC) - timedelta(days=2)
    )
    await expect_refused(world, "expired", connect(world, expired, wire.ALPN_DEVICE))


async def test_certificate_of_another_ca_is_refused(world: World, tmp_path: Path) -> None:
    stranger = make_pki(tmp_path / "other", trust_domain="hospital.test")
    pair = stranger.device("ws1")
    # The client trusts our gateway's CA but presents a certificate from another CA.
    await expect_refused(world, "unknown_ca", connect(world, pair, wire.ALPN_DEVICE))


async def test_no_certificate_is_refused(world: World) -> None:
    await expect_refused(world, "no_certificate", connect(world, None, wire.ALPN_DEVICE))


async def test_unknown_alpn_is_refused(world: World) -> None:
    await expect_refused(world, "alpn", connect(world, world.pki.device("ws1"), "something-else/1"))


async def test_agent_is_routed_to_only_after_its_revocation_snapshot(world: World) -> None:
    agent = await connect(world, world.pki.agent, wire.ALPN_AGENT, serve=False)
    agent.on_stream = lambda stream: stream.reset(ErrorCode.CANCEL)
    device = await connect(world, world.pki.device("ws1"), wire.ALPN_DEVICE)
    # Both links are attached (routing would have been set up there, if it did not wait).
    await until(
        lambda: len(world.server.links.agents) == 1 and len(world.server.links.devices) == 1
    )
    assert world.server.router.agent_links("main") == []
    stream = device.open_stream({"target": "session"})
    with pytest.raises(StreamResetError) as info:
        await asyncio.wait_for(stream.read(), WAIT)
    assert info.value.code == ErrorCode.NO_ROUTE
    announce(agent)
    await wait_for_agents(world, "main")
    device.close()
    agent.close()


async def test_revocation_closes_live_links_refuses_new_ones_and_is_reported(
    world: World,
) -> None:
    loop = asyncio.get_running_loop()
    reports: asyncio.Queue[bytes] = asyncio.Queue()
    agent = await connect(world, world.pki.agent, wire.ALPN_AGENT, serve=True)
    agent.on_control = lambda kind, body: reports.put_nowait(body) if kind == KIND_REFUSAL else None
    await wait_for_agents(world, "main")
    victim = await connect(world, world.pki.device("ws1"), wire.ALPN_DEVICE)
    bystander = await connect(world, world.pki.device("ws2"), wire.ALPN_DEVICE)
    assert await asyncio.wait_for(roundtrip(victim, b"before"), WAIT) == b"before"

    uri = Identity.device("hospital.test", "main", "ws1").uri
    started = loop.time()
    announce(agent, (uri,), full=False)
    closed = await asyncio.wait_for(victim.wait_closed(), WAIT)
    assert loop.time() - started < 2.0, "revocation must close live links at once"
    assert closed is not None
    assert world.server.metrics.registry.get_sample_value("relay_revoked_devices") == 1.0

    await expect_refused(
        world, "revoked", connect(world, world.pki.device("ws1"), wire.ALPN_DEVICE)
    )
    report = decode_refusal(await asyncio.wait_for(reports.get(), WAIT))
    assert (report.reason, report.identity) == ("revoked", uri)
    assert await asyncio.wait_for(roundtrip(bystander, b"still fine"), WAIT) == b"still fine"

    # A fresh snapshot without the device lets it in again (the agent's list is the truth).
    announce(agent, ())
    again = await connect(world, world.pki.device("ws1"), wire.ALPN_DEVICE)
    assert await asyncio.wait_for(roundtrip(again, b"back"), WAIT) == b"back"
    for link in (again, bystander, agent):
        link.close()


async def goaway_of(world: World, name: str) -> tuple[Link, asyncio.Future[tuple[int, str]]]:
    """A device link of `name` and the GOAWAY (code, reason) the gateway sends it."""
    loop = asyncio.get_running_loop()
    said: asyncio.Future[tuple[int, str]] = loop.create_future()

    def on_goaway(code: int, reason: str) -> None:
        if not said.done():
            said.set_result((code, reason))

    pair = world.pki.device(name)
    _, link = await loop.create_connection(
        lambda: Link(client=True, settings=SETTINGS, on_goaway=on_goaway),
        HOST,
        world.port,
        ssl=tls.client_context(pair.cert, pair.key, world.pki.ca, wire.ALPN_DEVICE),
        server_hostname=HOST,
    )
    return link, said


def announce_signed(agent: Link, notices: dict[str, str], *, full: bool = True) -> None:
    """What a current agent sends: version 2, each device with its notice."""
    for body in encode_revocations(notices, full=full, notices=notices):
        agent.send_control(KIND_REVOKE, body)


async def test_a_revoked_device_is_handed_the_agents_notice(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Live link and new dial alike, the GOAWAY REVOKED carries the notice untouched; an
    older agent's list (none) gets the plain words, and one warning for the site."""
    uri = Identity.device("hospital.test", "main", "ws1").uri
    notice = sign_notice(world.pki.ca_key, uri, datetime.now(UTC))
    agent = await connect(world, world.pki.agent, wire.ALPN_AGENT, serve=True)
    await wait_for_agents(world, "main")
    live, said = await goaway_of(world, "ws1")
    assert await asyncio.wait_for(roundtrip(live, b"up"), WAIT) == b"up"

    announce_signed(agent, {uri: notice}, full=False)
    assert await asyncio.wait_for(said, WAIT) == (ErrorCode.REVOKED, goaway_reason(notice))
    assert world.server.revoked.notice(uri) == notice
    _, again = await goaway_of(world, "ws1")
    assert await asyncio.wait_for(again, WAIT) == (ErrorCode.REVOKED, goaway_reason(notice))

    # An older agent of the same site: version 1, no notice for ws2.
    caplog.set_level(logging.WARNING, logger="gateway.control")
    ws2 = Identity.device("hospital.test", "main", "ws2").uri
    announce(agent, (ws2,), full=False)
    announce(agent, (ws2,), full=False)
    _, plain = await goaway_of(world, "ws2")
    assert await asyncio.wait_for(plain, WAIT) == (ErrorCode.REVOKED, REVOKED_REASON)
    assert world.server.revoked.notice(uri) == notice  # kept
    unsigned = [r for r in caplog.records if "without signed notices" in r.getMessage()]
    assert len(unsigned) == 1
    agent.close()


@pytest.mark.parametrize(
    "bad",
    [
        "notice",  # a notice the gateway cannot store as is
        "pair",  # a version-2 entry without its notice
        "second part",  # a snapshot whose second part is broken
    ],
)
async def test_a_malformed_list_keeps_the_old_set(
    world: World, bad: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The gateway refuses the whole message (closing the agent link, as for any bad
    control) and keeps every device and notice it held."""
    uri = Identity.device("hospital.test", "main", "ws1").uri
    notice = sign_notice(world.pki.ca_key, uri, datetime.now(UTC))
    agent = await connect(world, world.pki.agent, wire.ALPN_AGENT, serve=False)
    announce_signed(agent, {uri: notice})
    await wait_for_agents(world, "main")
    ws2 = Identity.device("hospital.test", "main", "ws2").uri
    base = {"v": 2, "full": False, "part": 0, "parts": 1}
    if bad == "notice":
        bodies = [json.dumps({**base, "devices": [[ws2, "x" * 200]]}).encode()]
    elif bad == "pair":
        bodies = [json.dumps({**base, "devices": [ws2]}).encode()]
    else:
        many = {f"{uri}-{i:04d}-{'x' * 40}": notice for i in range(300)}
        first, second, *_ = encode_revocations(many, full=True, notices=many)
        bodies = [first, second.replace(b'"rn1.', b'"rn1 ', 1)]
    for body in bodies:
        agent.send_control(KIND_REVOKE, body)
    await asyncio.wait_for(agent.wait_closed(), WAIT)
    (error,) = [r for r in caplog.records if r.getMessage().startswith("agent sent a bad control")]
    assert ("notice must be" if bad != "pair" else "[id, notice] pair") in error.__dict__["error"]
    assert world.server.revoked.devices("main") == {uri}
    assert world.server.revoked.notice(uri) == notice


async def test_revoked_device_that_stops_reading_is_aborted(world: World) -> None:
    """A revoked device that never reads its GOAWAY (stalled under bulk data) must not keep
    its gateway link and the buffers behind it: the gateway aborts it (REVOKED_CLOSE_BOUND)."""
    loop = asyncio.get_running_loop()
    agent = await connect(world, world.pki.agent, wire.ALPN_AGENT, serve=False)
    chunk = b"x" * 65536
    senders: set[asyncio.Task[None]] = set()

    async def flood(stream: Stream) -> None:
        with contextlib.suppress(StreamResetError, LinkClosedError):
            while True:
                await stream.write(chunk)

    def on_stream(stream: Stream) -> None:
        task = loop.create_task(flood(stream))
        senders.add(task)
        task.add_done_callback(senders.discard)

    agent.on_stream = on_stream
    announce(agent)
    await wait_for_agents(world, "main")

    # The device's kernel buffer is tiny, so what it does not read stays in the gateway.
    pair = world.pki.device("ws1")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, (HOST, world.port))
    _, device = await loop.create_connection(
        lambda: Link(client=True, settings=SETTINGS),
        sock=sock,
        ssl=tls.client_context(pair.cert, pair.key, world.pki.ca, wire.ALPN_DEVICE),
        server_hostname=HOST,
    )
    streams = [device.open_stream({"target": "session"}) for _ in range(8)]
    assert await asyncio.wait_for(streams[0].read(), WAIT)  # bulk data flows
    assert device.transport is not None
    device.transport.pause_reading()  # from now on the device reads nothing, GOAWAY included

    uri = Identity.device("hospital.test", "main", "ws1").uri
    (gateway_side,) = world.server.links.devices[uri]
    assert gateway_side.transport is not None
    transport = gateway_side.transport
    for _ in range(int(WAIT / 0.01)):  # the gateway holds data it cannot send
        if transport.get_write_buffer_size() > 0:
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("the gateway never had to buffer for the stalled device")

    revoked_at = loop.time()
    announce(agent, (uri,), full=False)
    for _ in range(300):
        if uri not in world.server.links.devices:
            break
        await asyncio.sleep(0.01)
    gone_after = loop.time() - revoked_at
    assert uri not in world.server.links.devices, "the stalled revoked link is still there"
    assert gone_after <= 2.0
    links = world.server.metrics.registry.get_sample_value(
        "relay_links", {"role": "device", "site": "main"}
    )
    assert links == 0.0
    device.abort()
    agent.close()
    for task in list(senders):
        task.cancel()
    await asyncio.gather(*senders, return_exceptions=True)


async def test_agent_revoking_another_sites_device_is_disconnected(world: World) -> None:
    agent = await connect(world, world.pki.agent, wire.ALPN_AGENT, serve=True)
    await wait_for_agents(world, "main")
    announce(agent, (Identity.device("hospital.test", "other", "x").uri,), full=False)
    await asyncio.wait_for(agent.wait_closed(), WAIT)
    assert world.server.router.agent_links("main") == []


async def test_a_device_reconnecting_in_a_loop_cannot_fill_the_log(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """The "link up" / "link down" lines are limited per identity: a device reconnecting
    as fast as it can handshake wrote two INFO lines a reconnect; another device's lines
    are its own (relay.ops.loglimit: the next line let through says how many were held)."""
    caplog.set_level(logging.INFO, logger="gateway.server")
    world.server.link_lines = LogLimiter(rate=0.001, burst=4)
    device = world.pki.device("ws1")
    for _ in range(6):
        link = await connect(world, device, wire.ALPN_DEVICE)
        link.close()
        await link.wait_closed()
    await until(lambda: not world.server.links.devices)
    lines = [r for r in caplog.records if r.getMessage() in ("link up", "link down")]
    assert len(lines) == 4
    assert all(getattr(r, "identity", "").endswith("/ws1") for r in lines)
    other = await connect(world, world.pki.device("ws2"), wire.ALPN_DEVICE)
    await until(lambda: any(getattr(r, "identity", "").endswith("/ws2") for r in caplog.records))
    other.close()
    await other.wait_closed()


class DeafLink(Link):
    """A device that reads nothing once its TLS handshake is done: not its GOAWAY, nor
    the TLS close, so the gateway's side lives until it aborts it."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        cast(asyncio.Transport, transport).pause_reading()


async def revoking_agent(world: World, name: str) -> Link:
    """An agent of site main whose revocation list names device `name`."""
    agent = await connect(world, world.pki.agent, wire.ALPN_AGENT, serve=True)
    announce(agent, (Identity.device("hospital.test", "main", name).uri,))
    await wait_for_agents(world, "main")
    return agent


async def dial_deaf(world: World, name: str) -> Link:
    pair = world.pki.device(name)
    _, link = await asyncio.get_running_loop().create_connection(
        lambda: DeafLink(client=True, settings=SETTINGS),
        HOST,
        world.port,
        ssl=tls.client_context(pair.cert, pair.key, world.pki.ca, wire.ALPN_DEVICE),
        server_hostname=HOST,
    )
    await until(lambda: world.refusals("revoked") >= 1)
    return link


async def test_revoked_links_being_closed_count_against_max_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A revoked device's link lives up to REVOKED_CLOSE_BOUND while it is told; it was
    counted nowhere, so links beyond max_links could live at once. Now it holds a place
    of max_links while it lives: the next dial finds the gateway full."""
    monkeypatch.setattr(gateway_server, "REVOKED_CLOSE_BOUND", 5.0)
    async with start_world(tmp_path, max_links=2) as world:
        agent = await revoking_agent(world, "ws1")
        deaf = await dial_deaf(world, "ws1")
        honest = connect(world, world.pki.device("ws2"), wire.ALPN_DEVICE)
        await expect_refused(world, "capacity", honest)
        deaf.abort()
        await until(lambda: not world.server._revoked_closing)
        again = await connect(world, world.pki.device("ws2"), wire.ALPN_DEVICE)
        assert await asyncio.wait_for(roundtrip(again, b"room"), WAIT) == b"room"
        for link in (again, agent):
            link.close()


async def test_revoked_links_told_at_once_are_bounded(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond REVOKED_CLOSING_MAX revoked links being told, the next is aborted untold
    (still counted as refused "revoked"); once one is gone, the next is told again."""
    monkeypatch.setattr(gateway_server, "REVOKED_CLOSE_BOUND", 5.0)
    monkeypatch.setattr(gateway_server, "REVOKED_CLOSING_MAX", 1, raising=False)
    agent = await revoking_agent(world, "ws1")
    deaf = await dial_deaf(world, "ws1")
    untold, said = await goaway_of(world, "ws1")
    await asyncio.wait_for(untold.wait_closed(), WAIT)
    assert not said.done()
    assert world.refusals("revoked") == 2
    deaf.abort()
    await until(lambda: not world.server._revoked_closing)
    _, told = await goaway_of(world, "ws1")
    assert (await asyncio.wait_for(told, WAIT))[0] == ErrorCode.REVOKED
    agent.close()
