"""`relay_pacs_move_receiver_refused_total{kind}`: what the agent's C-MOVE storage SCP
turned away (relay.dicom.intake.MoveReceiver, `pacs.retrieve: move`).

Read at scrape time (relay.dicom never imports prometheus_client). Each of these is also
a warning, limited per kind in the log; the counter counts every one. `store`: C-STOREs
that belong to no running C-MOVE of ours or do not come from the PACS's AE (a PACS
misconfigured, or a host that can reach the port); `stranger`: connections from a host
that is not the PACS, closed unread; `oversized`: associations cut for a PDU or a
C-STORE over the limits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from relay.ops.labelled import LabelledCounts

__all__ = ["MoveReceiverMetrics"]


class MoveReceiverMetrics(LabelledCounts):
    def __init__(self, counts: Callable[[], Mapping[str, int]]) -> None:
        super().__init__(
            "relay_pacs_move_receiver_refused",
            "What the agent's C-MOVE storage SCP turned away, by kind",
            "kind",
            counts,
        )
