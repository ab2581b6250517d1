"""The gateway's one TLS port: accept, handshake, authenticate, attach links.

Every connection is checked in this order, each failure counted by reason and logged
without payload: capacity, handshakes pending from its source address (`per_source`),
the handshake budget of all sources together (`all_sources`) and the source's rate, TLS
handshake (certificate chain, expiry, TLS 1.3), ALPN (one per endpoint role),
identity (exactly one SPIFFE URI SAN, our trust domain, the role that belongs on that
endpoint), issuer (a CA of the identity's own site, gateway.casites), revocation, and
for a device its link cap (`per_device.links`). Only then does the link speak the
protocol, except to a revoked device: it is told so (GOAWAY REVOKED), then the link
closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from dataclasses import dataclass, field
from functools import partial
from typing import Final

from gateway.casites import CaSites
from gateway.config import GatewayConfig
from gateway.control import AgentControl, RefusalReporter
from gateway.enroll import EnrollmentDesk
from gateway.limits import ALL_SOURCES_LIMITS, DeviceLedger, SourceLedger, source_key
from gateway.metrics import GatewayMetrics
from gateway.router import Router
from relay.net.aio import Link
from relay.net.tls import (
    accept_tls,
    classify_handshake_error,
    peer_identity,
    refusal_for_identity,
)
from relay.ops.listening import announce
from relay.ops.loglimit import LOG_RATE, LogLimiter
from relay.proto import ErrorCode
from relay.trust.identity import Identity, IdentityError
from relay.trust.pki import PkiError, load_cert
from relay.trust.revocation import RevocationList, goaway_reason
from relay.wire import ALPN_ENROLL, TUNNEL_ALPNS

log = logging.getLogger(__name__)

REVOKED_CLOSE_BOUND = 1.0  # seconds a revoked device has to read its GOAWAY
# Revoked devices' links being told so (GOAWAY REVOKED, then closed, within
# REVOKED_CLOSE_BOUND) at once; each counts against max_links while it lives. Beyond,
# a revoked device's link is aborted untold (counted as refused "revoked" all the same):
# it hears it on a later dial. Without it, how many lived at once (a revoked certificate
# is anyone's to dial with, from any source) was bounded only by handshake speed.
REVOKED_CLOSING_MAX: Final = 64
# "connection refused" lines: per source address the default LOG_BURST then one per
# 10 s; all sources together 200 at once, then 5 a second.
REFUSAL_LINES_TOTAL: Final = (5.0, 200)
# "link up" / "link down" lines, per identity: LINK_LINE_BURST at once, then
# LINK_LINE_RATE a second (the next line let through says how many were held back). A
# device reconnecting in a loop (a TLS handshake each, nothing refused) wrote two INFO
# lines a reconnect, as fast as it could handshake; a device that keeps its link, or
# reconnects now and then, has every line written. relay_links counts every link.
LINK_LINE_BURST: Final = 40
LINK_LINE_RATE: Final = 1.0
# "link aborted, the peer does not read" lines (relay.net.aio: CONTROL_REPLIES of answers
# or WRITE_HARD left unread): anyone can cause one per enrollment link, so they are
# limited as the refusal lines are: per source (per identity on an authenticated link),
# the default LOG_BURST then one per 10 s, and over all together REFUSAL_LINES_TOTAL.
# relay_limit_hits_total{limit="peer_unread"} counts every one.
UNREAD_LINES_TOTAL: Final = REFUSAL_LINES_TOTAL
# "connection refused: all sources' handshake budget is spent" lines (limits.
# ALL_SOURCES_LIMITS): one per reason, then one per 10 s saying how many were held back.
# A flood from many sources would otherwise write a line per source; it is one event.
BUDGET_LINE_BURST: Final = 1


@dataclass
class LinkTable:
    """Live links by role, for routing, revocation, draining and metrics.

    Change it through its methods: they keep the count of device links that `len()`
    returns, which the accept loop asks for every connection, a junk one included
    (summing the devices' sets took 0.4 ms with 10,000 devices linked, so a stream of
    bare TCP connects from anyone kept the event loop busy, every link waiting).
    """

    agents: set[Link] = field(default_factory=set)
    devices: dict[str, set[Link]] = field(default_factory=dict)
    _device_links: int = 0

    def all(self) -> list[Link]:
        return [*self.agents, *(link for links in self.devices.values() for link in links)]

    def add_device(self, uri: str, link: Link) -> None:
        links = self.devices.setdefault(uri, set())
        if link not in links:
            links.add(link)
            self._device_links += 1

    def remove_device(self, uri: str, link: Link) -> None:
        links = self.devices.get(uri)
        if links is None or link not in links:
            return
        links.discard(link)
        self._device_links -= 1
        if not links:
            del self.devices[uri]

    def __len__(self) -> int:
        return len(self.agents) + self._device_links


class GatewayServer:
    def __init__(
        self,
        config: GatewayConfig,
        ssl_context: ssl.SSLContext,
        ca_sites: CaSites,
        metrics: GatewayMetrics,
    ) -> None:
        self.config = config
        self.ssl_context = ssl_context
        self.ca_sites = ca_sites
        self.trust_domain = ca_sites.trust_domain
        self.metrics = metrics
        hit = self._limit_hit
        self.devices = DeviceLedger(config.per_device, hit)
        self.sources = SourceLedger(config.per_source, hit, all_sources=config.all_sources)
        self.router = Router(metrics, self.devices)
        self.links = LinkTable()
        self.revoked = RevocationList(self.trust_domain)  # memory only, relearned from agents
        self.refusal_reporter = RefusalReporter(self.router)
        self.refusal_lines = LogLimiter(total=REFUSAL_LINES_TOTAL)
        self.link_lines = LogLimiter(LINK_LINE_RATE, LINK_LINE_BURST)
        self.unread_lines = LogLimiter(total=UNREAD_LINES_TOTAL)
        self.budget_lines = LogLimiter(LOG_RATE, BUDGET_LINE_BURST)
        self.enrollment = EnrollmentDesk(self.router, metrics)
        self._sock: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()
        self._revoked_closing: set[Link] = set()  # at most REVOKED_CLOSING_MAX
        self.port: int | None = None
        # Label children looked up once: `.labels()` per handshake shows in its profile.
        self._handshake_ok = metrics.handshakes.labels("ok")
        self._handshake_failed = metrics.handshakes.labels("failed")
        # Read at scrape time: what `all_sources.handshakes` is sized against.
        metrics.handshakes_pending.set_function(lambda: self.sources.pending)

    # -- lifecycle

    def _limit_hit(self, limit: str) -> None:
        self.metrics.limit_hits.labels(limit).inc()

    def apply_config(self, config: GatewayConfig, context: ssl.SSLContext, ca: CaSites) -> None:
        """A reloaded configuration, for new links and streams (live ones keep theirs)."""
        self.config = config
        self.ssl_context = context
        self.ca_sites = ca
        self.devices.limits = config.per_device
        self.sources.limits = config.per_source
        self.sources.all_sources = config.all_sources

    def note_certificate(self) -> None:
        """Export when our own certificate expires (alerting renews it in time)."""
        with contextlib.suppress(PkiError, OSError, ValueError):
            expiry = load_cert(self.config.tls.cert).not_valid_after_utc.timestamp()
            self.metrics.certificate_expiry.labels("gateway").set(expiry)

    async def start(self) -> None:
        self.note_certificate()
        addr = self.config.listen
        family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
        sock = socket.create_server((addr.host, addr.port), family=family, backlog=1024)
        sock.setblocking(False)
        self._sock = sock
        self.port = announce("gateway", sock.getsockname()).port
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop())

    @property
    def listening(self) -> bool:
        return self._accept_task is not None and not self._accept_task.done()

    async def stop_accepting(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for task in list(self._handshakes):
            task.cancel()
        if self._handshakes:
            await asyncio.gather(*self._handshakes, return_exceptions=True)

    # -- accept path

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                log.warning("accept failed", extra={"error": str(exc)})
                await asyncio.sleep(0.1)
                continue
            if self._links_held() >= self.config.max_links:
                self._refuse_early(conn, "capacity")
                continue
            host = _source_of(conn)
            refusal = self.sources.begin(host, loop.time())
            if refusal is not None:
                self._refuse_early(conn, refusal)
                continue
            task = loop.create_task(self._admit(conn, host))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    def _links_held(self) -> int:
        """What counts against max_links: links up, handshakes under way, and revoked
        devices' links being closed."""
        return len(self.links) + len(self._handshakes) + len(self._revoked_closing)

    def _refuse_early(self, conn: socket.socket, reason: str) -> None:
        with contextlib.suppress(OSError):
            conn.close()
        if reason in ALL_SOURCES_LIMITS:
            self._budget_spent(reason)
        else:
            self._refused(reason, None)

    def _budget_spent(self, reason: str) -> None:
        """A connection refused by all sources' handshake budget: counted, and one line
        for the whole flood (BUDGET_LINE_BURST), whatever the sources."""
        self.metrics.refusals.labels(reason).inc()
        held = self.budget_lines.allow(reason, asyncio.get_running_loop().time())
        if held is not None:
            extra: dict[str, object] = {"reason": reason, "pending": self.sources.pending}
            if held:
                extra["suppressed"] = held
            log.warning("connection refused: all sources' handshake budget is spent", extra=extra)

    def _refused(self, reason: str, peer: str | None, identity: Identity | None = None) -> None:
        self.metrics.refusals.labels(reason).inc()
        # Anyone can open connections that fail: the line is limited per source
        # (limits.source_key: an IPv6 address's /64), per identity once a certificate
        # named one (those are scarce), and overall (relay.ops.loglimit);
        # relay_refusals_total counts every one.
        source = source_key(peer.rsplit(":", 1)[0]) if peer else "early"
        key = identity.uri if identity is not None else source
        now = asyncio.get_running_loop().time()
        held = self.refusal_lines.allow(key, now)
        if held is not None:
            extra: dict[str, object] = {"reason": reason, "peer": peer or ""}
            extra["identity"] = str(identity or "")
            if held:
                extra["suppressed"] = held
            log.warning("connection refused", extra=extra)
        if identity is not None and identity.trust_domain == self.trust_domain:
            self.refusal_reporter.report(reason, identity, peer or "", now)

    async def _admit(self, conn: socket.socket, host: str) -> None:
        """One connection's way in; a bug here is logged, never left unretrieved."""
        try:
            await self._handshake(conn, host)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.metrics.refusals.labels("internal_error").inc()
            log.exception("admitting a connection failed")
            with contextlib.suppress(OSError):
                conn.close()

    async def _handshake(self, conn: socket.socket, host: str) -> None:
        try:
            peer = f"{host}:{conn.getpeername()[1]}"
        except (OSError, IndexError):
            peer = host
        settings = self.config.limits
        try:
            transport, link = await accept_tls(
                conn,
                self.ssl_context,
                lambda: Link(client=False, settings=settings, autostart=False),
                handshake_timeout=self.config.handshake_timeout,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._handshake_failed.inc()
            self._refused(classify_handshake_error(exc), peer)
            return
        finally:
            self.sources.end(host)
        self._handshake_ok.inc()
        ssl_object = transport.get_extra_info("ssl_object")
        alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        if alpn == ALPN_ENROLL:
            host = peer.rsplit(":", 1)[0]
            now = asyncio.get_running_loop().time()
            if not self.enrollment.admit(host, now):
                transport.abort()
                self._refused("rate_limited", peer)
                self.refusal_reporter.report("rate_limited", None, peer, now)
                return
            self.enrollment.attach(link, host)
            link.on_unread = partial(self.peer_unread, source_key(host), link.name)
            return
        role = TUNNEL_ALPNS.get(alpn or "")
        if role is None:
            transport.abort()
            self._refused("alpn", peer)
            return
        try:
            identity = peer_identity(ssl_object)
        except IdentityError:
            transport.abort()
            self._refused("bad_certificate", peer)
            return
        reason = refusal_for_identity(identity, self.trust_domain, {role})
        if reason is None and identity is not None:
            der = ssl_object.getpeercert(binary_form=True)
            reason = self.ca_sites.refusal(identity, der)
        if reason is None and identity is not None and identity.uri in self.revoked:
            reason = "revoked"
        if reason == "revoked":
            assert identity is not None
            self._turn_away_revoked(link, identity, peer)
            return
        device_over_cap = (
            reason is None
            and role == "device"
            and identity is not None
            and not self.devices.add_link(identity.uri)
        )
        if device_over_cap:
            reason = "device_links"
        if reason is not None or identity is None:
            transport.abort()
            self._refused(reason or "no_certificate", peer, identity)
            return
        self._attach(link, identity, peer)

    def peer_unread(self, key: str, name: str, reason: str) -> None:
        """Link `name` is aborted: its peer leaves our answers unread (Link.on_unread).
        Counted always; the line limited per `key` (a source, or an identity) and
        overall (UNREAD_LINES_TOTAL)."""
        self._limit_hit("peer_unread")
        held = self.unread_lines.allow(key, asyncio.get_running_loop().time())
        if held is not None:
            extra: dict[str, object] = {"link": name, "reason": reason}
            if held:
                extra["suppressed"] = held
            log.warning("link aborted: the peer does not read", extra=extra)

    def _turn_away_revoked(self, link: Link, identity: Identity, peer: str) -> None:
        """Refuse a revoked device's link, telling it why while fewer than
        REVOKED_CLOSING_MAX are being told (each held against max_links until closed)."""
        self._refused("revoked", peer, identity)
        if len(self._revoked_closing) >= REVOKED_CLOSING_MAX:
            link.abort()
            return
        link.on_unread = partial(self.peer_unread, identity.uri, f"revoked@{peer}")
        self._revoked_closing.add(link)
        link.closed.add_done_callback(lambda _: self._revoked_closing.discard(link))
        self._tell_revoked(link, self.revoked.notice(identity.uri))

    @staticmethod
    def _tell_revoked(link: Link, notice: str) -> None:
        """Say why instead of dropping the connection, with the agent's notice: the device
        verifies it, then stops dialling and tells its user to enroll again. The link
        never routes; it is aborted if it lingers."""
        link.start()
        _close_revoked(link, notice)

    def _attach(self, link: Link, identity: Identity, peer: str) -> None:
        site = identity.site or ""
        link.peer = identity
        link.name = f"{identity.role}:{site}/{identity.name}@{peer}"
        link.on_unread = partial(self.peer_unread, identity.uri, link.name)
        gauge = self.metrics.links.labels(identity.role, site)
        if identity.role == "agent":
            link.on_stream = lambda stream: stream.reset(ErrorCode.FORBIDDEN)
            # Routed to only once its revocation snapshot has arrived (AgentControl).
            link.on_control = AgentControl(
                link,
                site,
                router=self.router,
                revoked=self.revoked,
                metrics=self.metrics,
                close_device=self.close_device,
            )
            self.links.agents.add(link)
        else:
            uri = identity.uri
            link.on_stream = lambda stream: self.router.route_session(site, stream, uri)
            self.links.add_device(uri, link)
        gauge.inc()
        self._link_line("link up", identity, {"identity": identity.uri, "peer": peer})
        link.closed.add_done_callback(lambda _: self._detach(link, identity, peer))
        link.start()

    def close_device(self, uri: str) -> None:
        """Close every live link of a revoked device at once, passing on its notice."""
        notice = self.revoked.notice(uri)
        for link in list(self.links.devices.get(uri, ())):
            _close_revoked(link, notice)

    def _detach(self, link: Link, identity: Identity, peer: str) -> None:
        site = identity.site or ""
        self.metrics.links.labels(identity.role, site).dec()
        if identity.role == "agent":
            self.links.agents.discard(link)
            self.router.remove_agent(site, link)
        else:
            self.devices.remove_link(identity.uri)
            self.links.remove_device(identity.uri, link)
        code = link.conn.terminated.code if link.conn.terminated else 0
        context: dict[str, object] = {
            "identity": identity.uri,
            "peer": peer,
            "code": ErrorCode.name_of(code),
        }
        self._link_line("link down", identity, context)

    def _link_line(self, message: str, identity: Identity, context: dict[str, object]) -> None:
        """An INFO line of a link's life, limited per identity (LINK_LINE_BURST)."""
        held = self.link_lines.allow(identity.uri, asyncio.get_running_loop().time())
        if held is not None:
            log.info(message, extra={**context, "suppressed": held} if held else context)


def _close_revoked(link: Link, notice: str) -> None:
    """GOAWAY REVOKED with the agent's notice (opaque here; "" from an older agent), then
    close; abort within REVOKED_CLOSE_BOUND if the device does not read it (a stalled
    reader would otherwise hold the link, and its buffers, for good)."""
    link.close(ErrorCode.REVOKED, goaway_reason(notice))
    link.loop.call_later(REVOKED_CLOSE_BOUND, link.abort)


def _source_of(conn: socket.socket) -> str:
    """The address a connection comes from (the key of the per-source limits)."""
    try:
        return str(conn.getpeername()[0])
    except (OSError, IndexError):
        return "?"
