"""Which agent link serves a device's stream, and the splice that joins them.

Routing is by site only: a device of site B can never reach an agent of site A, because
the site comes from the device's certificate, not from anything the device sends.
"""

from __future__ import annotations

import logging

from gateway.metrics import GatewayMetrics
from gateway.splice import Splice
from relay.net.aio import Link, Stream
from relay.proto import ErrorCode, LinkClosedError, StreamStateError
from relay.wire import HEADER_DEVICE, HEADER_DEVICE_SITE, HEADER_PEER, RESERVED_PREFIX

log = logging.getLogger(__name__)

# Headers the gateway sets on streams it opens towards an agent; a device may not set them.


class Router:
    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics
        self._agents: dict[str, list[Link]] = {}
        self._turns: dict[str, int] = {}

    def add_agent(self, site: str, link: Link) -> None:
        self._agents.setdefault(site, []).append(link)

    def remove_agent(self, site: str, link: Link) -> None:
        links = self._agents.get(site, [])
        if link in links:
            links.remove(link)
        if not links:
            self._agents.pop(site, None)
            self._turns.pop(site, None)

    def agent_links(self, site: str | None = None) -> list[Link]:
        if site is not None:
            return list(self._agents.get(site, ()))
        return [link for links in self._agents.values() for link in links]

    def sites(self) -> list[str]:
        return sorted(self._agents)

    def _pick(self, site: str) -> Link | None:
        """The least-loaded agent link of the site that still takes streams; ties go round
        robin, so short streams one after another are spread over the site's agents."""
        usable = [link for link in self._agents.get(site, ()) if link.conn.can_open_stream()]
        if not usable:
            return None
        turn = self._turns[site] = (self._turns.get(site, 0) + 1) % len(usable)
        rotated = usable[turn:] + usable[:turn]
        return min(rotated, key=lambda link: link.conn.open_streams)

    def route(self, site: str, stream: Stream, origin: dict[str, str]) -> None:
        """Splice a new stream to an agent of `site`, or reset it with a code.

        `origin` are the x-relay-* headers the gateway vouches for (device, peer).
        """
        agent = self._pick(site)
        if agent is None:
            self._refuse(stream, site, ErrorCode.NO_ROUTE, "no_route")
            return
        headers = {k: v for k, v in stream.headers.items() if not k.startswith(RESERVED_PREFIX)}
        headers.update(origin)
        headers[HEADER_DEVICE_SITE] = site
        try:
            upstream = agent.open_stream(headers)
        except ValueError:
            self._refuse(stream, site, ErrorCode.HEADERS_TOO_LARGE, "bad_headers")
            return
        except (LinkClosedError, StreamStateError):
            self._refuse(stream, site, ErrorCode.NO_ROUTE, "no_route")
            return
        m = self.metrics
        m.streams.labels(site, "routed").inc()
        gauge = m.streams_open.labels(site)
        gauge.inc()
        log.debug(
            "stream routed",
            extra={
                "origin": origin.get(HEADER_DEVICE) or origin.get(HEADER_PEER, ""),
                "stream": stream.stream_id,
                "agent_stream": upstream.stream_id,
                "target": stream.headers.get("target", ""),
            },
        )
        Splice(
            stream,
            upstream,
            upstream=m.bytes.labels("device_to_agent"),
            downstream=m.bytes.labels("agent_to_device"),
            on_reset=lambda code: m.stream_resets.labels(ErrorCode.name_of(code)).inc(),
            on_done=gauge.dec,
        )

    def _refuse(self, stream: Stream, site: str, code: ErrorCode, outcome: str) -> None:
        stream.reset(code)
        self.metrics.streams.labels(site, outcome).inc()
