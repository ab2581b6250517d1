"""`LabelledCounts`: one Prometheus counter family read at scrape time from plain counts.

A module of its own, importing prometheus_client only, so that the gateway can use it:
relay.ops.metrics (the ends' collector, which which it served before) imports DICOM, compression
and seal modules that the gateway must never load (tests/gateway/test_gateway_purity.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["LabelledCounts"]


class LabelledCounts(Collector):
    """One counter family read at scrape time from `counts()`, a {label value: count}
    mapping kept by code that does not import prometheus_client (relay.dicom), or bumped
    as plain ints on a hot path (the gateway's byte tallies)."""

    def __init__(
        self, name: str, documentation: str, label: str, counts: Callable[[], Mapping[str, int]]
    ) -> None:
        self.name, self.documentation, self.label = name, documentation, label
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, n in self.counts().items():
            family.add_metric([value], n)
        yield family
