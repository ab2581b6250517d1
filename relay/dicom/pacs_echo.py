"""One bounded C-ECHO to the PACS, for the agent's readiness (blocking: run it in a thread)."""

from __future__ import annotations

from typing import Any

from pynetdicom import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from relay.dicom.ending import OpenAssociations
from relay.dicom.pacs_assoc import associate
from relay.dicom.pacs_target import PacsTarget

__all__ = ["echo_pacs", "end_echoes"]

# The readiness C-ECHOs' associations, from their creation (before the TCP connect) to
# their close: the agent's stop ends them (`end_echoes`), as pynetdicom's threads of one
# still connecting or waiting, and the worker thread that waits for them, would hold the
# process's exit up to ECHO_TIMEOUT per wait. Holds at most the one echo the readiness
# check runs at a time (`relay.agent.pacs_check`); never closed: an echo after a stop is
# bounded by its timeout alone.
_ECHOES: OpenAssociations = OpenAssociations()


def end_echoes() -> int:
    """End the readiness C-ECHOs' associations open or being opened (blocking, bounded
    like `ending.end_all`); how many there were."""
    return _ECHOES.end_held()


def echo_pacs(pacs: PacsTarget, timeout: float) -> tuple[bool, str]:
    """(True, why) if the PACS accepts an association and answers C-ECHO with Success.

    Every wait (connect, association, the answer) is bounded by `timeout`; the reason is
    one short line without patient data.
    """
    where = f"PACS {pacs.ae_title}@{pacs.host}:{pacs.port}"
    try:
        assoc: Any = associate(
            pacs, [build_context(Verification)], timeout=timeout, keep=(_ECHOES,)
        )
    except Exception as exc:  # pynetdicom raises little, but a readiness probe must not
        return False, f"{where} unreachable ({type(exc).__name__})"
    if not assoc.is_established:
        verdict = (
            "rejected the association"
            if assoc.is_rejected
            else "aborted the association"
            if assoc.is_aborted and getattr(assoc.dul.socket, "_is_connected", False)
            else "is unreachable or did not answer"
        )
        return False, f"{where} {verdict}"
    try:
        status = assoc.send_c_echo()
        code = int(status.Status) if status else None
    finally:
        if assoc.is_established:
            assoc.release()
        else:
            assoc.abort()
    if code != 0x0000:
        answer = "no answer" if code is None else f"status 0x{code:04X}"
        return False, f"{where} C-ECHO failed ({answer})"
    return True, f"{where} answers C-ECHO"
