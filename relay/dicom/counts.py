"""The sub-operation counts in the PACS's C-GET and C-MOVE responses, checked before
pynetdicom reads them: a count that is not one US value is dropped (and logged once per
association), so the retrieve goes on as if the PACS had given none.

Bound by relay.dicom.pacs_assoc to every association the agent requests (`HANDLERS`);
a module of its own below pacs_assoc and ending, whose frames are on the stack when
pynetdicom calls these handlers (tests/dicom/test_path.py: calls go downwards only).
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any, Final

from pydicom.dataelem import RawDataElement
from pynetdicom import evt

__all__ = ["HANDLERS", "drop_malformed_counts"]

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


def _checked_first(event: Any) -> None:
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


#: What pacs_assoc binds: the check, and its move to the front at the connection's open.
HANDLERS: Final = ((evt.EVT_DIMSE_RECV, drop_malformed_counts), (evt.EVT_CONN_OPEN, _checked_first))
