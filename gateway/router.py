"""Which agent link serves a device's stream, and the splice that joins them.

Routing is by site only: a device of site B can never reach an agent of site A, because
the site comes from the device's certificate, not from anything the device sends.

A device opens nothing but sealed sessions (target `session`, DESIGN.md section 10):
the request streams travel inside them, end to end between device and agent, where the
gateway can neither read nor alter them. Any other target from a device is reset with
FORBIDDEN and counted. Sessions are spread over the site's agent links by device
(rendezvous hashing), so a device keeps meeting the same agent while the set of links is
stable (its TLS resumption ticket stays useful), and devices spread evenly.

A device's sessions are counted against its caps (gateway.limits): over its session cap,
its rate of session opens, its queued-bytes cap or its share of the agent link, its
stream is reset with LIMIT_EXCEEDED, never another device's. An enrollment stream (no
device) has a queued-bytes budget of its own, `limits.ENROLL_BUFFERED`.

The agent stream carries the device's OPEN headers but for the reserved `x-relay-*` and
`priority`: every device's sessions share the agent link, and no device may order its own
ahead of the others' there.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping

from gateway.limits import DeviceLedger, DeviceUsage
from gateway.metrics import GatewayMetrics
from gateway.splice import Splice
from relay.net.aio import Link, Stream
from relay.proto import ErrorCode, LinkClosedError, StreamStateError
from relay.wire import (
    HEADER_PEER,
    HEADER_PRIORITY,
    HEADER_TARGET,
    RESERVED_PREFIX,
    TARGET_SESSION,
)

log = logging.getLogger(__name__)

# Headers of a device's stream that are not passed on to the agent stream: the reserved
# `x-relay-*` (only the gateway sets them), and `priority`, because every device's sessions
# share the agent link, where both cores schedule by it: a device must not put its session
# ahead of every other device's. The stream the gateway opens goes at the default (u=3, i);
# the real priorities are those of the inner streams, inside the sealed session.
_DROPPED = (HEADER_PRIORITY,)


def _passed_on(headers: Mapping[str, str]) -> dict[str, str]:
    """What of a device's OPEN headers the gateway copies onto the agent stream."""
    return {
        k: v for k, v in headers.items() if not k.startswith(RESERVED_PREFIX) and k not in _DROPPED
    }


class Router:
    def __init__(self, metrics: GatewayMetrics, devices: DeviceLedger) -> None:
        self.metrics = metrics
        self.devices = devices
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

    def _pick_for(self, site: str, device: str) -> Link | None:
        """The agent link of `site` that `device` hashes highest with (rendezvous), passing
        over a link where the device has used up its share while another has room."""
        usable = [link for link in self._agents.get(site, ()) if link.conn.can_open_stream()]
        if not usable:
            return None

        def weight(link: Link) -> bytes:
            return hashlib.blake2b(f"{device}|{link.name}".encode(), digest_size=8).digest()

        ranked = sorted(usable, key=weight, reverse=True)
        for link in ranked:
            if self.devices.within_share(device, link, link.conn.free_local_streams):
                return link
        return ranked[0]  # refused (and counted) by route()

    def route_session(self, site: str, stream: Stream, device: str) -> None:
        """A device's stream: a sealed session to an agent of its site, or FORBIDDEN."""
        if stream.headers.get(HEADER_TARGET) != TARGET_SESSION:
            self._refuse(stream, site, ErrorCode.FORBIDDEN, "forbidden")
            return
        if not self.devices.spend_open(device, stream.link.loop.time()):
            self._refuse(stream, site, ErrorCode.LIMIT_EXCEEDED, "device_opens")
            return
        self.route(site, stream, {}, agent=self._pick_for(site, device), device=device)

    def route(
        self,
        site: str,
        stream: Stream,
        origin: dict[str, str],
        *,
        agent: Link | None = None,
        device: str | None = None,
    ) -> None:
        """Splice a new stream to an agent of `site`, or reset it with a code.

        `origin` are the x-relay-* headers the gateway adds (the enrolling PC's address);
        the agent bases no identity on them. Of the stream's own headers, `x-relay-*` and
        `priority` are not passed on (`_passed_on`). `device` (its SPIFFE ID) is whose
        caps the stream counts against; without one (an enrollment, from anyone) the
        splice gets a budget of its own, ENROLL_BUFFERED.
        """
        agent = agent or self._pick(site)
        if agent is None:
            self._refuse(stream, site, ErrorCode.NO_ROUTE, "no_route")
            return
        if device is not None:
            refusal = self.devices.stream_refusal(device, agent, agent.conn.free_local_streams)
            if refusal is not None:
                self._refuse(stream, site, ErrorCode.LIMIT_EXCEEDED, refusal)
                return
        headers = _passed_on(stream.headers)
        headers.update(origin)
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
        if device is not None:
            self.devices.add_stream(device, agent)
            budget = self.devices.usage(device)
            over_budget = self.devices.over_buffered
        else:
            budget = DeviceUsage()  # this stream's alone
            over_budget = self.devices.over_enroll_buffered

        def on_done() -> None:
            gauge.dec()
            if device is not None:
                self.devices.remove_stream(device, agent)

        log.debug(
            "stream routed",
            extra={
                "origin": device or origin.get(HEADER_PEER, ""),
                "stream": stream.stream_id,
                "agent_stream": upstream.stream_id,
                "target": stream.headers.get("target", ""),
            },
        )
        Splice(
            stream,
            upstream,
            upstream=m.bytes["device_to_agent"],
            downstream=m.bytes["agent_to_device"],
            on_reset=lambda code: m.stream_resets.labels(ErrorCode.name_of(code)).inc(),
            on_done=on_done,
            budget=budget,
            over_budget=over_budget,
        )

    def _refuse(self, stream: Stream, site: str, code: ErrorCode, outcome: str) -> None:
        stream.reset(code)
        self.metrics.streams.labels(site, outcome).inc()
