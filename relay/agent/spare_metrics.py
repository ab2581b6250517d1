"""`relay_pacs_spare_associations_total{outcome}`: what became of the agent's spare
associations with the PACS (relay.dicom.spare).

Read at scrape time from the DICOM agent's `SpareAssociation` (relay.dicom never imports
prometheus_client). "used" against "opened" says how often a request skipped
associating; "stale" counts spares the PACS had closed first (shorten
`pacs.spare_association` below its idle timeout if that grows).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["SpareAssociationMetrics"]


class SpareAssociationMetrics(Collector):
    def __init__(self, counts: Callable[[], Mapping[str, int]]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "relay_pacs_spare_associations",
            "Spare associations with the PACS, by what became of them",
            labels=["outcome"],
        )
        for outcome, n in self.counts().items():
            family.add_metric([outcome], n)
        yield family
