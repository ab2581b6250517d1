"""The syslog sender says when its collector fails and recovers (one line each, limited),
and the agent exports its counters (relay.agent.syslog)."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
import tracemalloc
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from relay.agent.audit import AuditEvent, AuditLog, Outcome, Participant
from relay.agent.audit.events import EV_QUERY
from relay.agent.config import load_agent_config
from relay.agent.syslog import (
    DEVICE_SHARE,
    FAILURE_LOG_INTERVAL,
    SyslogMetrics,
    SyslogSender,
    client_context,
)
from relay.ops.config import Address
from tests.agent.test_agent_service import agent_running
from tests.agent.test_audit import WAIT, Collector, collector
from tests.pki_helpers import HOST, make_pki

__all__ = ["collector"]  # the fixture, shared with test_audit

SECRET = b"patient Doe^Jane"


async def errors_reach(sender: SyslogSender, n: int) -> None:
    async with asyncio.timeout(WAIT):
        while sender.stats.errors < n:  # noqa: ASYNC110 - polling a plain counter
            await asyncio.sleep(0.01)


def said(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records]


async def test_a_failing_collector_is_said_once_with_why_and_its_recovery_once(
    collector: tuple[Collector, ssl.SSLContext], caplog: pytest.LogCaptureFixture
) -> None:
    coll, ctx = collector
    now = [1000.0]
    port = coll.port
    await coll.stop()  # the collector is away: connections are refused
    sender = SyslogSender(
        Address(HOST, port), ctx, retry_initial=0.01, retry_max=0.02, clock=lambda: now[0]
    )
    with caplog.at_level("INFO", logger="relay.agent.syslog"):
        sender.start()
        for _ in range(20):
            sender.submit(SECRET)
        await errors_reach(sender, 5)
        (warning,) = said(caplog)  # one line, long before the queue fills
        assert warning[0] == "WARNING" and "connect: " in warning[1]
        assert "refused" in warning[1].lower() and str(port) in warning[1]
        assert sender.failing
        await coll.start(port)
        await coll.wait_for(20)
        await asyncio.sleep(0)
        assert not sender.failing
        assert said(caplog)[1:] == [
            ("INFO", f"syslog collector {HOST}:{port} reachable again: sending audit events")
        ]
        # Away again within the interval: counted, not said (a flapping collector)...
        await coll.stop()
        sender.submit(SECRET)
        errors = sender.stats.errors
        await errors_reach(sender, errors + 3)
        assert len(caplog.records) == 2
        # ...and said once the interval has passed, while it stays away.
        now[0] += FAILURE_LOG_INTERVAL
        await errors_reach(sender, sender.stats.errors + 2)
        await sender.close(timeout=0.1)
    assert [level for level, _ in said(caplog)] == ["WARNING", "INFO", "WARNING"]
    assert all(SECRET.decode() not in message for _, message in said(caplog))


def test_the_counters_are_exported() -> None:
    sender = SyslogSender(
        Address(HOST, 6514), ssl.create_default_context(), queue_size=2, max_message=100
    )
    for message in (b"a", b"bb", b"dropped", b"x" * 101):  # not started: all stay queued
        sender.submit(message)
    sender.stats.sent, sender.stats.errors = 7, 3
    registry = CollectorRegistry()
    registry.register(SyslogMetrics(sender))

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("relay_syslog_events_total", result="sent") == 7
    assert value("relay_syslog_events_total", result="dropped") == 1
    assert value("relay_syslog_events_total", result="oversized") == 1
    assert value("relay_syslog_errors_total") == 3
    assert value("relay_syslog_queued_events") == 2
    assert value("relay_syslog_queued_bytes") == len(b"1 a") + len(b"2 bb")
    assert value("relay_syslog_up") == 1
    sender.failing = True
    assert value("relay_syslog_up") == 0


async def test_an_agent_with_audit_syslog_exports_the_senders_counters(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    with socket.socket() as unused:  # a port nothing listens on: the sender is not needed
        unused.bind((HOST, 0))
        port = unused.getsockname()[1]
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"site: main\ngateways: ['{HOST}:1']\nstate_dir: {tmp_path / 'state'}\n"
        f"tls: {{cert: {pki.agent.cert}, key: {pki.agent.key}, ca: {pki.ca}}}\n"
        f"pki: {{ca_cert: {pki.ca}, ca_key: {pki.directory / 'ca.key'}}}\n"
        f"audit: {{syslog: {{address: '{HOST}:{port}', ca: {pki.ca}}}}}\n"
    )
    async with agent_running(load_agent_config(config)) as (agent, _, _):
        registry = agent.metrics.registry
        assert registry.get_sample_value("relay_syslog_events_total", {"result": "sent"}) == 0
        assert registry.get_sample_value("relay_syslog_errors_total") is not None


async def test_a_collector_that_fails_verification_is_said_with_the_tls_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    other = make_pki(tmp_path / "other", trust_domain="other.test")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(other.gateway.cert, other.gateway.key)
    coll = Collector(server_ctx)
    await coll.start()
    site = make_pki(tmp_path / "site")
    sender = SyslogSender(
        Address(HOST, coll.port), client_context(site.ca), retry_initial=0.01, retry_max=0.02
    )
    with caplog.at_level("INFO", logger="relay.agent.syslog"):
        sender.start()
        sender.submit(SECRET)
        await errors_reach(sender, 3)
        await sender.close(timeout=0.1)
    await coll.stop()
    (line,) = said(caplog)
    assert "connect: TLS: certificate verify failed" in line[1], line


class Ceiling:
    """The backoff's jitter at its ceiling: its delays exactly, for a count of retries."""

    def uniform(self, a: float, b: float) -> float:
        return b


async def test_a_collector_that_drops_every_connection_is_retried_with_backoff(
    tmp_path: Path,
) -> None:
    """It takes a frame, then closes the connection (a collector that rejects our frames,
    a proxy without its backend). Each connect succeeds, so each was retried at once:
    a tight loop of handshakes while the queue lasted (50 events, 50 in a row)."""
    site = make_pki(tmp_path / "pki")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(site.gateway.cert, site.gateway.key)
    accepted = 0

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        size = int((await reader.readuntil(b" "))[:-1])
        await reader.readexactly(size)
        writer.transport.abort()

    server = await asyncio.start_server(drop, HOST, 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    sender = SyslogSender(
        Address(HOST, port),
        client_context(site.ca),
        retry_initial=0.3,
        retry_max=0.5,
        rng=Ceiling(),
    )
    sender.start()
    for _ in range(50):
        sender.submit(SECRET)
    await asyncio.sleep(1.0)
    await sender.close(timeout=0.1)
    server.close()
    await server.wait_closed()
    assert sender.stats.errors >= 2
    # One per backoff delay (0.3 s, then 0.5 s), not one per event.
    assert 2 <= accepted <= 4, accepted


def _query_of(device: str) -> AuditEvent:
    return AuditEvent(
        kind="query",
        event_id=EV_QUERY,
        action="E",
        at=dt.datetime(2030, 1, 1, tzinfo=dt.UTC),
        outcome=Outcome.SUCCESS,
        participants=(Participant(user_id=device, requestor=True),),
    )


def test_one_devices_flood_takes_only_its_share_of_the_queue() -> None:
    """The collector is away: a device's DICOM events fill a quarter of the queue, and
    then another device's events and the security events still find room."""
    sender = SyslogSender(Address(HOST, 9), ssl.create_default_context(), queue_size=8)
    assert sender.device_share == 8 // DEVICE_SHARE
    flood = "spiffe://hospital.test/device/main/ws1"
    for _ in range(100):
        sender.emit(_query_of(flood), '{"kind": "query"}')
    assert sender.queued == sender.device_share
    assert sender.stats.dropped == 100 - sender.device_share
    assert sender.submit(b"<13>1 - - - - - - another device", device="spiffe://x/device/main/ws2")
    for _ in range(8 - sender.device_share - 1):  # security events: the queue's bounds only
        assert sender.submit(b"<13>1 - - - - - - enrollment")
    assert sender.queued == 8
    assert not sender.submit(b"<13>1 - - - - - - one too many")


def test_the_queue_holds_little_more_than_its_byte_bound_in_memory(tmp_path: Path) -> None:
    """The byte bound counts framed bytes; each queued event also costs ~150 bytes of
    objects (a tuple, a bytes object, a deque slot). With the smallest events the agent
    writes (~0.8 KB framed) that stays within a quarter more, whatever `queue` allows."""
    bound = 1024 * 1024
    sender = SyslogSender(
        Address(HOST, 9),
        ssl.create_default_context(),
        queue_size=1_000_000,
        max_queued_bytes=bound,
        hostname="agent.hospital.test",
    )
    audit = AuditLog(tmp_path / "audit.jsonl", source_id="spiffe://hospital.test/agent/main")
    audit.sink = sender
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        while sender.stats.dropped == 0:  # not started: the queue only fills
            audit.it_logout(now=now, admin="a", peer=None, description="")
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert sender.queued_bytes <= bound and sender.queued > 1000
    assert held <= bound * 1.25, (held, sender.queued)
