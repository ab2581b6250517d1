"""Enrollment links through the gateway in-process, over real TLS: what a PC that is not
authenticated (anyone may open an enrollment link) can make the gateway hold."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import weakref

import pytest

from gateway import enroll, lifecycle, server
from gateway.limits import ENROLL_BUFFERED, DeviceLedger, DeviceLimits
from gateway.metrics import GatewayMetrics
from gateway.router import Router
from relay import wire
from relay.net import aio, tls
from relay.net.aio import Link, Stream
from relay.net.bytestream import StreamResetError
from relay.ops.config import Address
from relay.ops.loglimit import LogLimiter
from relay.proto import ErrorCode, LinkSettings
from relay.proto import frames as fr
from relay.proto.frames import FrameType
from relay.trust import enroll as enrolling
from relay.trust.codes import EnrollmentCode, new_secret, new_token_id
from tests.gateway.test_gateway_limits import hits, reset_code, until
from tests.gateway.test_gateway_links import WAIT, World, announce, connect, wait_for_agents, world
from tests.pki_helpers import HOST

__all__ = ["world"]  # the fixture, shared with test_gateway_links

ENROLL = {wire.HEADER_TARGET: wire.TARGET_ENROLL, wire.HEADER_SITE: "main"}


async def stalled_agent(world: World, held: list[Stream]) -> Link:
    """An agent link that takes its streams and never reads them: the gateway may send
    one stream window (64 KiB, the least a link may announce) on each, no more."""
    loop = asyncio.get_running_loop()
    pair = world.pki.agent
    ctx = tls.client_context(pair.cert, pair.key, world.pki.ca, wire.ALPN_AGENT)
    settings = LinkSettings(stream_window=64 * 1024, link_window=64 * 1024)
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


async def test_an_enrollment_stream_queues_no_more_than_its_budget(world: World) -> None:
    """The PC sends four budgets' worth towards an agent that reads nothing: what the
    agent's window cannot take queues in the gateway until ENROLL_BUFFERED, then the
    stream is reset with LIMIT_EXCEEDED on both sides and counted. The next PC enrolls."""
    held: list[Stream] = []
    agent = await stalled_agent(world, held)
    pc = await connect(world, None, wire.ALPN_ENROLL)
    stream = pc.open_stream(ENROLL)
    sent = asyncio.ensure_future(stream.write(bytes(4 * ENROLL_BUFFERED)))
    assert await reset_code(stream) == ErrorCode.LIMIT_EXCEEDED
    with contextlib.suppress(StreamResetError):
        await asyncio.wait_for(sent, WAIT)
    assert hits(world, "enroll_buffered") == 1
    await until(lambda: held and held[0].reset_code == ErrorCode.LIMIT_EXCEEDED, "agent reset")
    assert len(world.server.devices) == 0  # no device was charged
    streams_open = world.server.metrics.registry.get_sample_value(
        "relay_streams_open", {"site": "main"}
    )
    assert streams_open == 0

    honest = await connect(world, None, wire.ALPN_ENROLL)
    second = honest.open_stream(ENROLL)
    await second.write(b'{"v": 1}')
    await until(lambda: len(held) == 2, "the next enrollment reaches the agent")
    assert await asyncio.wait_for(held[1].read(), WAIT) == b'{"v": 1}'
    for link in (pc, honest, agent):
        link.close()


async def test_an_enrollment_link_routes_one_stream(world: World) -> None:
    """The budget is per stream; an enrollment link gets one, so it is the link's."""
    held: list[Stream] = []
    agent = await stalled_agent(world, held)
    pc = await connect(world, None, wire.ALPN_ENROLL)
    first = pc.open_stream(ENROLL)
    await first.write(b"x")
    await until(lambda: len(held) == 1, "the first stream routed")
    second = pc.open_stream(ENROLL)
    with pytest.raises(StreamResetError) as info:
        await asyncio.wait_for(second.read(), WAIT)
    assert info.value.code == ErrorCode.FORBIDDEN
    assert len(held) == 1
    pc.close()
    agent.close()


async def test_an_enrollment_link_that_stops_reading_frees_its_slot(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At LINK_LIFETIME the desk closes the link; a PC that reads nothing more never
    answers the TLS close, so the desk aborts it CLOSE_BOUND later: the slot (one of
    MAX_OPEN) comes back instead of waiting for TLS's own shutdown timeout."""
    monkeypatch.setattr(enroll, "LINK_LIFETIME", 0.2)
    monkeypatch.setattr(enroll, "CLOSE_BOUND", 0.3)
    desk = world.server.enrollment
    pc = await connect(world, None, wire.ALPN_ENROLL)
    await until(lambda: desk.open == 1, "the enrollment link is counted")
    assert pc.transport is not None
    pc.transport.pause_reading()  # reads nothing, answers nothing from now on
    start = asyncio.get_running_loop().time()
    await until(lambda: desk.open == 0, "the slot comes back")
    assert asyncio.get_running_loop().time() - start < 5.0
    pc.abort()


async def test_a_closed_enrollment_link_is_not_held_until_its_lifetime(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PC that closes its enrollment link at once frees all of it: the desk's
    LINK_LIFETIME timer held the closed link (with its TLS transport's buffers, about
    270 KB each under uvloop) for 30 s, and MAX_OPEN counts only open links, so
    attempts from many addresses piled up memory without bound."""
    desk = world.server.enrollment
    attached: list[weakref.ref[Link]] = []
    attach = desk.attach

    def recording(link: Link, host: str) -> None:
        attached.append(weakref.ref(link))
        attach(link, host)

    monkeypatch.setattr(desk, "attach", recording)
    for _ in range(3):
        pc = await connect(world, None, wire.ALPN_ENROLL)
        await until(lambda: desk.open == 1, "the enrollment link is counted")
        pc.abort()
        await until(lambda: desk.open == 0, "its slot comes back")
    assert len(attached) == 3
    await until(
        lambda: gc.collect() >= 0 and all(ref() is None for ref in attached),
        "the closed links are freed well before LINK_LIFETIME",
    )


def test_addresses_of_one_ipv6_slash_64_share_the_enrollment_attempts() -> None:
    """Enrollment attempts are paced per source, an IPv6 address's /64: keyed by the full
    address, one host made as many attempts as it had addresses (2^64). Another /64 and
    the next minute's attempts are admitted."""
    metrics = GatewayMetrics()
    desk = enroll.EnrollmentDesk(
        Router(metrics, DeviceLedger(DeviceLimits(), lambda _: None)), metrics
    )
    one_host = [f"2001:db8:0:1::{i:x}" for i in range(1, enroll.BURST + 2)]
    admitted = [desk.admit(host, 0.0) for host in one_host]
    assert admitted == [True] * enroll.BURST + [False]
    assert desk.admit("2001:db8:0:2::1", 0.0)
    assert desk.admit(one_host[-1], 60.0 / enroll.ATTEMPTS_PER_MINUTE)
    refused = metrics.registry.get_sample_value(
        "relay_enrollments_total", {"result": "rate_limited"}
    )
    assert refused == 1


PING = fr.encode(FrameType.PING, 0, 0, bytes(8))


async def unread_enrollment(world: World) -> None:
    """An enrollment link that sends PINGs and never reads the PONGs, until the gateway
    aborts it (its receive buffer small, so that the answers pile up in the gateway)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, (HOST, world.port))
    ctx = tls.client_context(None, None, world.pki.ca, wire.ALPN_ENROLL)
    transport, pc = await loop.create_connection(
        lambda: Link(client=True, settings=LinkSettings()), sock=sock, ssl=ctx, server_hostname=HOST
    )
    await asyncio.sleep(0.05)  # SETTINGS exchanged
    transport.pause_reading()
    async with asyncio.timeout(WAIT):
        while not pc.closed.done():
            transport.write(PING * 1024)
            await asyncio.sleep(0)
    pc.abort()


async def test_enrollment_links_left_unread_are_counted_and_their_lines_limited(
    world: World, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Anyone may open enrollment links, PING on each and read nothing: each is aborted
    (aio.CONTROL_REPLIES), and each wrote a warning, without limit. Now every one is
    counted (relay_limit_hits_total{limit="peer_unread"}) and the lines are limited per
    source as the refusal lines are (a burst of 1 here, the default LOG_BURST)."""
    monkeypatch.setattr(aio, "CONTROL_REPLIES", 16 * 1024)  # aborted sooner, same path
    lines = LogLimiter(burst=1, total=server.REFUSAL_LINES_TOTAL)
    monkeypatch.setattr(world.server, "unread_lines", lines, raising=False)
    caplog.set_level(logging.WARNING)
    for _ in range(3):
        await unread_enrollment(world)
    unread = [r for r in caplog.records if "does not read" in r.getMessage()]
    assert len(unread) == 1
    assert getattr(unread[0], "link", "") == f"enroll@{HOST}"
    assert hits(world, "peer_unread") == 3


async def test_a_draining_gateway_tells_an_enrolling_pc_it_is_shutting_down(world: World) -> None:
    """A PC enrolling while the gateway drains hears GOAWAY SHUTDOWN at once, its
    enrollment under way may go on, and its link is closed at the end of the grace. It
    was told nothing and left to the process's exit: a bare end of the connection, which
    `relay enroll` read as 'too many attempts from this address?'."""
    held: list[Stream] = []
    agent = await stalled_agent(world, held)
    pc = await connect(world, None, wire.ALPN_ENROLL)
    stream = pc.open_stream(ENROLL)
    await stream.write(b"x")
    await until(lambda: len(held) == 1, "the enrollment reaches the agent")
    drained = asyncio.ensure_future(lifecycle.drain(world.server, 0.5))
    await until(lambda: pc.goaway_code == ErrorCode.SHUTDOWN, "the PC is told")
    assert not pc.closed.done()  # the enrollment under way may still finish
    await asyncio.wait_for(drained, WAIT)
    await asyncio.wait_for(pc.wait_closed(), WAIT)
    assert world.server.enrollment.open == 0
    code = EnrollmentCode(Address(HOST, world.port), "0" * 64, "main", "ws1",
                          new_token_id(), new_secret())  # fmt: skip
    assert "is shutting down" in str(enrolling._closed_error(code, pc))
    agent.close()
