"""The gateway's Prometheus metrics. Labels are roles, sites, reasons and codes: bounded
sets that carry no patient data (sites and roles come from CA-signed certificates)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from gateway.limits import ALL_SOURCES_LIMITS, LIMITS
from relay.ops.labelled import LabelledCounts


class Tally:
    """A count that the relay's hot path bumps as a plain int (no lock, no label lookup:
    a Prometheus Counter.inc per chunk showed in the gateway's profile); read at scrape
    time by a collector. The event loop is the only writer."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.links = Gauge(
            "relay_links", "Authenticated tunnel links open", ["role", "site"], registry=r
        )
        self.handshakes = Counter(
            "relay_handshakes_total", "TLS handshakes by result", ["result"], registry=r
        )
        self.handshakes_pending = Gauge(
            "relay_handshakes_pending",
            "Connections accepted that have not finished the TLS handshake, all sources",
            registry=r,
        )
        self.refusals = Counter(
            "relay_refusals_total", "Connections refused, by reason", ["reason"], registry=r
        )
        # Exported from 0: all sources' budget bites first in a flood, and a series born
        # at 1 has no increase() for an alert to see.
        for reason in ALL_SOURCES_LIMITS:
            self.refusals.labels(reason)
        self.limit_hits = Counter(
            "relay_limit_hits_total",
            "Times a per-device, per-source or all-sources limit refused something, by limit",
            ["limit"],
            registry=r,
        )
        for limit in LIMITS:
            self.limit_hits.labels(limit)
        self.streams = Counter(
            "relay_streams_total", "Device streams by outcome", ["site", "outcome"], registry=r
        )
        self.streams_open = Gauge(
            "relay_streams_open", "Spliced streams open", ["site"], registry=r
        )
        self.stream_resets = Counter(
            "relay_stream_resets_total", "Stream resets passed on, by code", ["code"], registry=r
        )
        #: Payload bytes relayed by direction (relay_bytes_total), bumped by gateway.splice.
        self.bytes = {"device_to_agent": Tally(), "agent_to_device": Tally()}
        r.register(
            LabelledCounts(
                "relay_bytes",
                "Payload bytes relayed (opaque, as sent by the ends)",
                "direction",
                lambda: {direction: tally.value for direction, tally in self.bytes.items()},
            )
        )
        self.enrollments = Counter(
            "relay_enrollments_total",
            "Enrollment attempts seen by the gateway, by result",
            ["result"],
            registry=r,
        )
        self.revocations = Gauge(
            "relay_revoked_devices", "Revoked devices known to this gateway", registry=r
        )
        self.certificate_expiry = Gauge(
            "relay_certificate_expiry_timestamp_seconds",
            "When this process's own certificate expires (Unix time)",
            ["role"],
            registry=r,
        )
        self.heap_trims = Counter(
            "relay_heap_trims_total",
            "Times more than heap_slack of free heap was handed back to the kernel",
            registry=r,
        )
        self.draining = Gauge("relay_draining", "1 while the gateway drains", registry=r)
        self.reloads = Counter(
            "relay_reloads_total",
            "Configuration reloads (SIGHUP) by result",
            ["result"],
            registry=r,
        )
        # Both exported from 0: a series born at 1 by the first failed reload has no
        # increase() for RelayReloadFailed to see.
        for result in ("ok", "error"):
            self.reloads.labels(result)
