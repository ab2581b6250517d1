"""Test helpers for sealed sessions: a site PKI with the odd certificates the tests need,
and two SealCores driven against each other in memory."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from relay.seal.core import Clock, SealCore, SealEvent, SealLimits
from relay.seal.policy import (
    ALPN_SESSION,
    agent_check,
    device_check,
    session_client_context,
    session_server_context,
)
from relay.trust.identity import Identity
from tests.pki_helpers import Pair, SitePki, make_pki

TD = "hospital.test"
SITE = "main"


@dataclass
class Pkis:
    """The main site, a second site of the same trust domain under the same CA (for the
    site check), and a foreign CA."""

    main: SitePki
    foreign: SitePki
    device: Pair
    other_site_device: Pair
    other_site_agent: Pair
    expired_device: Pair

    def client_ctx(self, pair: Pair | None = None, ca: Path | None = None) -> ssl.SSLContext:
        pair = pair or self.device
        return session_client_context(pair.cert, pair.key, ca or self.main.ca)

    def server_ctx(self, pair: Pair | None = None, ca: Path | None = None) -> ssl.SSLContext:
        pair = pair or self.main.agent
        return session_server_context(pair.cert, pair.key, ca or self.main.ca)


def make_pkis(directory: Path) -> Pkis:
    main = make_pki(directory / "main", TD, SITE)
    foreign = make_pki(directory / "foreign", "elsewhere.test", SITE)
    past = datetime.now(UTC) - timedelta(days=10)
    return Pkis(
        main=main,
        foreign=foreign,
        device=main.device("ws1"),
        other_site_device=main.issue("ws-b", Identity.device(TD, "b", "ws-b")),
        other_site_agent=main.issue("agent-b", Identity.agent(TD, "b")),
        expired_device=main.device("old", lifetime=timedelta(days=1), not_before=past),
    )


@dataclass
class Duplex:
    """Client and server cores; `run()` moves bytes until neither has more to say."""

    client: SealCore
    server: SealCore
    client_events: list[SealEvent] = field(default_factory=list)
    server_events: list[SealEvent] = field(default_factory=list)
    # Hooks to split or tamper with each batch of bytes in flight.
    to_server: Callable[[bytes], Iterable[bytes]] = lambda b: [b]
    to_client: Callable[[bytes], Iterable[bytes]] = lambda b: [b]

    def run(self, rounds: int = 50) -> None:
        for _ in range(rounds):
            moved = False
            data = self.client.data_to_send()
            if data:
                moved = True
                for part in self.to_server(data):
                    self.server_events += self.server.receive_data(part)
            data = self.server.data_to_send()
            if data:
                moved = True
                for part in self.to_client(data):
                    self.client_events += self.client.receive_data(part)
            if not moved:
                return


def duplex(
    pkis: Pkis,
    *,
    client_ctx: ssl.SSLContext | None = None,
    server_ctx: ssl.SSLContext | None = None,
    is_revoked: Callable[[Identity], bool] | None = None,
    client_site: str = SITE,
    server_site: str = SITE,
    limits: SealLimits | None = None,
    session: ssl.SSLSession | None = None,
    refusal: Callable[[str, str], bytes] | None = None,
    server_clock: Clock | None = None,
    client_clock: Clock | None = None,
) -> Duplex:
    server = SealCore(
        server_ctx or pkis.server_ctx(),
        server_side=True,
        alpn=ALPN_SESSION,
        check_peer=device_check(TD, server_site, is_revoked),
        limits=limits,
        refusal_message=refusal,
        clock=server_clock,
    )
    client = SealCore(
        client_ctx or pkis.client_ctx(),
        server_side=False,
        alpn=ALPN_SESSION,
        check_peer=agent_check(TD, client_site),
        limits=limits,
        session=session,
        clock=client_clock,
    )
    return Duplex(client, server)
