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
STORE_NOT_AUTHORIZED: Final = 0x0124


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


def for_retrieve(status: int) -> int:
    """C-GET and C-MOVE have no plain 0xA700: out of resources is 0xA701/0xA702 there."""
    return SUBOPS_FAILED if status == AGENT_BUSY else status


def for_echo(status: int) -> int:
    return PROCESSING_FAILURE if status != SUCCESS else SUCCESS


def is_final_failure(status: int) -> bool:
    return status not in (SUCCESS, PENDING, 0xFF01, CANCEL) and not (
        0xB000 <= status <= 0xBFFF or status == 0x0001
    )
