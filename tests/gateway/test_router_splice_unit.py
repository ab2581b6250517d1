"""The router and the splice on Links without sockets: which headers reach the agent, and
how a spliced reset is counted.

A device is hostile: nothing it sends may order its session ahead of another device's on
the shared agent link (the `priority` header is the opener's, and on an outer `session`
stream the gateway is the opener towards the agent).
"""

from __future__ import annotations

from gateway.limits import ENROLL_BUFFERED, SESSION_OPEN_BURST, DeviceLedger, DeviceLimits
from gateway.metrics import GatewayMetrics
from gateway.router import Router
from gateway.splice import CHUNK_COST
from relay.net.aio import Link, Stream
from relay.proto import DEFAULT_PRIORITY, ErrorCode, LinkSettings, StreamReset
from relay.proto import frames as fr
from relay.wire import HEADER_PEER, HEADER_PRIORITY, HEADER_SITE, HEADER_TARGET

EVIL = "spiffe://td/device/main/evil"
GOOD = "spiffe://td/device/main/good"


def _world() -> tuple[Router, GatewayMetrics, Link, Link]:
    metrics = GatewayMetrics()
    router = Router(metrics, DeviceLedger(DeviceLimits(), lambda _: None))
    agent = Link(client=False, settings=LinkSettings(), name="agent@x", autostart=False)
    agent.conn._settings_received = True  # as if the agent's SETTINGS had arrived
    router.add_agent("main", agent)
    device = Link(client=False, settings=LinkSettings(), name="dev", autostart=False)
    return router, metrics, agent, device


def _device_stream(device: Link, stream_id: int, headers: dict[str, str]) -> Stream:
    stream = device.streams[stream_id] = Stream(device, stream_id, headers)
    return stream


def _opens_sent(agent: Link) -> list[dict[str, str]]:
    """The header blocks of the OPEN frames the gateway wrote towards the agent."""
    frames = fr.FrameDecoder(1 << 20).feed(agent.conn.data_to_send())
    return [fr.decode_headers(f.payload) for f in frames if f.type == fr.FrameType.OPEN]


def _resets(metrics: GatewayMetrics, code: str) -> float:
    value = metrics.registry.get_sample_value("relay_stream_resets_total", {"code": code})
    return value or 0.0


# --------------------------------------------------------------------------- priority


async def test_a_devices_priority_header_never_reaches_the_agent_link() -> None:
    router, _, agent, device = _world()
    hostile = _device_stream(
        device, 2, {HEADER_TARGET: "session", HEADER_PRIORITY: "u=0", "x-relay-peer": "1.2.3.4"}
    )
    honest = _device_stream(device, 4, {HEADER_TARGET: "session"})
    router.route_session("main", hostile, EVIL)
    router.route_session("main", honest, GOOD)
    assert len(agent.streams) == 2
    for upstream in agent.streams.values():
        assert dict(upstream.headers) == {HEADER_TARGET: "session"}
        assert upstream.priority == DEFAULT_PRIORITY  # the gateway's own core
    opens = _opens_sent(agent)  # and what the agent's core will parse
    assert opens == [{HEADER_TARGET: "session"}, {HEADER_TARGET: "session"}]


async def test_an_enrollment_streams_priority_header_is_dropped_too() -> None:
    router, _, agent, device = _world()
    stream = _device_stream(
        device, 2, {HEADER_TARGET: "enroll", HEADER_SITE: "main", HEADER_PRIORITY: "u=0, i=?0"}
    )
    router.route("main", stream, {HEADER_PEER: "10.0.0.9"})
    assert _opens_sent(agent) == [
        {HEADER_TARGET: "enroll", HEADER_SITE: "main", HEADER_PEER: "10.0.0.9"}
    ]
    (upstream,) = agent.streams.values()
    assert upstream.priority == DEFAULT_PRIORITY


# --------------------------------------------------------------------------- resets


async def test_a_device_reset_is_counted_once_and_frees_the_session() -> None:
    router, metrics, agent, device = _world()
    stream = _device_stream(device, 2, {HEADER_TARGET: "session"})
    router.route_session("main", stream, GOOD)
    (upstream,) = agent.streams.values()
    device._dispatch([StreamReset(2, ErrorCode.CANCEL, remote=True)])  # the device's RESET
    assert _resets(metrics, "cancel") == 1
    assert upstream.reset_code == ErrorCode.CANCEL
    assert metrics.registry.get_sample_value("relay_streams_open", {"site": "main"}) == 0
    assert router.devices.usage(GOOD).streams == 0


async def test_an_agent_reset_is_counted_once() -> None:
    router, metrics, agent, device = _world()
    stream = _device_stream(device, 2, {HEADER_TARGET: "session"})
    router.route_session("main", stream, GOOD)
    (sid,) = agent.streams
    agent._dispatch([StreamReset(sid, ErrorCode.REVOKED, remote=True)])
    assert _resets(metrics, "revoked") == 1
    assert stream.reset_code == ErrorCode.REVOKED
    assert metrics.registry.get_sample_value("relay_streams_open", {"site": "main"}) == 0


# --------------------------------------------------------------------------- session opens


async def test_a_device_opening_sessions_in_a_loop_is_limited_others_are_not() -> None:
    router, metrics, _agent, device = _world()
    for who in (EVIL, GOOD):
        assert router.devices.add_link(who)
    codes = []
    for i in range(SESSION_OPEN_BURST + 5):
        stream = _device_stream(device, 2 + 2 * i, {HEADER_TARGET: "session"})
        router.route_session("main", stream, EVIL)
        stream.reset(ErrorCode.CANCEL)  # and at once reset: the rapid reset
        codes.append(stream.reset_code)
    assert codes[:SESSION_OPEN_BURST] == [ErrorCode.CANCEL] * SESSION_OPEN_BURST
    assert codes[SESSION_OPEN_BURST:] == [ErrorCode.LIMIT_EXCEEDED] * 5
    assert (
        metrics.registry.get_sample_value(
            "relay_streams_total", {"site": "main", "outcome": "device_opens"}
        )
        == 5
    )
    honest = _device_stream(device, 1000, {HEADER_TARGET: "session"})
    router.route_session("main", honest, GOOD)
    assert honest.reset_code is None


async def test_reconnecting_brings_no_new_burst_of_session_opens() -> None:
    """Linked, unlinked and linked again as the server does (add_link on accept,
    remove_link on close): the device's bucket is the same one, so ten quick reconnects
    open SESSION_OPEN_BURST sessions at the agent in all, not ten bursts."""
    router, _metrics, agent, _device = _world()
    agent.conn._peer_max_streams = 1 << 20  # as if the agent announced room for all
    admitted = 0
    stream_id = 2
    for _ in range(10):
        assert router.devices.add_link(EVIL)
        device = Link(client=False, settings=LinkSettings(), name="dev", autostart=False)
        for _ in range(SESSION_OPEN_BURST + 2):
            stream = _device_stream(device, stream_id, {HEADER_TARGET: "session"})
            stream_id += 2
            router.route_session("main", stream, EVIL)
            if stream.reset_code is None:
                admitted += 1
                stream.reset(ErrorCode.CANCEL)
        router.devices.remove_link(EVIL)
        assert len(router.devices) == 0
    assert admitted <= SESSION_OPEN_BURST + 1  # a second at most may pass meanwhile
    assert len(_opens_sent(agent)) == admitted


# --------------------------------------------------------------------------- buffered


async def test_tiny_chunks_count_their_overhead_against_the_devices_budget() -> None:
    """A device whose agent stream takes nothing more, sending 1-byte DATA frames: each
    queued chunk holds ~41 bytes of the gateway's memory besides its byte, so the budget
    must count that (splice.CHUNK_COST), or the device holds ~40 times its cap."""
    budget = 64 * 1024
    metrics = GatewayMetrics()
    router = Router(metrics, DeviceLedger(DeviceLimits(buffered=budget), lambda _: None))
    agent = Link(client=False, settings=LinkSettings(), name="agent@x", autostart=False)
    agent.conn._settings_received = True
    router.add_agent("main", agent)
    device = Link(client=False, settings=LinkSettings(), name="dev", autostart=False)
    stream = _device_stream(device, 2, {HEADER_TARGET: "session"})
    router.route_session("main", stream, GOOD)
    (upstream,) = agent.streams.values()
    splice = stream.listener
    assert splice is not None
    while upstream.send_credit() > 0:  # the agent's side takes nothing more
        upstream.send_nowait(bytes(min(upstream.send_credit(), 16384)))
    sent = 0
    while stream.reset_code is None and sent < budget:
        splice.on_data(stream, b"x")
        sent += 1
    assert stream.reset_code == ErrorCode.LIMIT_EXCEEDED
    assert sent * (1 + CHUNK_COST) <= budget + 2 * (1 + CHUNK_COST)
    assert router.devices.usage(GOOD).buffered == 0  # all given back at the reset


async def test_an_enrollment_stream_has_a_budget_of_its_own() -> None:
    """An enrollment stream belongs to no device and its PC is anyone: with the agent's
    side taking nothing more, 1-byte DATA frames are queued only up to ENROLL_BUFFERED
    (chunks counted with CHUNK_COST), then the stream is reset with LIMIT_EXCEEDED, both
    sides, and counted."""
    hits: list[str] = []
    metrics = GatewayMetrics()
    router = Router(metrics, DeviceLedger(DeviceLimits(), hits.append))
    agent = Link(client=False, settings=LinkSettings(), name="agent@x", autostart=False)
    agent.conn._settings_received = True
    router.add_agent("main", agent)
    pc = Link(client=False, settings=LinkSettings(), name="enroll@10.0.0.9", autostart=False)
    stream = _device_stream(pc, 1, {HEADER_TARGET: "enroll", HEADER_SITE: "main"})
    router.route("main", stream, {HEADER_PEER: "10.0.0.9"})
    (upstream,) = agent.streams.values()
    splice = stream.listener
    assert splice is not None
    while upstream.send_credit() > 0:  # the agent's side takes nothing more
        upstream.send_nowait(bytes(min(upstream.send_credit(), 16384)))
    sent = 0
    while stream.reset_code is None and sent < LinkSettings().stream_window:
        splice.on_data(stream, b"x")
        sent += 1
    assert stream.reset_code == ErrorCode.LIMIT_EXCEEDED
    assert upstream.reset_code == ErrorCode.LIMIT_EXCEEDED
    assert sent * (1 + CHUNK_COST) <= ENROLL_BUFFERED + 2 * (1 + CHUNK_COST)
    assert hits == ["enroll_buffered"]
    assert len(router.devices) == 0  # no device was charged
    assert metrics.registry.get_sample_value("relay_streams_open", {"site": "main"}) == 0
