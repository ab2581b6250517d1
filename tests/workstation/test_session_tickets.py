"""The SessionKeeper's TLS tickets against the agent's real session server, over loopback.

A resumed session carries the certificate of its first, full handshake; the agent checks
that certificate's dates itself (relay.seal.core) and refuses one its clock says has
expired. The keeper must then drop the ticket: kept, it offered it again at every
attempt and every session was refused until the ticket aged out.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest

import relay.seal.core
from relay.agent.sessions import SessionServer
from relay.net.aio import Link
from relay.net.dialer import KeptLink
from relay.ops.config import Address
from relay.proto import ErrorCode, LinkSettings
from relay.seal.policy import session_client_context, session_server_context
from relay.trust.identity import Identity
from relay.workstation.session import SessionKeeper
from tests.ends_helpers import wait_until
from tests.pki_helpers import Pair, SitePki, make_pki

SETTINGS = LinkSettings()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> SitePki:
    return make_pki(Path(tmp_path_factory.mktemp("pki")))


class _Kept:
    """The gateway link the keeper rides (a KeptLink's face): one loopback link."""

    def __init__(self, link: Link) -> None:
        self.link: Link | None = link
        self.up = asyncio.Event()
        self.up.set()
        self.address = Address("127.0.0.1", 0)
        self.revoked: str | None = None

    def revoked_by_peer(self, reason: str) -> None:
        self.revoked = reason


async def _agent(site: SitePki) -> tuple[SessionServer, _Kept, asyncio.Server]:
    """The agent's session server behind a loopback link; the keeper's side of it."""
    loop = asyncio.get_running_loop()
    agent = site.agent
    server = SessionServer(
        site=site.site,
        trust_domain=site.trust_domain,
        session_ctx=session_server_context(agent.cert, agent.key, site.ca),
        enroll_ctx=None,
        settings=SETTINGS,
        dispatch=lambda s: s.reset(ErrorCode.FORBIDDEN),
    )
    listener = await loop.create_server(
        lambda: Link(client=False, settings=SETTINGS, on_stream=server.on_stream), "127.0.0.1", 0
    )
    port = listener.sockets[0].getsockname()[1]
    _, link = await loop.create_connection(
        lambda: Link(client=True, settings=SETTINGS), "127.0.0.1", port
    )
    return server, _Kept(link), listener


def _context(site: SitePki, pair: Pair) -> ssl.SSLContext:
    return session_client_context(pair.cert, pair.key, site.ca, site=site.site)


@pytest.fixture
async def agent(site: SitePki) -> AsyncIterator[tuple[SessionServer, _Kept]]:
    server, kept, listener = await _agent(site)
    try:
        yield server, kept
    finally:
        await server.close(0.5)
        assert kept.link is not None
        kept.link.abort()
        listener.close()


def _keeper(kept: _Kept, ctx: ssl.SSLContext, site: SitePki) -> SessionKeeper:
    return SessionKeeper(
        cast(KeptLink, kept),
        ctx,
        trust_domain=site.trust_domain,
        site=site.site,
        settings=SETTINGS,
        handshake_timeout=5.0,
    )


async def _next_session(keeper: SessionKeeper, server: SessionServer) -> None:
    """End the current session from the agent's side; wait for the keeper's next one."""
    opened = keeper.stats.opened
    for link in list(server.sessions):
        link.close(ErrorCode.NO_ERROR, "test: next session")
    await wait_until(lambda: keeper.stats.opened > opened and keeper.up.is_set())


async def test_a_ticket_the_agent_refuses_is_dropped_and_the_next_session_is_full(
    site: SitePki, agent: tuple[SessionServer, _Kept], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent's clock is past the certificate the ticket carries: that resumption is
    refused ("expired", sealed), and the next attempt is a full handshake, which the
    certificate of the keeper's context passes. The old keeper offered the refused
    ticket again at every attempt: no session opened again (until the ticket aged out)."""
    server, kept = agent
    now = datetime.now(UTC)
    pair = site.device(
        "ticketed", lifetime=timedelta(hours=1), not_before=now - timedelta(minutes=5)
    )
    keeper = _keeper(kept, _context(site, pair), site)
    keeper.start()
    try:
        await wait_until(keeper.up.is_set)
        await _next_session(keeper, server)
        assert keeper.stats.resumed == 1  # the ticket works while the certificate is valid

        later = now + timedelta(hours=2)  # the agent's clock: past the resumed certificate
        monkeypatch.setattr(relay.seal.core, "_utcnow", lambda: later)
        await _next_session(keeper, server)
        assert keeper.stats.refusals == 1
        assert "expired" in keeper.stats.last_error
        assert keeper.stats.tickets_dropped == 1
        assert keeper.stats.resumed == 1  # the session now open is a full handshake
        refused = server.stats.handshakes.get(("failed", "expired"), 0)
        assert refused == 1  # one refusal, not one per attempt
    finally:
        await keeper.close(0.5)


async def test_a_renewed_certificate_is_presented_by_a_full_handshake(
    site: SitePki, agent: tuple[SessionServer, _Kept]
) -> None:
    """Renewal (or a reload) replaces the keeper's context: the ticket of the old one is
    never offered again, so the agent sees the renewed certificate at the next session."""
    server, kept = agent
    old = site.device("renewing", lifetime=timedelta(hours=1))
    keeper = _keeper(kept, _context(site, old), site)
    keeper.start()
    try:
        await wait_until(keeper.up.is_set)
        renewed = site.issue(
            "renewing-2", Identity.device(site.trust_domain, site.site, "renewing")
        )
        keeper.ctx = _context(site, renewed)
        await _next_session(keeper, server)
        assert keeper.stats.resumed == 0 and keeper.stats.refusals == 0
        (link,) = server.sessions
        transport: Any = link.transport
        der = transport.core._ssl.getpeercert(binary_form=True)
        assert der == ssl.PEM_cert_to_DER_cert(renewed.cert.read_text())
    finally:
        await keeper.close(0.5)
