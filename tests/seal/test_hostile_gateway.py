"""A hostile gateway: the real gateway (in-process), its splice patched to tamper with the
TLS records of sealed sessions, or to claim another device; a real agent (run_agent) with
a TCP echo service and its device authority; a device with a sealed session.

What must hold: the session fails with a clear reason, the device never receives altered
data (what it reads is a true prefix of what was sent), and nothing gets signed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import gateway.router
import gateway.server
from gateway.splice import Splice
from relay.agent.config import PkiFiles
from relay.agent.service import Agent
from relay.net.aio import Link, Stream
from relay.net.bytestream import StreamResetError
from relay.proto import ErrorCode, LinkClosedError
from relay.seal.transport import SealTransport
from relay.trust import pki
from relay.trust.renewal import RenewalError, renew
from tests.agent.test_dispatch import device_link, running_agent
from tests.ends_helpers import (
    WAIT,
    agent_config,
    device_identity_dir,
    running_gateway,
    tcp_service,
    wait_until,
)
from tests.pki_helpers import Pair, SitePki, make_pki
from tests.session_helpers import sealed

from .records import ATTACKS, RecordTamper


def utcnow() -> datetime:
    return datetime.now(UTC)


HEADER_DEVICE = "x-relay-device"  # what the gateway wrote before sessions were sealed


class Hostility:
    """What the patched splice does to session streams (set per test)."""

    def __init__(self) -> None:
        self.upstream: RecordTamper | None = None  # device -> agent
        self.downstream: RecordTamper | None = None  # agent -> device
        self.claim: str | None = None  # a device identity header to add


HOSTILE = Hostility()


class HostileSplice(Splice):
    """Splice that rewrites the records of one direction (acknowledging what it took)."""

    def __init__(self, device: Stream, agent: Stream, **kwargs: Any) -> None:
        super().__init__(device, agent, **kwargs)
        self._device = device
        self._tampers = {device: HOSTILE.upstream, agent: HOSTILE.downstream}

    def on_data(self, stream: Stream, data: bytes) -> None:
        tamper = self._tampers.get(stream)
        if tamper is None:
            super().on_data(stream, data)
            return
        out = tamper(data)
        if len(out) < len(data):  # dropped or held: the source gets its credit anyway
            stream.acknowledge(len(data) - len(out))
        if out:
            super().on_data(stream, out)


@pytest.fixture
def hostile(monkeypatch: pytest.MonkeyPatch) -> Hostility:
    HOSTILE.__init__()  # type: ignore[misc]
    monkeypatch.setattr(gateway.router, "Splice", HostileSplice)
    original = gateway.router.Router.route

    def route(self: gateway.router.Router, site: str, stream: Stream, *a: Any, **k: Any) -> None:
        if HOSTILE.claim is not None:  # the gateway vouches for someone else
            stream._headers[HEADER_DEVICE] = HOSTILE.claim
            a = ({HEADER_DEVICE: HOSTILE.claim}, *a[1:])
        original(self, site, stream, *a, **k)

    monkeypatch.setattr(gateway.router.Router, "route", route)
    return HOSTILE


@dataclasses.dataclass
class World:
    pki: SitePki
    agent: Agent
    outer: Link
    identity_dir: Path

    async def session(self) -> Link:
        d = self.identity_dir
        return await sealed(self.outer, self.pki, Pair(d / "device.crt", d / "device.key"))


@contextlib.asynccontextmanager
async def world(tmp_path: Path) -> AsyncIterator[World]:
    site = make_pki(tmp_path / "pki")
    async with running_gateway(site, tmp_path) as gw, tcp_service() as echo:
        config = agent_config(site, tmp_path, [gw.port], {"echo": (echo.port, False)})
        config = dataclasses.replace(config, pki=PkiFiles(site.ca, site.directory / "ca.key"))
        async with running_agent(config, {}) as agent:
            await wait_until(lambda: gw.server.router.sites() == ["main"])
            identity_dir = device_identity_dir(site, tmp_path)
            assert agent.authority is not None
            outer = await device_link(site, gw.port)
            try:
                yield World(site, agent, outer, identity_dir)
            finally:
                outer.close()


def failure_of(link: Link) -> str | None:
    transport = link.transport
    assert isinstance(transport, SealTransport)
    return transport.failure.reason if transport.failure is not None else None


@pytest.mark.parametrize("direction", ["downstream", "upstream"])
@pytest.mark.parametrize("attack", ATTACKS)
async def test_tampered_records_fail_the_session_and_deliver_only_true_data(
    tmp_path: Path, hostile: Hostility, attack: str, direction: str
) -> None:
    async with world(tmp_path) as w:
        # Armed once the session is up; then a few records pass and one is hit.
        tamper = RecordTamper(attack, skip=2, armed=False)
        setattr(hostile, direction, tamper)
        session = await w.session()
        stream = session.open_stream({"target": "tcp:echo"})
        await stream.write(b"hello")
        assert await asyncio.wait_for(stream.read(), WAIT) == b"hello"
        tamper.armed = True
        sent, received = b"hello", b"hello"
        with contextlib.suppress(StreamResetError):
            async with asyncio.timeout(WAIT):
                for i in range(40):
                    chunk = os.urandom(20_000) + i.to_bytes(4, "big")
                    await stream.write(chunk)
                    sent += chunk
                    while len(received) < len(sent):
                        data = await stream.read()
                        if not data:
                            break
                        received += data
        assert tamper.done, "the test never reached the tampered record"
        await asyncio.wait_for(session.wait_closed(), WAIT)
        assert sent.startswith(received) and len(received) < len(sent)
        # The side that received the tampered record names it; the other sees the end.
        sessions = w.agent.sessions
        agent_side = [
            reason
            for (result, reason), n in sessions.stats.handshakes.items()
            if result == "failed" and n
        ]
        assert not agent_side  # the handshake itself was fine
        if direction == "downstream":
            assert failure_of(session) == "integrity"
        else:
            await wait_until(lambda: not sessions.sessions)  # the agent closed it
            assert failure_of(session) in ("integrity", "eof", "outer_reset", None)


async def test_tampered_renewal_signs_nothing(tmp_path: Path, hostile: Hostility) -> None:
    async with world(tmp_path) as w:
        assert w.agent.authority is not None
        hostile.upstream = RecordTamper("flip", skip=0, armed=False)
        session = await w.session()
        hostile.upstream.armed = True  # the renewal request's records are next
        with pytest.raises((StreamResetError, LinkClosedError, RenewalError)):
            await asyncio.wait_for(
                renew(session.open_stream, w.identity_dir, force=True, now=utcnow), WAIT
            )
        assert hostile.upstream.done
        assert w.agent.authority.renewals.get("ok", 0) == 0
        row = w.agent.authority.registry.get_device("ws1")
        assert row is None or row.certificates == 0


async def test_a_gateway_claiming_another_device_gets_it_nothing(
    tmp_path: Path, hostile: Hostility
) -> None:
    async with world(tmp_path) as w:
        assert w.agent.authority is not None
        hostile.claim = "spiffe://hospital.test/device/main/boss"
        session = await w.session()
        before = pki.load_cert(w.identity_dir / "device.crt")
        renewed = await asyncio.wait_for(
            renew(session.open_stream, w.identity_dir, force=True, now=utcnow),
            WAIT,
        )
        assert renewed
        after = pki.load_cert(w.identity_dir / "device.crt")
        assert after.serial_number != before.serial_number
        from relay.trust.identity import identity_from_certificate

        assert identity_from_certificate(after).name == "ws1"  # never "boss"
        assert w.agent.authority.registry.get_device("boss") is None
        assert w.agent.authority.renewals == {"ok": 1}


async def test_revoked_device_is_refused_by_the_agent_through_a_lax_gateway(
    tmp_path: Path, hostile: Hostility, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway ignores revocations (it closes no link): the agent closes the live
    session itself and refuses a new one with a sealed REVOKED goaway."""
    monkeypatch.setattr(gateway.server.GatewayServer, "close_device", lambda self, uri: None)
    async with world(tmp_path) as w:
        assert w.agent.authority is not None
        live = await w.session()
        w.agent.trust.push(w.agent.authority.revoke("ws1"))  # what `relay device revoke` does
        await asyncio.wait_for(live.wait_closed(), WAIT)  # closed by the agent's push
        assert not w.outer.closed.done()  # the lax gateway kept the device's link
        session = await sealed_refused(w)
        assert session.goaway_reason is not None  # type: ignore[attr-defined]
        code, reason = session.goaway_reason  # type: ignore[attr-defined]
        assert code == ErrorCode.REVOKED and "revoked" in reason
        assert w.agent.sessions.stats.handshakes.get(("failed", "revoked")) == 1
        with pytest.raises(Exception):  # noqa: B017 - a closed session opens nothing
            session.open_stream({"target": "tcp:echo"})


async def sealed_refused(w: World) -> Link:
    d = w.identity_dir
    link = await sealed(w.outer, w.pki, Pair(d / "device.crt", d / "device.key"), accepted=False)
    await asyncio.wait_for(link.wait_closed(), WAIT)
    return link
