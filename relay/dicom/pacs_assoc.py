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
import threading
import weakref
from collections.abc import Sequence
from typing import Any, Final

from pydicom.dataelem import RawDataElement
from pynetdicom import build_role, evt
from pynetdicom.association import Association

from relay.dicom import checkpoint, contexts
from relay.dicom.ending import KeptAE, OpenAssociations
from relay.dicom.pacs_target import PacsTarget

__all__ = ["allow_move_stalls", "associate", "drop_malformed_counts", "scp_roles"]

log = logging.getLogger(__name__)

# The sub-operation counts of a C-GET or C-MOVE response: US, one value each (PS3.7 E.1).
_COUNTS: Final = {
    0x00001020: "Number of Remaining Sub-operations",
    0x00001021: "Number of Completed Sub-operations",
    0x00001022: "Number of Failed Sub-operations",
    0x00001023: "Number of Warning Sub-operations",
}
_RETRIEVE_RESPONSES: Final = {0x8010: "C-GET", 0x8021: "C-MOVE"}
_US_BYTES: Final = 2
# The associations whose malformed count was logged: one line each, not one a response.
_warned: weakref.WeakSet[Any] = weakref.WeakSet()
_warned_lock = threading.Lock()


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
                (evt.EVT_DIMSE_RECV, drop_malformed_counts),
                (evt.EVT_CONN_OPEN, _counts_checked_first),
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


def drop_malformed_counts(event: Any) -> None:
    """EVT_DIMSE_RECV: a C-GET or C-MOVE response's sub-operation count that is not one
    US value (several values, or a length pydicom cannot read) is removed before
    pynetdicom reads the response, and logged once per association.

    pynetdicom takes the first of several values (a count the PACS did not mean), and
    aborts the association on one it cannot decode, which ended the retrieve in 0xC003
    as if the PACS had aborted. Without the count the response is one that gives none:
    the workstation counts what it delivers, the survey stands in for the total."""
    command = getattr(event.message, "command_set", None)
    if command is None:
        return
    try:
        kind = _RETRIEVE_RESPONSES.get(int(command.CommandField))
    except Exception:  # (not ours to judge: pynetdicom refuses such a command itself)
        return
    if kind is None:
        return
    for tag, name in _COUNTS.items():
        if tag not in command:
            continue
        what = _malformed(command.get_item(tag))
        if what is None:
            continue
        del command[tag]
        _warn_once(event.assoc, f"PACS sent a malformed {name} in a {kind} response "
                                f"({what}); ignored: the relay counts for itself")  # fmt: skip


def _counts_checked_first(event: Any) -> None:
    """EVT_CONN_OPEN: `drop_malformed_counts` ahead of every other EVT_DIMSE_RECV handler.
    pynetdicom's own (bound at debug, relay.ops.logs: it logs each message) reads the
    counts, and its exception on one it cannot decode ends the handlers after it."""
    handlers = event.assoc.get_handlers(evt.EVT_DIMSE_RECV)  # (the bound list, in order)
    mine = (drop_malformed_counts, None)
    if mine in handlers:
        handlers.remove(mine)
        handlers.insert(0, mine)


def _malformed(elem: Any) -> str | None:
    """Why a count element is not one US value (None: it is, or it is empty)."""
    if isinstance(elem, RawDataElement):
        size = len(elem.value or b"")
        return None if size in (0, _US_BYTES) else f"{size} bytes"
    if elem.VM > 1:
        return f"{elem.VM} values"
    if elem.value is not None and elem.value != "" and not isinstance(elem.value, int):
        return "not a number"
    return None


def _warn_once(assoc: Any, line: str) -> None:
    """Log `line` (counts and names only: no value of the PACS's data) once for `assoc`."""
    with _warned_lock:
        if assoc in _warned:
            return
        _warned.add(assoc)
    log.warning("%s", line)
