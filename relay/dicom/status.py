"""DIMSE statuses the relay itself produces, and why.

PS3.4 gives each service a "Failed: Unable to process" range (0xC000-0xCFFF for C-FIND,
C-GET and C-MOVE) and leaves the low byte to the implementation; the relay uses it to tell
the viewer *what* failed, and always adds an Error Comment (0000,0902) with the reason.
Storage has no such range meant for this (0xCxxx there means "cannot understand"), so a
C-STORE that could not reach the PACS gets 0xA700 "Refused: Out of resources", which viewers
treat as retryable.
"""

from __future__ import annotations

from typing import Final

SUCCESS: Final = 0x0000
PENDING: Final = 0xFF00
CANCEL: Final = 0xFE00
WARNING_SUBOPS: Final = 0xB000  # sub-operations complete, one or more failures or warnings

# Query/Retrieve (C-FIND, C-GET, C-MOVE): "Failed: Unable to process" + our low byte.
PACS_UNREACHABLE: Final = 0xC001  # no TCP connection to the PACS within the timeout
PACS_REFUSED: Final = 0xC002  # the PACS rejected the association or the presentation context
PACS_NO_RESPONSE: Final = 0xC003  # the PACS aborted or did not answer within the timeout
LINK_LOST: Final = 0xC004  # the relay tunnel dropped before the operation finished
RELAY_PROTOCOL: Final = 0xC005  # a malformed message between workstation and agent
RELAY_UNSUPPORTED: Final = 0xC006  # the agent cannot do this (e.g. retrieve: move not set up)
BAD_IDENTIFIER: Final = 0xC007  # the identifier could not be decoded
MOVE_DESTINATION_UNREACHABLE: Final = 0xC008  # a known C-MOVE destination does not answer
PACS_GARBLED: Final = 0xC009  # the PACS sent C-FIND matches that could not be decoded
# The agent refused the stream for its limits (LIMIT_EXCEEDED: this device's share of the
# PACS operations, or all of them, are in use): C-FIND's "Refused: Out of resources";
# a retrieve says it as SUBOPS_FAILED (for_retrieve), a store as STORE_OUT_OF_RESOURCES.
# Viewers treat these as "try again later", which is what the agent means.
AGENT_BUSY: Final = 0xA700
NO_COUNTS: Final = 0xA701  # out of resources: unable to calculate number of matches
SUBOPS_FAILED: Final = 0xA702  # out of resources: unable to perform sub-operations
MOVE_DESTINATION_UNKNOWN: Final = 0xA801  # not in the node's destinations (PS3.4 C.4.2)

# Verification has no failure range; 0x0110 "Processing failure" is the general status.
PROCESSING_FAILURE: Final = 0x0110

# Storage
STORE_OUT_OF_RESOURCES: Final = 0xA700
STORE_CANNOT_UNDERSTAND: Final = 0xC000
STORE_DATASET_MISMATCH: Final = 0xA900  # the dataset's SOP Class UID is not the command's
STORE_NOT_AUTHORIZED: Final = 0x0124
# "Cannot understand" with our low byte: the PACS takes the SOP class, but not in the
# upload's transfer syntax (it accepted the class's other contexts). The relay sends
# the viewer's bytes as they are, so the PACS refuses it every time: "out of resources"
# (0xA700) made viewers retry for ever. A viewer that has the instance in another
# syntax can send it so. (Not in for_store's list: it passes unchanged.)
STORE_SYNTAX_NOT_ACCEPTED: Final = 0xC0F2
# The PACS accepted none of the upload's presentation contexts: it will refuse the SOP
# class every time, which "out of resources" (try again later) would not say.
STORE_SOP_CLASS_NOT_SUPPORTED: Final = 0x0122


def for_store(status: int) -> int:
    """Map a relay Q/R failure to its storage equivalent (see module docstring)."""
    if status in (
        PACS_UNREACHABLE,
        PACS_REFUSED,
        PACS_NO_RESPONSE,
        LINK_LOST,
        RELAY_UNSUPPORTED,
        AGENT_BUSY,
    ):
        return STORE_OUT_OF_RESOURCES
    if status in (RELAY_PROTOCOL, BAD_IDENTIFIER):
        return STORE_CANNOT_UNDERSTAND
    return status


# The statuses PS3.4 defines for C-GET (C.4.3.1.4) besides the 0xC000-0xCFFF "unable to
# process" range, with the general ones of PS3.7 C (0x01xx, 0x02xx); C-MOVE adds 0xA801.
_GENERAL: Final = frozenset(range(0x0105, 0x0125)) | frozenset(range(0x0210, 0x0214))
_GET_STATUSES: Final = _GENERAL | frozenset(
    {SUCCESS, CANCEL, PENDING, NO_COUNTS, SUBOPS_FAILED, 0xA900, WARNING_SUBOPS}
    | set(range(0xAA00, 0xAA05))  # Composite Instance Retrieve Without Bulk Data
)
_MOVE_STATUSES: Final = _GET_STATUSES | {MOVE_DESTINATION_UNKNOWN}
UNABLE_TO_PROCESS: Final = 0xC000


def for_retrieve(status: int, *, move: bool = False) -> int:
    """A C-GET's (`move`: C-MOVE's) final status as the service defines it.

    Out of resources is 0xA701/0xA702 there, not 0xA700, which many PACS answer anyway;
    pynetdicom sends a status its tables lack with the last pending response's counts
    (Remaining in a final, the undelivered not counted failed) and no Failed SOP
    Instance UID List. So: another 0xAxxx failure is 0xA702, another warning 0xB000,
    anything else 0xC000 (unable to process)."""
    if status in (_MOVE_STATUSES if move else _GET_STATUSES) or 0xC000 <= status <= 0xCFFF:
        return status
    if 0xA000 <= status <= 0xAFFF:
        return SUBOPS_FAILED
    if 0xB000 <= status <= 0xBFFF or status == 0x0001:
        return WARNING_SUBOPS
    return UNABLE_TO_PROCESS


def for_echo(status: int) -> int:
    return PROCESSING_FAILURE if status != SUCCESS else SUCCESS


def is_final_failure(status: int) -> bool:
    return status not in (SUCCESS, PENDING, 0xFF01, CANCEL) and not (
        0xB000 <= status <= 0xBFFF or status == 0x0001
    )
