"""C-MOVE destinations are checked before anything is retrieved for them.

pynetdicom's C-MOVE SCP associates with the destination only after the handler has named
it and announced the number of sub-operations, that is after the relay has asked the
agent to pull the study from the PACS; and when that association fails it answers 0xA801
"Move Destination Unknown", which is false for a destination the node knows but that is
down. So the node checks first: `install()` wraps pynetdicom's C-MOVE service once per
process, and an AE registered with `register(ae, check)` has `check(request)` called
before its C-MOVE handler; a `Refusal` it returns is sent as the one response (0xC008,
with an Error Comment naming the destination) and the handler never runs. `probe()` is the
check itself: one association with the destination (Verification proposed), released
at once.

Every other AE in the process (the embedded PACS of the tests, say) is untouched.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from pynetdicom import AE, build_context, evt
from pynetdicom.dimse_primitives import C_MOVE
from pynetdicom.service_class import QueryRetrieveServiceClass
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from relay.dicom import contexts

log = logging.getLogger(__name__)

MAX_COMMENT: Final = 64  # Error Comment is LO


@dataclass(frozen=True)
class Refusal:
    """The one response to a C-MOVE refused before it starts."""

    status: int
    comment: str


Check = Callable[[Any], Refusal | None]  # the C-MOVE request primitive -> refusal or None

_checks: weakref.WeakKeyDictionary[AE, Check] = weakref.WeakKeyDictionary()
_lock = threading.Lock()
_original: Callable[..., None] | None = None


def register(ae: AE, check: Check) -> None:
    """Call `check` before each C-MOVE that `ae` serves (and install the hook)."""
    install()
    with _lock:
        _checks[ae] = check


def install() -> None:
    """Wrap pynetdicom's C-MOVE SCP (idempotent, process-wide; inert for other AEs)."""
    global _original  # noqa: PLW0603  (one process-wide hook, set once)
    with _lock:
        if _original is not None:
            return
        _original = QueryRetrieveServiceClass._move_scp
        setattr(QueryRetrieveServiceClass, "_move_scp", _move_scp)  # noqa: B010


def _move_scp(service: QueryRetrieveServiceClass, req: C_MOVE, context: Any) -> None:
    original = _original
    assert original is not None
    with _lock:
        check = _checks.get(service.ae)
    refusal: Refusal | None = None
    if check is not None:
        try:
            refusal = check(req)
        except Exception:  # a broken check must not break C-MOVE: pynetdicom decides
            log.exception("C-MOVE destination check failed")
    if refusal is None:
        original(service, req, context)
        return
    rsp = C_MOVE()
    rsp.MessageIDBeingRespondedTo = req.MessageID
    rsp.AffectedSOPClassUID = req.AffectedSOPClassUID
    rsp.Status = refusal.status
    rsp.ErrorComment = refusal.comment[:MAX_COMMENT]  # type: ignore[assignment]  # typed None
    rsp.NumberOfCompletedSuboperations = 0
    rsp.NumberOfFailedSuboperations = 0
    rsp.NumberOfWarningSuboperations = 0
    service.dimse.send_msg(rsp, int(context.context_id))


def probe(
    calling_ae: str,
    called_ae: str,
    address: tuple[str, int],
    timeout: float,
    handlers: Sequence[Any] = (),
) -> str | None:
    """None if `called_ae` at `address` accepts an association from us, else why not.

    An acceptor that takes none of the proposed contexts still answered: it is up.
    `handlers`: pynetdicom event handlers added to the association's (the node's hold on
    it, so that its stop ends a probe of a destination that never answers).
    """
    accepted = threading.Event()
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    try:
        assoc = ae.associate(
            address[0],
            address[1],
            contexts=[build_context(Verification)],
            ae_title=called_ae,
            evt_handlers=[
                contexts.NODELAY,
                (evt.EVT_ACCEPTED, lambda _e: accepted.set()),
                *handlers,
            ],
        )
    except Exception as exc:
        return f"cannot associate: {type(exc).__name__}"
    if assoc.is_established:
        assoc.release()
        return None
    if accepted.is_set():
        return None
    if assoc.is_rejected:
        return "rejected the association"
    return "not reachable"
