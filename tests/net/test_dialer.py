"""Dialling the real gateway (in-process, real TLS on 127.0.0.1), and keeping links up."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest

from relay import wire
from relay.net import dialer, tls
from relay.net.aio import Link
from relay.net.backoff import ExponentialBackoff
from relay.net.dialer import DialError, KeptLink, dial
from relay.ops.config import Address
from relay.proto import ErrorCode, LinkSettings
from relay.trust.revocation import KIND_REVOKE, encode_revocations
from tests.ends_helpers import WAIT, running_gateway, start_gateway, wait_until
from tests.pki_helpers import HOST, SitePki, make_pki
from tests.ports import dead_port, reserve

SETTINGS = LinkSettings(keepalive_interval=2.0, keepalive_timeout=6.0)


@pytest.fixture
def pki(tmp_path: Path) -> SitePki:
    return make_pki(tmp_path / "pki")


def agent_ctx(pki: SitePki) -> ssl.SSLContext:
    return tls.client_context(pki.agent.cert, pki.agent.key, pki.ca, alpn=wire.ALPN_AGENT)


def kept(pki: SitePki, port: int) -> KeptLink:
    return KeptLink(
        Address(HOST, port),
        agent_ctx(pki),
        SETTINGS,
        alpn=wire.ALPN_AGENT,
        name="test",
        backoff=ExponentialBackoff(0.01, 0.1),
        connect_timeout=5.0,
    )


async def test_dial_authenticates_both_ways(pki: SitePki, tmp_path: Path) -> None:
    async with running_gateway(pki, tmp_path) as gw:
        link = await dial(
            Address(HOST, gw.port),
            agent_ctx(pki),
            SETTINGS,
            alpn=wire.ALPN_AGENT,
            name="a",
            timeout=WAIT,
        )
        assert link.peer.role == "gateway"
        await wait_until(lambda: len(gw.server.links.agents) == 1)
        assert gw.server.router.sites() == []  # not routed before its revocation snapshot
        for body in encode_revocations((), full=True):
            link.send_control(KIND_REVOKE, body)
        await wait_until(lambda: gw.server.router.sites() == ["main"])
        link.close()
        await asyncio.wait_for(link.wait_closed(), WAIT)


async def test_a_refused_identity_is_a_dial_error_not_a_link(pki: SitePki, tmp_path: Path) -> None:
    """TLS 1.3: the client handshake succeeds before the gateway refuses the certificate."""
    device = pki.device("ws1")
    ctx = tls.client_context(device.cert, device.key, pki.ca, alpn=wire.ALPN_AGENT)
    async with running_gateway(pki, tmp_path) as gw:
        with pytest.raises(DialError) as info:
            await dial(
                Address(HOST, gw.port), ctx, SETTINGS, alpn=wire.ALPN_AGENT, name="x", timeout=WAIT
            )
        assert info.value.reason == "refused"


async def test_a_gateway_from_another_ca_is_refused(pki: SitePki, tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other", trust_domain="other.test")
    ctx = tls.client_context(pki.agent.cert, pki.agent.key, other.ca, alpn=wire.ALPN_AGENT)
    async with running_gateway(pki, tmp_path) as gw:
        with pytest.raises(DialError) as info:
            await dial(
                Address(HOST, gw.port), ctx, SETTINGS, alpn=wire.ALPN_AGENT, name="x", timeout=WAIT
            )
        assert info.value.reason in ("unknown_ca", "bad_certificate")


async def test_the_gateway_name_is_checked(pki: SitePki, tmp_path: Path) -> None:
    async with running_gateway(pki, tmp_path) as gw:
        with pytest.raises(DialError) as info:
            await dial(
                Address(HOST, gw.port),
                agent_ctx(pki),
                SETTINGS,
                alpn=wire.ALPN_AGENT,
                name="x",
                timeout=WAIT,
                server_hostname="not-the-gateway.test",
            )
        assert info.value.reason == "bad_certificate"
        # The name the certificate does carry works for the same address.
        link = await dial(
            Address(HOST, gw.port),
            agent_ctx(pki),
            SETTINGS,
            alpn=wire.ALPN_AGENT,
            name="x",
            timeout=WAIT,
            server_hostname="localhost",
        )
        link.close()


async def test_nothing_listening(pki: SitePki) -> None:
    with dead_port() as port, pytest.raises(DialError) as info:
        await dial(
            Address(HOST, port), agent_ctx(pki), SETTINGS, alpn=wire.ALPN_AGENT, name="x",
            timeout=WAIT,
        )  # fmt: skip
    assert info.value.reason == "connect"


async def test_kept_link_survives_a_gateway_restart(pki: SitePki, tmp_path: Path) -> None:
    before = asyncio.all_tasks()
    reserved = reserve()  # the gateway's port, the same after its restart
    port = reserved.getsockname()[1]
    gw = await start_gateway(pki, tmp_path, port)
    k = kept(pki, port)
    k.start()
    await asyncio.wait_for(k.up.wait(), WAIT)
    first = k.link
    assert first is not None and k.stats.connects == 1
    await gw.shutdown()
    await wait_until(lambda: not k.up.is_set())
    assert k.link is None
    await wait_until(lambda: k.stats.failures >= 2)  # dials while the gateway is down
    gw = await start_gateway(pki, tmp_path, port)
    await asyncio.wait_for(k.up.wait(), WAIT)
    assert k.link is not None and k.link is not first
    assert (k.stats.connects, k.stats.reconnects) == (2, 1)
    await k.close()
    await gw.shutdown()
    reserved.close()
    await asyncio.sleep(0)
    assert asyncio.all_tasks() - before - {asyncio.current_task()} == set()


async def test_goaway_from_the_gateway_dials_a_replacement(pki: SitePki, tmp_path: Path) -> None:
    async with running_gateway(pki, tmp_path) as gw:
        k = kept(pki, gw.port)
        k.start()
        await asyncio.wait_for(k.up.wait(), WAIT)
        old = k.link
        assert old is not None
        await wait_until(lambda: len(gw.server.links.agents) == 1)
        (server_side,) = gw.server.links.agents
        server_side.goaway(ErrorCode.SHUTDOWN, "test")
        await wait_until(lambda: k.stats.connects == 2 and k.up.is_set())
        assert k.stats.goaways == 1
        assert k.link is not old
        assert old.conn.goaway_received and not old.closed.done()  # still draining
        assert old in k.links
        await k.close()
        assert all(link.closed.done() for link in (old, k.link or old))


async def test_close_sends_goaway_and_stops_dialling(pki: SitePki, tmp_path: Path) -> None:
    async with running_gateway(pki, tmp_path) as gw:
        k = kept(pki, gw.port)
        k.start()
        await asyncio.wait_for(k.up.wait(), WAIT)
        await wait_until(lambda: len(gw.server.links.agents) == 1)
        (server_side,) = gw.server.links.agents
        link = k.link
        assert link is not None
        await k.close()
        assert link.conn.goaway_sent
        await asyncio.wait_for(server_side.wait_closed(), WAIT)
        assert server_side.conn.goaway_received
        # Nothing is left that could dial again: the supervisor task has ended.
        assert [t for t in asyncio.all_tasks() if t.get_name() == repr(k)] == []
        assert not k.up.is_set() and k.link is None


async def test_kept_link_keeps_trying_a_dead_address(pki: SitePki) -> None:
    k = kept(pki, 1)
    k.start()
    await wait_until(lambda: k.stats.failures >= 3)
    assert k.stats.last_error == "connect" and not k.up.is_set()
    await k.close()


def test_link_type_is_the_adapters() -> None:
    from relay.net.dialer import _DialedLink

    assert issubclass(_DialedLink, Link)


async def test_revoked_by_peer_stops_dialling_and_tells_the_owner_once(pki: SitePki) -> None:
    """What a session refused as revoked reuses: the supervisor ends, the owner hears once."""
    told: list[str] = []
    with socket.socket() as s:  # bound, never listening: every dial fails at once
        s.bind((HOST, 0))
        keeper = kept(pki, s.getsockname()[1])
        keeper.on_revoked = told.append
        keeper.start()
        await wait_until(lambda: keeper.stats.failures >= 2)
        keeper.revoked_by_peer("revoked by the site")
        keeper.revoked_by_peer("again")
        assert keeper._task is not None
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(keeper._task, WAIT)
        assert told == ["revoked by the site"]
        assert keeper.revoked == "revoked by the site"
        assert keeper.stats.last_error == "revoked"
        assert not keeper.up.is_set()
        await keeper.close()


async def test_a_gateways_revoked_does_not_stop_an_agent(pki: SitePki, tmp_path: Path) -> None:
    """Gateways do not revoke agents, and one may be compromised: its GOAWAY REVOKED on a
    live link is a goaway like another (long backoff), never the end of the dialling."""
    told: list[str] = []
    async with running_gateway(pki, tmp_path) as gw:
        k = kept(pki, gw.port)
        k.on_revoked = told.append  # even an agent owner that listens is not stopped
        k.start()
        await asyncio.wait_for(k.up.wait(), WAIT)
        await wait_until(lambda: len(gw.server.links.agents) == 1)
        (server_side,) = gw.server.links.agents
        server_side.goaway(ErrorCode.REVOKED, "a hostile gateway says so")
        await wait_until(lambda: k.stats.connects == 2 and k.up.is_set())
        assert k.revoked is None and not k._stopping and told == []
        assert k.stats.goaways == 1
        await k.close()


async def test_a_revoked_at_the_dial_does_not_stop_an_agent(
    pki: SitePki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same refusal during the dial: the next dial comes, after REVOKED_BACKOFF."""
    calls: list[float] = []

    async def refuse(*_: object, **__: object) -> Link:
        calls.append(asyncio.get_running_loop().time())
        raise dialer.Revoked("the gateway refused us: revoked", "a hostile gateway says so")

    monkeypatch.setattr(dialer, "dial", refuse)
    k = kept(pki, 1)
    k.start()
    await wait_until(lambda: len(calls) >= 3)
    assert k.revoked is None and k.stats.last_error == "revoked"
    low = dialer.REVOKED_BACKOFF[0] * k.backoff.cap
    assert all(b - a >= low * 0.9 for a, b in itertools.pairwise(calls))
    await k.close()


def device_kept(pki: SitePki, **kwargs: Any) -> KeptLink:
    device = pki.device("ws1")
    return KeptLink(
        Address(HOST, 1),
        tls.client_context(device.cert, device.key, pki.ca, alpn=wire.ALPN_DEVICE),
        SETTINGS,
        alpn=wire.ALPN_DEVICE,
        name="device",
        backoff=ExponentialBackoff(0.01, 0.1),
        **kwargs,
    )


async def test_a_gateways_revoked_stops_a_device_whose_owner_checks_it(
    pki: SitePki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device's link (the workstation's) whose check accepts the reason: final, told once."""
    told: list[str] = []
    asked: list[str] = []

    async def refuse(*_: object, **__: object) -> Link:
        raise dialer.Revoked("the gateway refused us: revoked", "revoked by the site")

    def proven(reason: str) -> str | None:
        asked.append(reason)
        return None

    monkeypatch.setattr(dialer, "dial", refuse)
    k = device_kept(pki, on_revoked=told.append, check_revoked=proven)
    k.start()
    assert k._task is not None
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(k._task, WAIT)
    assert told == ["revoked by the site"] and k.revoked == "revoked by the site"
    assert asked == ["revoked by the site"] and k.stats.attempts == 1
    await k.close()


@pytest.mark.parametrize("check", ["refuses", "missing", "crashes"])
async def test_an_unproven_revoked_does_not_stop_a_device(
    pki: SitePki, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, check: str
) -> None:
    """A gateway's word the owner's check refuses (or cannot check): one warning with
    the check's reason, then the next dial after REVOKED_BACKOFF; never the end."""
    told: list[str] = []
    calls: list[float] = []

    async def refuse(*_: object, **__: object) -> Link:
        calls.append(asyncio.get_running_loop().time())
        raise dialer.Revoked("the gateway refused us: revoked", "a hostile gateway says so")

    def refuses(reason: str) -> str | None:
        return "no notice in it"

    def crashes(reason: str) -> str | None:
        raise RuntimeError("a bug")

    checks = {"refuses": refuses, "missing": None, "crashes": crashes}
    monkeypatch.setattr(dialer, "dial", refuse)
    caplog.set_level(logging.WARNING, logger="relay.net.dialer")
    k = device_kept(pki, on_revoked=told.append, check_revoked=checks[check])
    k.start()
    await wait_until(lambda: len(calls) >= 3)
    assert k.revoked is None and not k._stopping and told == []
    assert k.stats.last_error == "revoked" and k.stats.unheeded_revocations >= 2
    low = dialer.REVOKED_BACKOFF[0] * k.backoff.cap
    assert all(b - a >= low * 0.9 for a, b in itertools.pairwise(calls))
    warnings = [r for r in caplog.records if r.getMessage().startswith("the gateway says")]
    assert len(warnings) == 1  # rate-limited: one per REVOKED_LOG_INTERVAL
    why = {"refuses": "no notice in it", "missing": "no way to check", "crashes": "check failed"}
    assert why[check] in warnings[0].__dict__["why"]
    await k.close()


def test_the_revoked_delay_is_long_and_bounded() -> None:
    k = KeptLink(
        Address(HOST, 1),
        ssl.create_default_context(),
        SETTINGS,
        alpn=wire.ALPN_AGENT,
        name="t",
        backoff=ExponentialBackoff(0.5, 30.0),
    )
    delays = [k._revoked_delay() for _ in range(200)]
    assert all(15.0 <= d <= 30.0 for d in delays)
