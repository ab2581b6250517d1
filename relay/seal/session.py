"""Establishing a sealed session at either end: an inner `Link` over a sealed outer stream.

The device (TLS client) opens an outer stream with target `session`; the agent (TLS
server) accepts it. Both then run the relay/proto `Link` over a `SealTransport`: the
inner request streams (dicom, tcp:..., renew) are opened and dispatched exactly as they
were on the outer link before, with the peer's identity taken from the inner TLS only.

When the agent refuses an authenticated device (revoked, wrong site, too many sessions of
it open), it says so inside the TLS with an inner GOAWAY (code REVOKED, LIMIT_EXCEEDED or
FORBIDDEN and a one-line reason) before its close_notify: the device can trust that
verdict, which the gateway cannot forge.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from relay.net.aio import Link, Stream
from relay.net.bytestream import ByteStream
from relay.proto import Connection, ErrorCode, LinkSettings
from relay.seal.core import FAILURE_REASONS, HandshakeComplete, PeerCheck, SealCore, SealLimits
from relay.seal.transport import SealError, SealTransport

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "SealStats",
    "SealedLink",
    "establish",
    "refusal_goaway",
]

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT: Final = 15.0
BYTE_KEYS: Final = ("plain_in", "plain_out", "sealed_in", "sealed_out")
_REFUSAL_CODES: Final = {
    "revoked": ErrorCode.REVOKED,
    "too_many_sessions": ErrorCode.LIMIT_EXCEEDED,
}
_REFUSAL_TEXTS: Final = {
    "too_many_sessions": "this device has as many sessions open at the agent as it may",
    "expired": "the certificate of the resumed session is not valid now",
}


def refusal_goaway(reason: str, detail: str) -> bytes:
    """The inner protocol's first bytes when the agent refuses a device: SETTINGS, GOAWAY."""
    conn = Connection(client=False, settings=LinkSettings(), now=0.0)
    code = _REFUSAL_CODES.get(reason, ErrorCode.FORBIDDEN)
    why = _REFUSAL_TEXTS.get(reason)
    conn.goaway(code, f"session refused by the agent: {reason}" + (f" ({why})" if why else ""))
    return conn.data_to_send()


@dataclass
class SealStats:
    """Counters for the metrics of one end (bounded label sets: results and reasons).

    Byte counts: `plain_*` before sealing / after opening, `sealed_*` the TLS records on
    the outer stream; sessions still open are included (read at scrape time).
    """

    handshakes: dict[tuple[str, str], int] = field(default_factory=dict)  # (result, reason)
    live: set[SealCore] = field(default_factory=set)
    closed_bytes: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("plain_in", "plain_out", "sealed_in", "sealed_out"), 0
        )
    )
    setup_seconds: list[float] = field(default_factory=list)  # recent, bounded

    @property
    def open(self) -> int:
        return len(self.live)

    def bytes(self) -> dict[str, int]:
        """plain_in, plain_out, sealed_in, sealed_out over every session, open or not."""
        total = dict(self.closed_bytes)
        for core in self.live:
            for key in total:
                total[key] += getattr(core, key)
        return total

    def handshake(self, result: str, reason: str = "") -> None:
        if reason and reason not in FAILURE_REASONS:
            reason = "other"
        key = (result, reason)
        self.handshakes[key] = self.handshakes.get(key, 0) + 1

    def note_setup(self, seconds: float) -> None:
        self.setup_seconds.append(seconds)
        del self.setup_seconds[:-64]


@dataclass
class SealedLink:
    """An established session: the inner link, its transport and what the handshake said."""

    link: Link
    transport: SealTransport
    handshake: HandshakeComplete

    def account(self, stats: SealStats) -> None:
        """Count this session in `stats` while it is open, and its bytes for good."""
        core = self.transport.core

        def done(_: object) -> None:
            stats.live.discard(core)
            for key in stats.closed_bytes:
                stats.closed_bytes[key] += getattr(core, key)

        stats.live.add(core)
        self.transport.finished.add_done_callback(done)


async def establish(
    outer: ByteStream,
    ctx: ssl.SSLContext,
    *,
    server_side: bool,
    alpn: str,
    check_peer: PeerCheck,
    settings: LinkSettings,
    name: str,
    on_stream: Callable[[Stream], None] | None = None,
    on_goaway: Callable[[int, str], None] | None = None,
    session: ssl.SSLSession | None = None,
    timeout: float = HANDSHAKE_TIMEOUT,  # noqa: ASYNC109
    stats: SealStats | None = None,
    limits: SealLimits | None = None,
    link_class: type[Link] = Link,
) -> SealedLink:
    """Run the inner handshake on `outer`; return the inner Link, running. Raises SealError
    (its `reason` is metric-safe) and counts the outcome in `stats`."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    core = SealCore(
        ctx,
        server_side=server_side,
        alpn=alpn,
        check_peer=check_peer,
        session=session,
        limits=limits,
        refusal_message=refusal_goaway if server_side else None,
    )

    def make_link(hs: HandshakeComplete) -> Link:
        link = link_class(
            client=not server_side,
            settings=settings,
            name=f"{name} {hs.peer or 'anonymous'}",
            on_stream=on_stream,
            on_goaway=on_goaway,
        )
        link.peer = hs.peer
        return link

    transport = SealTransport(outer, core, make_link, name=name)
    transport.begin()
    try:
        hs = await transport.wait_established(timeout)
    except SealError as exc:
        if stats is not None:
            stats.handshake("failed", exc.reason)
        raise
    if stats is not None:
        stats.handshake("ok")
        stats.note_setup(loop.time() - started)
    protocol = transport.get_protocol()
    assert isinstance(protocol, Link)
    sealed = SealedLink(protocol, transport, hs)
    if stats is not None:
        sealed.account(stats)
    return sealed
