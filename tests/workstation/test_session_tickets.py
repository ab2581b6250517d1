"""The SessionKeeper's TLS tickets against the agent's real session server, over loopback.

A resumed session carries the certificate of its first, full handshake; the agent checks
that certificate's dates itself (relay.seal.core) and refuses one its clock says has
expired. The keeper must then drop the ticket: kept, it offered it again at every
attempt and every session was refused until the ticket aged out.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import relay.seal.core
from relay.agent.sessions import SessionServer
from relay.trust.identity import Identity
from tests.ends_helpers import wait_until
from tests.pki_helpers import SitePki, make_pki
from tests.workstation.session_agent import Kept, context, keeper_for, next_session, running_agent


@pytest.fixture
async def agent(site: SitePki) -> AsyncIterator[tuple[SessionServer, Kept]]:
    async with running_agent(site) as running:
        yield running


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> SitePki:
    return make_pki(Path(tmp_path_factory.mktemp("pki")))


async def test_a_ticket_the_agent_refuses_is_dropped_and_the_next_session_is_full(
    site: SitePki, agent: tuple[SessionServer, Kept], monkeypatch: pytest.MonkeyPatch
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
    keeper = keeper_for(kept, context(site, pair), site)
    keeper.start()
    try:
        await wait_until(keeper.up.is_set)
        await next_session(keeper, server)
        assert keeper.stats.resumed == 1  # the ticket works while the certificate is valid

        later = now + timedelta(hours=2)  # the agent's clock: past the resumed certificate
        monkeypatch.setattr(relay.seal.core, "_utcnow", lambda: later)
        await next_session(keeper, server)
        assert keeper.stats.refusals == 1
        assert "expired" in keeper.stats.last_error
        assert keeper.stats.tickets_dropped == 1
        assert keeper.stats.resumed == 1  # the session now open is a full handshake
        refused = server.stats.handshakes.get(("failed", "expired"), 0)
        assert refused == 1  # one refusal, not one per attempt
    finally:
        await keeper.close(0.5)


async def test_a_renewed_certificate_is_presented_by_a_full_handshake(
    site: SitePki, agent: tuple[SessionServer, Kept]
) -> None:
    """Renewal (or a reload) replaces the keeper's context: the ticket of the old one is
    never offered again, so the agent sees the renewed certificate at the next session."""
    server, kept = agent
    old = site.device("renewing", lifetime=timedelta(hours=1))
    keeper = keeper_for(kept, context(site, old), site)
    keeper.start()
    try:
        await wait_until(keeper.up.is_set)
        renewed = site.issue(
            "renewing-2", Identity.device(site.trust_domain, site.site, "renewing")
        )
        keeper.ctx = context(site, renewed)
        await next_session(keeper, server)
        assert keeper.stats.resumed == 0 and keeper.stats.refusals == 0
        (link,) = server.sessions
        transport: Any = link.transport
        der = transport.core._ssl.getpeercert(binary_form=True)
        assert der == ssl.PEM_cert_to_DER_cert(renewed.cert.read_text())
    finally:
        await keeper.close(0.5)


async def test_a_ticket_we_refuse_is_dropped_too(
    site: SitePki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our own end checks the agent's resumed certificate the same way: a ticket whose
    agent certificate our clock says has expired is refused by us ("expired"), and must
    not be offered again either: the next attempt is a full handshake, which sees the
    agent's current certificate (here the same, valid by OpenSSL's clock)."""
    now = datetime.now(UTC)
    agent = site.issue(
        "agent-soon",
        Identity.agent(site.trust_domain, site.site),
        lifetime=timedelta(hours=1),
        not_before=now - timedelta(minutes=5),
    )
    async with running_agent(site, agent) as (server, kept):
        keeper = keeper_for(kept, context(site, site.device("checking")), site)
        keeper.start()
        try:
            await wait_until(keeper.up.is_set)
            await next_session(keeper, server)
            assert keeper.stats.resumed == 1
            later = now + timedelta(hours=2)  # past the agent's certificate, not the device's
            monkeypatch.setattr(relay.seal.core, "_utcnow", lambda: later)
            await next_session(keeper, server)
            assert keeper.stats.failures == 1 and "expired" in keeper.stats.last_error
            assert keeper.stats.tickets_dropped == 1 and keeper.stats.resumed == 1
        finally:
            await keeper.close(0.5)
