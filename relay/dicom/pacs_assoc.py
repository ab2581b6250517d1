"""Requesting an association with the PACS: one place for the agent's AE settings.

Every association the agent opens towards the PACS (a query or retrieve, the survey
beside it, the spare left for the next request, the readiness C-ECHO) is requested here,
with TCP_NODELAY and every wait bounded. Blocking: call it on a thread, never the loop.

Each is held by its owners (`relay.dicom.ending.OpenAssociations`: the agent's DICOM
service, one operation) from its creation, before its TCP connect, so that their end
ends it within a bound whatever the PACS does. Each pauses its reactor with
`relay.dicom.checkpoint.Checkpoint`: with pynetdicom's own pause, a C-FIND's match or a
C-GET's final response can be taken by the reactor (lost, or the query hangs until its
DIMSE timeout), as a C-MOVE destination's C-STORE answers were at the workstation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from pynetdicom import build_role, evt
from pynetdicom.association import Association

from relay.dicom import checkpoint, contexts, counts
from relay.dicom.ending import KeptAE, OpenAssociations
from relay.dicom.pacs_target import PacsTarget

__all__ = ["allow_move_stalls", "associate", "scp_roles"]

log = logging.getLogger(__name__)


def associate(
    pacs: PacsTarget,
    cxs: Sequence[Any],
    *,
    ext_neg: Sequence[Any] = (),
    handlers: Sequence[Any] = (),
    timeout: float | None = None,
    keep: Sequence[OpenAssociations | None] = (),
) -> Association:
    """Request an association (raises if the PACS cannot be reached; check
    `is_established`). Waits are bounded by `pacs.timeout`, and silence on an established
    association by that plus `pacs.stall_timeout` (a full channel blocks the agent, and
    the PACS then waits on us by design); `timeout` bounds them all instead (a probe).
    `keep`: the owners that hold it from its creation on, before its TCP connect
    (`OpenAssociations`), so that their end cuts a connect still under way too."""
    owners = [owner for owner in keep if owner is not None]
    ae = KeptAE(pacs.calling_ae_title, owners)
    wait = pacs.timeout if timeout is None else timeout
    ae.acse_timeout = wait
    ae.dimse_timeout = wait
    ae.connection_timeout = wait
    ae.network_timeout = pacs.timeout + pacs.stall_timeout if timeout is None else timeout
    ae.maximum_pdu_size = 0
    try:
        return ae.associate(
            pacs.host,
            pacs.port,
            contexts=list(cxs),
            ae_title=pacs.ae_title,
            max_pdu=0,
            ext_neg=list(ext_neg) or None,
            evt_handlers=[
                contexts.NODELAY,
                contexts.bounded_stalls(ae.network_timeout),  # a PACS hung mid-PDU
                (evt.EVT_CONN_OPEN, checkpoint.install),  # its responses never stolen
                *counts.HANDLERS,  # a malformed count from the PACS, dropped first
                *handlers,
                *(h for owner in owners for h in owner.handlers()),
            ],
        )
    finally:
        ae.requested()


def allow_move_stalls(assoc: Association, pacs: PacsTarget) -> None:
    """Bear the silence of a C-MOVE's association: the PACS's next response waits for its
    C-STORE at our MoveReceiver, which the intake holds while the stream's channel is full
    (up to `pacs.stall_timeout`: a slow viewer, not a failing PACS), so the wait for it is
    bounded by that plus `pacs.timeout`, like the connection's silence.

    A C-GET needs no such wait: its C-STOREs come on its own association and are answered
    on the thread that waits for its responses, which counts only while the PACS is the
    one to act. Nor does a C-FIND: the PACS sends its matches on while the channel is
    full (pynetdicom queues them), and past `pacs_ops.MAX_FIND_BACKLOG` unread the
    query is cancelled, so a C-FIND never waits on the viewer for long."""
    assoc.dimse_timeout = pacs.timeout + pacs.stall_timeout


def scp_roles(storage: Sequence[Any]) -> list[Any]:
    """SCP/SCU role selection for a C-GET: we take the storage role for its classes."""
    classes = sorted({str(cx.abstract_syntax) for cx in storage})
    return [build_role(sop, scp_role=True) for sop in classes]
