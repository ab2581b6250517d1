"""Prometheus metrics of the two ends (agent, workstation).

The working code keeps plain counters on its own objects (link supervisors, dispatcher,
forwarder, codec stats); this collector reads them at scrape time, so no hot path ever
touches a Prometheus object. DICOM hooks (`relay.dicom.stats.DicomStats`) are called from
pynetdicom threads too, hence the lock in `DicomMetrics`.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from relay.dicom.stats import status_category
from relay.net.compression import CodecStats
from relay.net.dialer import KeptLink
from relay.seal.session import SealStats

# DICOM operation latency buckets, seconds: a C-ECHO over a WAN to a study retrieval.
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


@dataclass
class _Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.total += value


class DicomMetrics:
    """A thread-safe `relay.dicom.stats.DicomStats` that the collector exports."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.operations: Counter[tuple[str, str]] = Counter()
        self.latency: dict[str, _Histogram] = {}
        self.raw = Counter[str]()
        self.wire = Counter[str]()
        self.instances = 0
        self.instance_bytes = 0

    def operation_done(self, op: str, status: int, seconds: float) -> None:
        with self._lock:
            self.operations[(op, status_category(status))] += 1
            self.latency.setdefault(op, _Histogram()).observe(seconds)

    def bytes_transferred(self, direction: str, raw: int, wire: int) -> None:
        with self._lock:
            self.raw[direction] += raw
            self.wire[direction] += wire

    def instance_relayed(self, size: int) -> None:
        with self._lock:
            self.instances += 1
            self.instance_bytes += size


@dataclass
class Sources:
    """Where the numbers live; each callable is read at scrape time."""

    links: Callable[[], Iterable[KeptLink]]
    codecs: Callable[[], Iterable[CodecStats]] = lambda: ()
    streams: Callable[[], Mapping[str, int]] = lambda: {}  # by target
    refusals: Callable[[], Mapping[str, int]] = lambda: {}  # streams refused, by reason
    certificate: Callable[[], Path | None] = lambda: None
    seal: Callable[[], SealStats | None] = lambda: None  # sealed sessions (relay.seal)


class EndCollector(Collector):
    def __init__(self, role: str, site: str, sources: Sources, dicom: DicomMetrics) -> None:
        self.role = role
        self.site = site
        self.sources = sources
        self.dicom = dicom
        self._cert_cache: tuple[Path, float, float] | None = None  # path, mtime, expiry

    def collect(self) -> Iterator[Metric]:
        yield from self._links()
        yield from self._streams()
        yield from self._bytes()
        yield from self._dicom()
        yield from self._sealed()
        expiry = self._certificate_expiry()
        if expiry is not None:
            g = GaugeMetricFamily(
                "relay_certificate_expiry_timestamp_seconds",
                "When this process's own certificate expires (Unix time)",
                labels=["role"],
            )
            g.add_metric([self.role], expiry)
            yield g

    def _links(self) -> Iterator[Metric]:
        links = list(self.sources.links())
        up = GaugeMetricFamily(
            "relay_links", "Tunnel links up, by peer role", labels=["role", "site"]
        )
        up.add_metric(["gateway", self.site], sum(1 for k in links if k.up.is_set()))
        yield up
        reconnects = CounterMetricFamily(
            "relay_reconnects", "Links re-established after a loss", labels=["role"]
        )
        reconnects.add_metric([self.role], sum(k.stats.reconnects for k in links))
        yield reconnects
        failures = CounterMetricFamily(
            "relay_dial_failures", "Attempts to reach a gateway that failed", labels=["role"]
        )
        failures.add_metric([self.role], sum(k.stats.failures for k in links))
        yield failures

    def _streams(self) -> Iterator[Metric]:
        streams = CounterMetricFamily("relay_streams", "Streams by target", labels=["target"])
        for target, n in sorted(self.sources.streams().items()):
            streams.add_metric([target], n)
        yield streams
        refused = CounterMetricFamily(
            "relay_stream_refusals", "Streams refused by this end, by reason", labels=["reason"]
        )
        for reason, n in sorted(self.sources.refusals().items()):
            refused.add_metric([reason], n)
        yield refused

    def _bytes(self) -> Iterator[Metric]:
        sent_raw = sent_wire = recv_raw = recv_wire = 0
        for c in self.sources.codecs():
            sent_raw += c.raw_out
            sent_wire += c.wire_out
            recv_raw += c.raw_in
            recv_wire += c.wire_in
        d = self.dicom
        with d._lock:
            sent_raw += d.raw["out"]
            sent_wire += d.wire["out"]
            recv_raw += d.raw["in"]
            recv_wire += d.wire["in"]
        family = CounterMetricFamily(
            "relay_bytes",
            "Stream payload bytes at this end: raw (application) and compressed (on the tunnel)",
            labels=["direction", "stage"],
        )
        family.add_metric(["sent", "raw"], sent_raw)
        family.add_metric(["sent", "compressed"], sent_wire)
        family.add_metric(["received", "raw"], recv_raw)
        family.add_metric(["received", "compressed"], recv_wire)
        yield family

    def _sealed(self) -> Iterator[Metric]:
        stats = self.sources.seal()
        if stats is None:
            return
        sessions = GaugeMetricFamily("relay_sessions_open", "Sealed sessions open at this end")
        sessions.add_metric([], stats.open)
        yield sessions
        handshakes = CounterMetricFamily(
            "relay_session_handshakes",
            "Inner TLS handshakes of sealed sessions, by result and failure reason",
            labels=["result", "reason"],
        )
        for (result, reason), n in sorted(stats.handshakes.items()):
            handshakes.add_metric([result, reason], n)
        yield handshakes
        counts = stats.bytes()
        family = CounterMetricFamily(
            "relay_sealed_bytes",
            "Session bytes at this end: plain (inside the TLS) and sealed (TLS records)",
            labels=["direction", "stage"],
        )
        family.add_metric(["sent", "plain"], counts["plain_out"])
        family.add_metric(["sent", "sealed"], counts["sealed_out"])
        family.add_metric(["received", "plain"], counts["plain_in"])
        family.add_metric(["received", "sealed"], counts["sealed_in"])
        yield family

    def _dicom(self) -> Iterator[Metric]:
        d = self.dicom
        ops = CounterMetricFamily(
            "relay_dicom_operations",
            "DICOM operations by type and status",
            labels=["operation", "status"],
        )
        hist = HistogramMetricFamily(
            "relay_dicom_operation_duration_seconds",
            "DICOM operation latency",
            labels=["operation"],
        )
        instances = CounterMetricFamily("relay_dicom_instances", "Instances relayed")
        instance_bytes = CounterMetricFamily(
            "relay_dicom_instance_bytes", "Bytes of instances relayed"
        )
        with d._lock:
            for (op, status), n in sorted(d.operations.items()):
                ops.add_metric([op, status], n)
            for op, h in sorted(d.latency.items()):
                cumulative = 0
                buckets = []
                for bound, count in zip((*BUCKETS, float("inf")), h.counts, strict=True):
                    cumulative += count
                    buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
                hist.add_metric([op], buckets, h.total)
            instances.add_metric([], d.instances)
            instance_bytes.add_metric([], d.instance_bytes)
        yield from (ops, hist, instances, instance_bytes)

    def _certificate_expiry(self) -> float | None:
        path = self.sources.certificate()
        if path is None:
            return None
        try:
            mtime = path.stat().st_mtime
            if self._cert_cache is None or self._cert_cache[:2] != (path, mtime):
                cert = x509.load_pem_x509_certificate(path.read_bytes())
                self._cert_cache = (path, mtime, cert.not_valid_after_utc.timestamp())
        except (OSError, ValueError):
            return None
        return self._cert_cache[2]


class EndMetrics:
    """The registry of one end process."""

    def __init__(self, role: str, site: str, sources: Sources) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.dicom = DicomMetrics()
        self.collector = EndCollector(role, site, sources, self.dicom)
        self.registry.register(self.collector)
