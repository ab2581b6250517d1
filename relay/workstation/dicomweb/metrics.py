"""`relay_dicomweb_*`: requests by route and status, their durations, retrievals shared,
uploads cut.

Routes are the route patterns (`/dicom-web/studies/{study}/series`), never the UIDs: the
label set stays small and no patient identifier reaches the metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

__all__ = ["BUCKETS", "DicomwebMetrics"]

BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
MAX_ROUTES = 64  # label values kept (routes are a fixed set; this is a guard)
# Why a STOW-RS upload was cut (408, or 202 once something was stored, which the status
# alone does not tell): nothing came for dicomweb.timeout, or below the minimum rate.
UPLOAD_CUTS = ("stalled", "too_slow")


class DicomwebMetrics(Collector):
    def __init__(
        self,
        gauges: Callable[[], dict[str, float]] | None = None,
        counters: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        """`gauges`/`counters`: name -> (help is the name in words) read at scrape time."""
        self.requests: dict[tuple[str, str], int] = {}
        self.durations: dict[str, list[float]] = {}  # route -> bucket counts + [sum]
        self.uploads_cut = dict.fromkeys(UPLOAD_CUTS, 0)
        self.gauges = gauges or (lambda: {})
        self.counters = counters or (lambda: {})

    def observe(self, route: str, status: int, seconds: float) -> None:
        if route not in self.durations and len(self.durations) >= MAX_ROUTES:
            route = "other"
        key = (route, str(status))
        self.requests[key] = self.requests.get(key, 0) + 1
        counts = self.durations.setdefault(route, [0.0] * (len(BUCKETS) + 2))
        for i, bound in enumerate(BUCKETS):
            if seconds <= bound:
                counts[i] += 1
        counts[len(BUCKETS)] += 1  # +Inf
        counts[len(BUCKETS) + 1] += seconds

    def cut_upload(self, reason: str) -> None:
        """Count an upload cut for `reason` (one of UPLOAD_CUTS)."""
        if reason not in self.uploads_cut:
            raise ValueError(f"not an upload cut: {reason!r}")
        self.uploads_cut[reason] += 1

    def collect(self) -> Iterator[Metric]:
        c = CounterMetricFamily("relay_dicomweb_requests", "DICOMweb requests by route and "
                                "HTTP status", labels=["route", "status"])  # fmt: skip
        for (route, status), n in sorted(self.requests.items()):
            c.add_metric([route, status], n)
        yield c
        h = HistogramMetricFamily("relay_dicomweb_request_duration_seconds",
                                  "DICOMweb request durations, until the last byte",
                                  labels=["route"])  # fmt: skip
        for route, counts in sorted(self.durations.items()):
            buckets = [(str(b), counts[i]) for i, b in enumerate(BUCKETS)]
            buckets.append(("+Inf", counts[len(BUCKETS)]))
            h.add_metric([route], buckets, counts[len(BUCKETS) + 1])
        yield h
        u = CounterMetricFamily("relay_dicomweb_uploads_cut", "STOW-RS uploads cut before "
                                "their end, by reason", labels=["reason"])  # fmt: skip
        for reason, n in self.uploads_cut.items():
            u.add_metric([reason], n)
        yield u
        for name, value in self.gauges().items():
            yield GaugeMetricFamily(f"relay_dicomweb_{name}", name.replace("_", " "), value=value)
        for name, value in self.counters().items():
            yield CounterMetricFamily(f"relay_dicomweb_{name}", name.replace("_", " "),
                                      value=value)  # fmt: skip
