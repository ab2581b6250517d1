"""Enrollment links: TLS without a client certificate, one stream, passed to an agent.

The gateway only checks the shape (ALPN, one `enroll` stream naming a site it has an
agent for) and rate-limits attempts per source (an IPv4 address, an IPv6 /64); the agent
judges the code and the CSR. Nothing is stored: the attempt lives as long as its link,
at most LINK_LIFETIME.
"""

from __future__ import annotations

import asyncio
import logging
import re

from gateway.limits import source_key
from gateway.metrics import GatewayMetrics
from gateway.router import Router
from relay.net.aio import Link, Stream
from relay.ops.ratelimit import RateLimiter
from relay.proto import ErrorCode
from relay.trust.revocation import ENROLL_RESULTS_VERSION
from relay.wire import (
    HEADER_ENROLL_RESULTS,
    HEADER_PEER,
    HEADER_SITE,
    HEADER_TARGET,
    TARGET_ENROLL,
)

log = logging.getLogger(__name__)

LINK_LIFETIME = 30.0  # seconds an enrollment link may stay open
# Seconds after that close before the link is aborted: a PC that reads nothing never
# answers the TLS close, and would hold one of MAX_OPEN until TLS gives up on its own.
CLOSE_BOUND = 1.0
ATTEMPTS_PER_MINUTE = 10
BURST = 5
MAX_OPEN = 100  # concurrent enrollment links
_SITE = re.compile(r"[A-Za-z0-9._-]{1,64}")


class EnrollmentDesk:
    def __init__(self, router: Router, metrics: GatewayMetrics) -> None:
        self.router = router
        self.metrics = metrics
        self.limiter = RateLimiter(rate=ATTEMPTS_PER_MINUTE / 60.0, burst=BURST)
        self.links: set[Link] = set()  # open (at most MAX_OPEN): a drain tells and closes them

    @property
    def open(self) -> int:
        return len(self.links)

    def admit(self, host: str, now: float) -> bool:
        """Whether an enrollment link from `host` may start: one of MAX_OPEN is free and
        its source (`limits.source_key`: an IPv6 address's /64) has an attempt left."""
        allowed = self.open < MAX_OPEN and self.limiter.allow(source_key(host), now)
        if not allowed:
            self.metrics.enrollments.labels("rate_limited").inc()
        return allowed

    def attach(self, link: Link, host: str) -> None:
        link.name = f"enroll@{host}"
        streams_seen = 0

        def on_stream(stream: Stream) -> None:
            nonlocal streams_seen
            streams_seen += 1
            site = stream.headers.get(HEADER_SITE, "")
            if streams_seen > 1 or stream.headers.get(HEADER_TARGET) != TARGET_ENROLL:
                self._refuse(stream, "bad_request", ErrorCode.FORBIDDEN)
            elif not _SITE.fullmatch(site) or not self.router.agent_links(site):
                self._refuse(stream, "no_route", ErrorCode.NO_ROUTE)
            else:
                self.metrics.enrollments.labels("forwarded").inc()
                origin = {HEADER_PEER: host, HEADER_ENROLL_RESULTS: str(ENROLL_RESULTS_VERSION)}
                self.router.route(site, stream, origin)

        link.on_stream = on_stream
        self.links.add(link)
        lifetime = link.loop.call_later(LINK_LIFETIME, _time_over, link)
        link.closed.add_done_callback(lambda _: self._closed(link, lifetime))
        link.start()

    def _closed(self, link: Link, lifetime: asyncio.TimerHandle) -> None:
        """The link is over: its slot comes back, and its lifetime timer goes, which
        would otherwise hold the closed link (and its TLS transport's buffers, about
        270 KB under uvloop) until LINK_LIFETIME: links that close at once, admitted
        from many addresses, are not bounded by MAX_OPEN."""
        self.links.discard(link)
        lifetime.cancel()

    def _refuse(self, stream: Stream, result: str, code: ErrorCode) -> None:
        self.metrics.enrollments.labels(result).inc()
        stream.reset(code)


def _time_over(link: Link) -> None:
    """Close at the end of the attempt's time; abort CLOSE_BOUND later if still open."""
    link.close(ErrorCode.NO_ERROR, "enrollment time over")
    if not link.closed.done():
        link.loop.call_later(CLOSE_BOUND, link.abort)
