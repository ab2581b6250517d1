"""Test helper: the agent's real session server behind one loopback link, and a
SessionKeeper riding that link (through `Kept`, a KeptLink's face), for the tests of the
workstation's session (tickets, offline)."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import cast

from relay.agent.sessions import SessionServer
from relay.net.aio import Link
from relay.net.dialer import KeptLink, LinkStats
from relay.ops.config import Address
from relay.proto import ErrorCode, LinkSettings
from relay.seal.policy import session_client_context, session_server_context
from relay.workstation.session import SessionKeeper
from tests.ends_helpers import wait_until
from tests.pki_helpers import Pair, SitePki

SETTINGS = LinkSettings()


class Kept:
    """The gateway link the keeper rides (a KeptLink's face): one loopback link."""

    def __init__(self, link: Link) -> None:
        self.link: Link | None = link
        self.up = asyncio.Event()
        self.up.set()
        self.address = Address("127.0.0.1", 0)
        self.revoked: str | None = None
        self.stats = LinkStats()

    def revoked_by_peer(self, reason: str) -> None:
        self.revoked = reason


async def _agent(site: SitePki, agent: Pair) -> tuple[SessionServer, Kept, asyncio.Server]:
    """The agent's session server behind a loopback link; the keeper's side of it."""
    loop = asyncio.get_running_loop()
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
    return server, Kept(link), listener


def context(site: SitePki, pair: Pair) -> ssl.SSLContext:
    return session_client_context(pair.cert, pair.key, site.ca, site=site.site)


@asynccontextmanager
async def running_agent(
    site: SitePki, agent: Pair | None = None
) -> AsyncIterator[tuple[SessionServer, Kept]]:
    """The session server (with `agent`'s certificate, else the site's agent's) and the
    keeper's link to it; both closed at the end."""
    server, kept, listener = await _agent(site, agent or site.agent)
    try:
        yield server, kept
    finally:
        await server.close(0.5)
        assert kept.link is not None
        kept.link.abort()
        listener.close()


def keeper_for(
    kept: Kept, ctx: ssl.SSLContext, site: SitePki, clock: Callable[[], float] = time.monotonic
) -> SessionKeeper:
    """A keeper (not started) on `kept`, presenting the certificate of `ctx`."""
    return SessionKeeper(
        cast(KeptLink, kept),
        ctx,
        trust_domain=site.trust_domain,
        site=site.site,
        settings=SETTINGS,
        handshake_timeout=5.0,
        clock=clock,
    )


async def next_session(keeper: SessionKeeper, server: SessionServer) -> None:
    """End the current session from the agent's side; wait for the keeper's next one."""
    opened = keeper.stats.opened
    for link in list(server.sessions):
        link.close(ErrorCode.NO_ERROR, "test: next session")
    await wait_until(lambda: keeper.stats.opened > opened and keeper.up.is_set())
