"""One bounded C-ECHO to the PACS, for the agent's readiness (blocking: run it in a thread)."""

from __future__ import annotations

from typing import Any

from pynetdicom import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from relay.dicom.pacs_assoc import associate
from relay.dicom.pacs_target import PacsTarget

__all__ = ["echo_pacs"]


def echo_pacs(pacs: PacsTarget, timeout: float) -> tuple[bool, str]:
    """(True, why) if the PACS accepts an association and answers C-ECHO with Success.

    Every wait (connect, association, the answer) is bounded by `timeout`; the reason is
    one short line without patient data.
    """
    where = f"PACS {pacs.ae_title}@{pacs.host}:{pacs.port}"
    try:
        assoc: Any = associate(pacs, [build_context(Verification)], timeout=timeout)
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
