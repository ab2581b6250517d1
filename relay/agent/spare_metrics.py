"""`relay_pacs_spare_associations_total{outcome}`: what became of the agent's spare
associations with the PACS (relay.dicom.spare).

Read at scrape time from the DICOM agent's `SpareAssociation` (relay.dicom never imports
prometheus_client). "used" against "opened" says how often a request skipped
associating; "stale" counts spares the PACS had closed first (shorten
`pacs.spare_association` below its idle timeout if that grows).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from relay.ops.labelled import LabelledCounts

__all__ = ["SpareAssociationMetrics"]


class SpareAssociationMetrics(LabelledCounts):
    def __init__(self, counts: Callable[[], Mapping[str, int]]) -> None:
        super().__init__(
            "relay_pacs_spare_associations",
            "Spare associations with the PACS, by what became of them",
            "outcome",
            counts,
        )
