"""The agent's session server: what it accepts from a gateway, and its bound on sessions."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
from pathlib import Path
from typing import Any

import pytest

from relay.agent.sessions import SessionServer, session_server
from relay.net.bytestream import StreamResetError, pipe
from relay.ops.config import TlsFiles
from relay.ops.loglimit import LogLimiter
from relay.proto import ErrorCode, LinkSettings
from relay.seal.core import SealCore
from relay.seal.policy import (
    ALPN_SESSION,
    agent_check,
    device_check,
    session_client_context,
    session_server_context,
)
from relay.seal.session import SealedLink, establish
from relay.trust.identity import Identity
from tests.ends_helpers import agent_config, wait_until
from tests.pki_helpers import Pair, SitePki, make_pki


class _Named:
    name = "gateway link (test)"


class _Outer:
    """One end of an in-memory pipe, seen as a stream a gateway opened."""

    def __init__(self, end: Any) -> None:
        self._end = end
        self.headers = end.headers
        self.link = _Named()
        self.stream_id = 2

    async def read(self, max_bytes: int = 65536) -> bytes:
        data: bytes = await self._end.read(max_bytes)
        return data

    async def write(self, data: bytes) -> None:
        await self._end.write(data)

    async def write_eof(self) -> None:
        await self._end.write_eof()

    def reset(self, code: int) -> None:
        self._end.reset(code)


def _server(site: SitePki, max_sessions: int = 10, max_device_sessions: int = 8) -> SessionServer:
    agent = site.agent
    return SessionServer(
        site="main",
        trust_domain=site.trust_domain,
        session_ctx=session_server_context(agent.cert, agent.key, site.ca),
        enroll_ctx=None,
        settings=LinkSettings(),
        dispatch=lambda s: s.reset(ErrorCode.FORBIDDEN),
        handshake_timeout=0.5,
        max_sessions=max_sessions,
        max_device_sessions=max_device_sessions,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> SitePki:
    return make_pki(Path(tmp_path_factory.mktemp("pki")))


async def _expect_reset(end: Any) -> int:
    with pytest.raises(StreamResetError) as info:
        await asyncio.wait_for(end.read(), 10)
    return info.value.code


@pytest.mark.parametrize("target", ["dicom", "tcp:ris", "renew", "enroll", ""])
async def test_anything_but_a_session_is_forbidden(site: SitePki, target: str) -> None:
    server = _server(site)
    near, far = pipe({"target": target})
    server.on_stream(_Outer(far))  # type: ignore[arg-type]
    assert await _expect_reset(near) == ErrorCode.FORBIDDEN
    assert server.refused == {"not_sealed": 1}


async def test_sessions_are_bounded(site: SitePki) -> None:
    server = _server(site, max_sessions=2)
    ends = [pipe({"target": "session"}) for _ in range(3)]
    for _, far in ends:
        server.on_stream(_Outer(far))  # type: ignore[arg-type]
    assert await _expect_reset(ends[2][0]) == ErrorCode.LIMIT_EXCEEDED
    assert server.refused == {"too_many_sessions": 1}
    await server.close(1.0)  # the two waiting handshakes time out and end
    assert not server._tasks


async def test_no_new_session_while_draining(site: SitePki) -> None:
    server = _server(site)
    server.goaway()
    near, far = pipe({"target": "session"})
    server.on_stream(_Outer(far))  # type: ignore[arg-type]
    assert await _expect_reset(near) == ErrorCode.REFUSED_STREAM


async def _device_session(
    server: SessionServer, site: SitePki, device: Pair, goaways: list[tuple[int, str]]
) -> SealedLink:
    """A session of `device` through an in-memory 'gateway' to `server` (the device's end)."""
    near, far = pipe({"target": "session"})
    server.on_stream(_Outer(far))  # type: ignore[arg-type]
    return await establish(
        near,
        session_client_context(device.cert, device.key, site.ca),
        server_side=False,
        alpn=ALPN_SESSION,
        check_peer=agent_check(site.trust_domain, "main"),
        settings=LinkSettings(),
        name="device",
        timeout=10,
        on_goaway=lambda code, reason: goaways.append((code, reason)),
    )


async def test_one_device_holds_at_most_its_cap_of_sessions(
    site: SitePki, caplog: pytest.LogCaptureFixture
) -> None:
    """A compromised gateway need not honour per_device.streams: past its cap a device's
    next session is refused inside the TLS (LIMIT_EXCEEDED, one line saying why), counted
    and logged per device; another device still gets in, and a closed session gives its
    place back."""
    server = _server(site, max_device_sessions=2)
    server.device_refusals = LogLimiter(burst=1)
    greedy, other = site.device("greedy"), site.device("other")
    greedy_uri = Identity.device(site.trust_domain, "main", "greedy").uri
    other_uri = Identity.device(site.trust_domain, "main", "other").uri
    goaways: list[tuple[int, str]] = []
    held = [await _device_session(server, site, greedy, goaways) for _ in range(2)]
    await wait_until(lambda: server.device_sessions[greedy_uri] == 2, 10)
    caplog.set_level(logging.WARNING, "relay.agent.sessions")
    for _ in range(2):
        refused = await _device_session(server, site, greedy, goaways)
        await asyncio.wait_for(refused.link.wait_closed(), 10)
    assert [code for code, _ in goaways] == [ErrorCode.LIMIT_EXCEEDED] * 2
    assert "too_many_sessions" in goaways[0][1] and "\n" not in goaways[0][1]
    assert server.stats.handshakes[("failed", "too_many_sessions")] == 2
    lines = [r for r in caplog.records if r.getMessage() == "session refused"]
    assert len(lines) == 1  # limited per device
    assert lines[0].__dict__["device"] == greedy_uri
    assert lines[0].__dict__["reason"] == "too_many_sessions"

    welcome = await _device_session(server, site, other, goaways)
    await wait_until(lambda: server.device_sessions[other_uri] == 1, 10)
    assert len(goaways) == 2 and server.device_sessions[greedy_uri] == 2

    held[0].link.close()
    await wait_until(lambda: server.device_sessions[greedy_uri] == 1, 10)
    again = await _device_session(server, site, greedy, goaways)
    await wait_until(lambda: server.device_sessions[greedy_uri] == 2, 10)
    assert len(goaways) == 2
    for session in (held[1], welcome, again):
        session.link.close()
    await server.close(1.0)
    assert not server.device_sessions


def _handshake(server_ctx: ssl.SSLContext, device: Pair, ca: Path) -> SealCore:
    """The agent's end of one sealed handshake with `device` (in memory), as it ends."""
    server = SealCore(
        server_ctx,
        server_side=True,
        alpn=ALPN_SESSION,
        check_peer=device_check("hospital.test", "main"),
    )
    client = SealCore(
        session_client_context(device.cert, device.key, ca),
        server_side=False,
        alpn=ALPN_SESSION,
        check_peer=agent_check("hospital.test", "main"),
    )
    for _ in range(20):
        up = client.data_to_send()
        if up:
            server.receive_data(up)
        down = server.data_to_send()
        if down:
            client.receive_data(down)
        if not up and not down:
            break
    return server


def test_a_device_minted_by_another_sites_ca_is_refused(tmp_path: Path) -> None:
    """tls.ca may hold other sites' CAs (one issued a shared gateway's certificate): the
    sealed session takes a device only from a CA of the agent's own site, whatever the
    gateway let through (north's CA minting `device/main/x` passed before)."""
    main = make_pki(tmp_path / "main")
    north = make_pki(tmp_path / "north", site="north")
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(main.ca.read_bytes() + north.ca.read_bytes())
    config = agent_config(main, tmp_path, [], {})
    config = dataclasses.replace(config, tls=TlsFiles(main.agent.cert, main.agent.key, bundle))
    server = session_server(config, None, lambda s: s.reset(ErrorCode.FORBIDDEN))
    forged = north.issue("forged", Identity.device(main.trust_domain, "main", "x"))
    refused = _handshake(server.session_ctx, forged, main.ca)
    assert refused.failure is not None and refused.failure.reason == "unknown_ca"
    assert refused.peer is None
    own = _handshake(server.session_ctx, main.device("ws1"), main.ca)
    assert own.state == "open" and own.peer == Identity.device(main.trust_domain, "main", "ws1")


async def test_a_device_revoked_during_its_handshake_loses_the_session(site: SitePki) -> None:
    """A revocation pushed (close_revoked) after the handshake's check passed but before
    the session was registered found nothing to close, and the session then lived on
    until some later push. The agent checks again once the session is registered."""
    server = _server(site)
    revoked: set[str] = set()
    checks: list[str] = []

    def is_revoked(peer: Identity) -> bool:
        checks.append(peer.name)
        if len(checks) == 1:  # the handshake's check passes; the revocation lands now
            revoked.add(peer.name)
            asyncio.get_running_loop().call_soon(server.close_revoked)
            return False
        return peer.name in revoked

    server.is_revoked = is_revoked
    goaways: list[tuple[int, str]] = []
    session = await _device_session(server, site, site.device("late"), goaways)
    await asyncio.wait_for(session.link.wait_closed(), 10)
    assert goaways and goaways[0][0] == ErrorCode.REVOKED
    await wait_until(lambda: not server.sessions, 10)
    await server.close(1.0)
