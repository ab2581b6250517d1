"""LinkTrust against a hostile gateway: a TLS listener on 127.0.0.1 holding the site's
gateway certificate, which sends whatever "refusal" reports it likes on the agent's link.

The threat model says the DMZ gateway may be compromised: its reports reach the audit
trail, so they are limited per gateway link (a burst, then a steady rate) and the rest
are counted into one event, never written one by one.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import re
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from relay import wire
from relay.agent.audit import AUDIT_FILE, MAX_LINE_BYTES, AuditLog, Outcome, read_events
from relay.agent.authority import DeviceAuthority
from relay.agent.config import PkiFiles
from relay.agent.linktrust import REFUSAL_BURST, LinkTrust
from relay.agent.registry import REGISTRY_FILE, DeviceRegistry
from relay.agent.service import Agent, run_agent
from relay.net import tls
from relay.net.aio import Link
from relay.net.dialer import dial
from relay.ops.config import Address
from relay.proto import ErrorCode, LinkSettings
from relay.trust.revocation import (
    Refusal,
    RevocationAssembler,
    RevocationList,
    decode_hello,
    decode_revocations,
    encode_hello,
    encode_refusal,
)
from relay.wire import KIND_HELLO, KIND_REFUSAL, KIND_REVOKE
from tests.ends_helpers import agent_config, wait_until
from tests.pki_helpers import HOST, SitePki, make_pki

WAIT = 10.0
DONE = "test-done"  # a control kind LinkTrust ignores: every report before it was handled
DEVICE = "spiffe://hospital.test/device/main/"
EARLIER = re.compile(r"\((\d+) earlier refusals from this gateway rate-limited")
SUPPRESSED = re.compile(r"\((\d+) similar refusals not reported\)")


class HostileGateway:
    """The gateway end of each agent link that reaches the listener, in arrival order.

    `speaks`: "anything" takes every "revoke" and never answers a hello (the test may,
    on `far`); "old" is a gateway of the release before signed notices (52fd8a6): it
    never answers a hello (an unknown kind, ignored) and closes the agent link with
    PROTOCOL_ERROR on a "revoke" of any version but 1, as its AgentControl did.
    """

    def __init__(self, speaks: str = "anything") -> None:
        self.speaks = speaks
        self.links: asyncio.Queue[Link] = asyncio.Queue()
        self.revoked: asyncio.Queue[bytes] = asyncio.Queue()  # "revoke" bodies from agents
        self.hellos: asyncio.Queue[bytes] = asyncio.Queue()  # "hello" bodies from agents
        self.port = 0

    def factory(self) -> Link:
        link = Link(client=False, settings=LinkSettings(), name="hostile gateway")
        link.on_control = functools.partial(self._on_control, link)
        self.links.put_nowait(link)
        return link

    def _on_control(self, link: Link, kind: str, body: bytes) -> None:
        if kind == wire.KIND_HELLO:
            self.hellos.put_nowait(body)
        elif kind == KIND_REVOKE:
            if self.speaks == "old" and decode_revocations(body).version != 1:
                link.close(ErrorCode.PROTOCOL_ERROR, "bad control message")
                return
            self.revoked.put_nowait(body)


@contextlib.asynccontextmanager
async def hostile_gateway(site: SitePki, speaks: str = "anything") -> AsyncIterator[HostileGateway]:
    gateway = HostileGateway(speaks)
    ctx = tls.server_context(site.gateway.cert, site.gateway.key, site.ca)
    server = await asyncio.get_running_loop().create_server(gateway.factory, HOST, 0, ssl=ctx)
    gateway.port = server.sockets[0].getsockname()[1]
    try:
        yield gateway
    finally:
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def agent_link(
    site: SitePki, gateway: HostileGateway, trust: LinkTrust
) -> AsyncIterator[tuple[Link, Link, asyncio.Event]]:
    """The agent's link to `gateway` (named as the agent names a gateway address) with
    LinkTrust attached as on link-up; the gateway's end; an Event set when DONE arrives."""
    ctx = tls.client_context(site.agent.cert, site.agent.key, site.ca, wire.ALPN_AGENT)
    link = await dial(
        Address(HOST, gateway.port),
        ctx,
        LinkSettings(),
        alpn=wire.ALPN_AGENT,
        name=f"gateway {HOST}:{gateway.port} at {HOST}",
        timeout=WAIT,
    )
    trust.on_link_up(link)
    handled = link.on_control
    assert handled is not None
    done = asyncio.Event()

    def on_control(kind: str, body: bytes) -> None:
        handled(kind, body)
        if kind == DONE:
            done.set()

    link.on_control = on_control
    far = await asyncio.wait_for(gateway.links.get(), WAIT)
    try:
        yield link, far, done
    finally:
        link.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(link.wait_closed(), WAIT)


async def flood(far: Link, done: asyncio.Event, refusals: list[Refusal]) -> None:
    """Send every report, then wait until the agent has handled them all."""
    for refusal in refusals:
        far.send_control(KIND_REFUSAL, encode_refusal(refusal))
    far.send_control(DONE, b"")
    await asyncio.wait_for(done.wait(), WAIT)


def authority_with_trail(site: SitePki, state: Path, audit: AuditLog) -> DeviceAuthority:
    state.mkdir(exist_ok=True)
    registry = DeviceRegistry(state / REGISTRY_FILE, site="main")
    return DeviceAuthority(
        site="main", ca_key=site.ca_key, ca_cert=site.ca_cert, registry=registry, audit=audit
    )


def refused_events(path: Path) -> list[dict[str, object]]:
    return [e for e in read_events(path) if e["kind"] == "auth_refused"]


def description(event: dict[str, object]) -> str:
    identification = event["EventIdentification"]
    assert isinstance(identification, dict)
    text = identification["EventOutcomeDescription"]
    assert isinstance(text, str)
    return text


def refused_identity(event: dict[str, object]) -> str:
    participants = event["ActiveParticipant"]
    assert isinstance(participants, list)
    user = participants[0]["UserID"]
    assert isinstance(user, str)
    return user


def refusals_in(event: dict[str, object]) -> int:
    """The refusals one audit event stands for: its own, the gateway's suppressed ones,
    and the earlier ones rate-limited into it."""
    text = description(event)
    counts = [int(m.group(1)) for m in (EARLIER.search(text), SUPPRESSED.search(text)) if m]
    return 1 + sum(counts)


async def test_a_refusal_flood_cannot_rotate_the_trail_away(tmp_path: Path) -> None:
    """2,000 reports (the defaults: a burst of REFUSAL_BURST, then one a minute) leave
    the agent's own enrollment event in a trail that holds ~160 events, and every
    report is counted in the one event written for the rest."""
    site = make_pki(tmp_path / "pki")
    state = tmp_path / "state"
    audit = AuditLog(
        state / AUDIT_FILE,
        source_id="spiffe://hospital.test/agent/main",
        max_bytes=MAX_LINE_BYTES,  # the smallest trail there is: 64 KiB and one older file
        keep=1,
    )
    authority = authority_with_trail(site, state, audit)
    victim = DEVICE + "victim"
    audit.enrollment(
        now=dt.datetime.now(dt.UTC),
        device=victim,
        token_id="00" * 8,
        peer=None,
        outcome=Outcome.SUCCESS,
        description="the agent's own event",
    )
    trust = LinkTrust(authority, list)
    reports = 2000
    forged = Refusal("revoked", DEVICE + "radiologist-7", "203.0.113.9:1")
    async with hostile_gateway(site) as gateway, agent_link(site, gateway, trust) as (_, far, done):
        await flood(far, done, [forged] * reports)
        events = read_events(audit.path)
        assert [e for e in events if e["kind"] == "enrollment"], "the flood rotated it away"
        assert len(refused_events(audit.path)) == REFUSAL_BURST
    registry = CollectorRegistry()
    registry.register(trust.metrics)
    counted = {
        result: registry.get_sample_value("relay_refusal_reports_total", {"result": result})
        for result in ("recorded", "rate_limited", "malformed")
    }
    assert counted == {
        "recorded": REFUSAL_BURST,
        "rate_limited": reports - REFUSAL_BURST,
        "malformed": 0,
    }
    trust.close()  # at shutdown: what was held back is written, as one event
    refused = refused_events(audit.path)
    assert len(refused) == REFUSAL_BURST + 1
    assert sum(refusals_in(e) for e in refused) == reports
    assert description(refused[-1]) == (
        f"revoked ({reports - REFUSAL_BURST - 1} earlier refusals from this gateway"
        " rate-limited, not audited one by one)"
    )
    authority.close()


async def test_held_reports_are_written_once_the_bucket_refills(tmp_path: Path) -> None:
    """No report after the flood: the count still reaches the trail, on a timer, within
    the bucket (never more events than burst + rate x time)."""
    site = make_pki(tmp_path / "pki")
    state = tmp_path / "state"
    audit = AuditLog(state / AUDIT_FILE, source_id="spiffe://hospital.test/agent/main")
    authority = authority_with_trail(site, state, audit)
    per_second = 20.0
    trust = LinkTrust(authority, list, burst=2, per_second=per_second)
    loop = asyncio.get_running_loop()
    reports = [
        Refusal("revoked", f"{DEVICE}d{i}", "203.0.113.9:1", suppressed=1) for i in range(10)
    ]
    async with hostile_gateway(site) as gateway, agent_link(site, gateway, trust) as (_, far, done):
        started = loop.time()
        await flood(far, done, reports)
        await wait_until(
            lambda: any(refused_identity(e) == f"{DEVICE}d9" for e in refused_events(audit.path))
        )
        elapsed = loop.time() - started
    refused = refused_events(audit.path)
    assert sum(refusals_in(e) for e in refused) == 2 * len(reports)
    assert len(refused) <= 2 + per_second * elapsed + 1
    assert refused_identity(refused[-1]) == f"{DEVICE}d9"  # the last one is the one written
    trust.close()
    assert len(refused_events(audit.path)) == len(refused)  # nothing left to write
    authority.close()


async def test_a_redialled_link_gets_no_new_burst(tmp_path: Path) -> None:
    """The bucket belongs to the gateway address (the link's name), so a gateway that
    closes its link to be dialled again does not refill it."""
    site = make_pki(tmp_path / "pki")
    state = tmp_path / "state"
    audit = AuditLog(state / AUDIT_FILE, source_id="spiffe://hospital.test/agent/main")
    authority = authority_with_trail(site, state, audit)
    trust = LinkTrust(authority, list, burst=3, per_second=1 / 3600)
    forged = Refusal("revoked", DEVICE + "ws1", "203.0.113.9:1")
    async with hostile_gateway(site) as gateway:
        for _ in range(3):
            async with agent_link(site, gateway, trust) as (_, far, done):
                await flood(far, done, [forged] * 10)
    assert len(refused_events(audit.path)) == 3
    trust.close()
    (*_, folded) = refused_events(audit.path)
    assert refusals_in(folded) == 30 - 3
    authority.close()


async def test_without_pki_the_log_is_limited_the_same_way(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    site = make_pki(tmp_path / "pki")
    trust = LinkTrust(None, list, burst=3, per_second=1 / 3600)
    forged = Refusal("revoked", DEVICE + "ws1", "203.0.113.9:1", suppressed=5)
    caplog.set_level(logging.WARNING, logger="relay.agent.linktrust")
    async with hostile_gateway(site) as gateway, agent_link(site, gateway, trust) as (_, far, done):
        await flood(far, done, [forged] * 100)
    trust.close()
    lines = [r for r in caplog.records if r.getMessage() == "a gateway refused a link of this site"]
    assert [getattr(r, "rate_limited", None) for r in lines] == [0, 0, 0, 96 * 6]
    assert all(getattr(r, "suppressed", None) == 5 for r in lines)


async def test_malformed_reports_are_counted_and_logged_within_the_bucket(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    site = make_pki(tmp_path / "pki")
    state = tmp_path / "state"
    audit = AuditLog(state / AUDIT_FILE, source_id="spiffe://hospital.test/agent/main")
    authority = authority_with_trail(site, state, audit)
    trust = LinkTrust(authority, list, burst=2, per_second=1 / 3600)
    caplog.set_level(logging.WARNING, logger="relay.agent.linktrust")
    async with hostile_gateway(site) as gateway, agent_link(site, gateway, trust) as (_, far, done):
        for _ in range(50):
            far.send_control(KIND_REFUSAL, b"\xff not a report")
        await flood(far, done, [])
    trust.close()
    assert trust.metrics.reports == {"recorded": 0, "rate_limited": 0, "malformed": 50}
    assert [r.getMessage() for r in caplog.records] == ["malformed refusal report"] * 2
    assert refused_events(audit.path) == []
    authority.close()


async def test_the_agent_exports_the_counts_and_writes_what_is_held_at_shutdown(
    tmp_path: Path,
) -> None:
    """The whole agent (`run_agent`, `pki:` set) dialling the hostile gateway."""
    site = make_pki(tmp_path / "pki")
    reports = 100
    forged = Refusal("revoked", DEVICE + "ws1", "203.0.113.9:1")
    async with hostile_gateway(site) as gateway:
        config = replace(
            agent_config(site, tmp_path, [gateway.port], {}),
            pki=PkiFiles(site.ca, site.directory / "ca.key"),
        )
        stop = asyncio.Event()
        started: asyncio.Future[Agent] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(
            run_agent(config, stop=stop, started=started.set_result, handle_signals=False)
        )
        try:
            agent = await asyncio.wait_for(started, WAIT)
            far = await asyncio.wait_for(gateway.links.get(), WAIT)
            await asyncio.wait_for(gateway.revoked.get(), WAIT)  # LinkTrust is on the link
            for _ in range(reports):
                far.send_control(KIND_REFUSAL, encode_refusal(forged))
            metrics = agent.metrics.registry

            def counted(result: str) -> float:
                value = metrics.get_sample_value("relay_refusal_reports_total", {"result": result})
                return float(value or 0.0)

            await wait_until(lambda: counted("recorded") + counted("rate_limited") == reports)
            assert counted("recorded") == REFUSAL_BURST
        finally:
            stop.set()
            await asyncio.wait_for(task, WAIT)
    refused = refused_events(config.state_dir / AUDIT_FILE)
    assert len(refused) == REFUSAL_BURST + 1
    assert sum(refusals_in(e) for e in refused) == reports


async def test_the_list_is_built_off_the_loop_and_increments_follow_it(tmp_path: Path) -> None:
    """The full list is built in a worker thread while the loop runs on, and an increment
    pushed meanwhile reaches that link after it, never before (a snapshot read before
    the revocation would otherwise undo it). A gateway that never answers the hello gets
    both in version 1."""
    site = make_pki(tmp_path / "pki")
    audit = AuditLog(tmp_path / "audit.log", source_id="a", site="main")
    authority = authority_with_trail(site, tmp_path / "state", audit)
    authority.registry.revoke("old", dt.datetime.now(dt.UTC))
    building, release = threading.Event(), threading.Event()
    real = authority.revocation_snapshot

    def slow_snapshot(*, signed: bool = True) -> list[bytes]:
        building.set()
        assert release.wait(WAIT)
        return real(signed=signed)

    authority.revocation_snapshot = slow_snapshot  # type: ignore[method-assign]
    links: list[Link] = []
    trust = LinkTrust(authority, lambda: links)
    async with hostile_gateway(site) as gateway, agent_link(site, gateway, trust) as (link, _, _):
        links.append(link)
        await asyncio.to_thread(building.wait, WAIT)  # the loop is free meanwhile
        (increment,) = authority.revoke("ws1")
        trust.push([increment])
        await asyncio.sleep(0.05)
        assert gateway.revoked.empty()  # held back behind the list
        release.set()
        first = await asyncio.wait_for(gateway.revoked.get(), WAIT)
        second = await asyncio.wait_for(gateway.revoked.get(), WAIT)
    assert decode_revocations(first).full and decode_revocations(first).version == 1
    increment_seen = decode_revocations(second)
    assert not increment_seen.full and DEVICE + "ws1" in increment_seen.devices
    assert increment_seen.version == 1
    trust.close()
    authority.close()


async def test_an_old_gateway_gets_version_1_and_keeps_the_site_routed(tmp_path: Path) -> None:
    """The whole agent against a gateway of the release before signed notices, which
    closes the agent link on a version-2 list: the agent's site is routed at once (a
    version-1 full list first) and stays so; a revocation reaches it in version 1, on
    the same link (no PROTOCOL_ERROR close, no redial)."""
    site = make_pki(tmp_path / "pki")
    async with hostile_gateway(site, speaks="old") as gateway:
        config = replace(
            agent_config(site, tmp_path, [gateway.port], {}),
            pki=PkiFiles(site.ca, site.directory / "ca.key"),
        )
        stop = asyncio.Event()
        started: asyncio.Future[Agent] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(
            run_agent(config, stop=stop, started=started.set_result, handle_signals=False)
        )
        try:
            agent = await asyncio.wait_for(started, WAIT)
            far = await asyncio.wait_for(gateway.links.get(), WAIT)
            hello = decode_hello(await asyncio.wait_for(gateway.hellos.get(), WAIT))
            assert hello.revoke == {1, 2}  # said, and ignored by this gateway
            first = decode_revocations(await asyncio.wait_for(gateway.revoked.get(), WAIT))
            assert first.full and first.version == 1
            assert agent.authority is not None
            agent.trust.push(agent.authority.revoke("ws1"))
            pushed = decode_revocations(await asyncio.wait_for(gateway.revoked.get(), WAIT))
            assert (pushed.full, pushed.version, pushed.devices) == (False, 1, (DEVICE + "ws1",))
            assert not far.closed.done()
            assert gateway.links.empty()  # never dialled again
            (stats,) = [kept.stats for kept in agent.gateways.links.values()]
            assert (stats.connects, stats.failures) == (1, 0)
        finally:
            stop.set()
            await asyncio.wait_for(task, WAIT)


def held_by_a_gateway(bodies: list[bytes]) -> RevocationList:
    """What a gateway of the current code holds after these "revoke" bodies, in order."""
    revoked, assembler = RevocationList("hospital.test"), RevocationAssembler()
    for body in bodies:
        update = assembler.feed(decode_revocations(body))
        if update is not None:
            revoked.apply("main", update)
    return revoked


async def test_the_switch_to_version_2_loses_no_increment(tmp_path: Path) -> None:
    """Version 1 until the gateway answers the hello, then a version-2 full list built in
    a worker thread: an increment sent in version 1 before is in that list (read after
    it), one pushed while it is built follows it; the gateway ends with the union, every
    device with its notice."""
    site = make_pki(tmp_path / "pki")
    audit = AuditLog(tmp_path / "audit.log", source_id="a", site="main")
    authority = authority_with_trail(site, tmp_path / "state", audit)
    authority.registry.revoke("old", dt.datetime.now(dt.UTC))
    building, release = threading.Event(), threading.Event()
    real = authority.revocation_snapshot

    def slow_signed_snapshot(*, signed: bool = True) -> list[bytes]:
        if signed:
            building.set()
            assert release.wait(WAIT)
        return real(signed=signed)

    authority.revocation_snapshot = slow_signed_snapshot  # type: ignore[method-assign]
    links: list[Link] = []
    trust = LinkTrust(authority, lambda: links)
    received: list[bytes] = []
    async with hostile_gateway(site) as gateway, agent_link(site, gateway, trust) as (link, far, _):
        links.append(link)
        assert decode_hello(await asyncio.wait_for(gateway.hellos.get(), WAIT)).revoke == {1, 2}
        received.append(await asyncio.wait_for(gateway.revoked.get(), WAIT))
        trust.push(authority.revoke("ws1"))  # before the gateway answered: version 1
        received.append(await asyncio.wait_for(gateway.revoked.get(), WAIT))
        far.send_control(KIND_HELLO, encode_hello())
        await asyncio.to_thread(building.wait, WAIT)  # the version-2 list is being read
        trust.push(authority.revoke("ws2"))  # must follow that list, not precede it
        release.set()
        received.append(await asyncio.wait_for(gateway.revoked.get(), WAIT))
        received.append(await asyncio.wait_for(gateway.revoked.get(), WAIT))
    updates = [decode_revocations(body) for body in received]
    assert [(u.full, u.version) for u in updates] == [(True, 1), (False, 1), (True, 2), (False, 2)]
    assert DEVICE + "ws2" in updates[3].devices
    held = held_by_a_gateway(received)
    for name in ("old", "ws1", "ws2"):
        assert held.is_revoked(DEVICE + name) and held.notice(DEVICE + name), name
    trust.close()
    authority.close()


async def test_the_agent_ignores_what_it_does_not_know_from_a_gateway(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A control kind it does not know, a malformed hello and a hello with no version in
    common: the link stays up, and the gateway keeps getting version 1."""
    site = make_pki(tmp_path / "pki")
    audit = AuditLog(tmp_path / "audit.log", source_id="a", site="main")
    authority = authority_with_trail(site, tmp_path / "state", audit)
    links: list[Link] = []
    trust = LinkTrust(authority, lambda: links)
    caplog.set_level(logging.DEBUG, logger="relay.agent.linktrust")
    async with (
        hostile_gateway(site) as gateway,
        agent_link(site, gateway, trust) as (
            link,
            far,
            done,
        ),
    ):
        links.append(link)
        first = decode_revocations(await asyncio.wait_for(gateway.revoked.get(), WAIT))
        assert first.version == 1
        far.send_control("capabilities", b'{"v": 9, "anything": [1, 2]}')
        far.send_control(KIND_HELLO, b"\xff not a hello")
        far.send_control(KIND_HELLO, encode_hello([7]))
        far.send_control(DONE, b"")
        await asyncio.wait_for(done.wait(), WAIT)
        trust.push(authority.revoke("ws1"))  # after a version-2 list, had one been started
        pushed = decode_revocations(await asyncio.wait_for(gateway.revoked.get(), WAIT))
        assert (pushed.full, pushed.version) == (False, 1)
        assert not link.closed.done() and not far.closed.done()
    messages = [r.getMessage() for r in caplog.records]
    assert "unknown control message ignored" in messages
    assert (
        messages.count("gateway sent a malformed hello; it keeps getting version-1 revocations")
        == 1
    )
    trust.close()
    authority.close()
