"""Test helper: a device's sealed session over an outer link (what the workstation's
relay.workstation.session does, without its supervision), for tests that used to open
request streams on the device's gateway link directly."""

from __future__ import annotations

import asyncio

from relay.net.aio import Link
from relay.proto import LinkSettings
from relay.seal.policy import agent_check, session_client_context
from relay.seal.session import establish
from relay.wire import ALPN_SESSION, HEADER_TARGET, TARGET_SESSION
from relay.workstation.session import _SessionLink
from tests.pki_helpers import Pair, SitePki

WAIT = 20.0


async def sealed(
    outer_link: Link,
    pki: SitePki,
    pair: Pair,
    *,
    settings: LinkSettings | None = None,
    accepted: bool = True,
) -> Link:
    """The inner link of a new session on `outer_link`, once the agent has spoken (it
    accepted us) or closed it (it refused us: then `accepted` must be False)."""
    outer = outer_link.open_stream({HEADER_TARGET: TARGET_SESSION})
    session = await establish(
        outer,
        session_client_context(pair.cert, pair.key, pki.ca),
        server_side=False,
        alpn=ALPN_SESSION,
        check_peer=agent_check(pki.trust_domain, pki.site),
        settings=settings or LinkSettings(),
        name="test session",
        timeout=WAIT,
        link_class=_SessionLink,
    )
    link = session.link
    assert isinstance(link, _SessionLink)
    first: set[asyncio.Future[object]] = {link.first_data, link.closed}  # type: ignore[arg-type]
    await asyncio.wait_for(asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED), WAIT)
    if accepted:
        assert link.goaway_reason is None and not link.closed.done(), link.goaway_reason
    return link
