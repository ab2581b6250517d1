"""The audit trail as the IT pages show it: filtered, newest first, paginated, bounded.

It reads the agent's sets of JSON-lines files (the security set audit.jsonl, .1, .2 ...,
and each device's set in audit-devices/) from the newest line backwards, merged in time
order, and stops after MAX_SCAN lines, whatever the filters. The sets are listed by one
scandir; a set is opened only when the merge reaches its last write, and at most
`files.MAX_OPEN_SETS` are read at once, so a page costs at most MAX_SCAN lines and that
many sets' buffers however large the trail and however many devices. A filter on a
kind reads only the sets that kind is written to: one device's flood of queries does
not push the security events beyond the scan bound. A device filter that names one
device (its SPIFFE ID, or the name of a device the registry knows: `device_id`) reads
only that device's set and the security set, and matches events naming that device by
its ID or name exactly: another device's flood is not in the way. Any other device
filter is a substring of a participant's or object's ID or name, over every set.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from relay.agent.audit.files import (
    SetListing,
    device_dir,
    device_set_name,
    event_time,
    listing_of,
    merged_events,
    trail_sets,
)
from relay.agent.audit.trail import DEVICE_KINDS, EVENT_KINDS
from relay.trust.identity import IdentityError, parse_spiffe_uri

__all__ = [
    "MAX_SCAN",
    "PAGE_SIZE",
    "AuditFilter",
    "AuditPage",
    "device_named",
    "query_audit",
]

PAGE_SIZE: Final = 50
MAX_PAGE: Final = 200
MAX_SCAN: Final = 200_000
MAX_FILTER_CHARS: Final = 200
KINDS: Final = EVENT_KINDS  # the filter offers every kind the trail writes


@dataclass(frozen=True)
class AuditFilter:
    device: str = ""  # substring of a participant or object id/name
    #: The one device `device` names (its SPIFFE ID), if it names one: see device_named.
    device_id: str = ""
    user: str = ""  # the directory user of the event, or a participant's id/name
    kind: str = ""
    since: datetime | None = None
    until: datetime | None = None
    page: int = 1


@dataclass(frozen=True)
class AuditPage:
    events: list[dict[str, Any]]
    page: int
    has_more: bool
    scanned: int
    truncated: bool  # MAX_SCAN lines read before the page was complete


def device_named(text: str) -> str:
    """The device ID `text` is (spiffe://TD/device/SITE/NAME), else ""."""
    try:
        identity = parse_spiffe_uri(text)
    except IdentityError:
        return ""
    return identity.uri if identity.role == "device" else ""


def _sets(path: Path, f: AuditFilter) -> list[SetListing]:
    """The sets events of `f.kind` (and of device `f.device_id`) are in: a security kind
    only in the security set; a DICOM kind in the device sets (that device's only) and
    the security set (where every event went before the trail was split)."""
    devices = not f.kind or f.kind in DEVICE_KINDS
    if f.device_id:
        own = device_dir(path) / device_set_name(f.device_id)
        return [listing_of(path), listing_of(own)] if devices else [listing_of(path)]
    return trail_sets(path, devices=devices)


def _ids(event: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for p in event.get("ActiveParticipant") or []:
        if isinstance(p, dict):
            out += [str(p.get("UserID", "")), str(p.get("UserName", ""))]
    for o in event.get("ParticipantObjectIdentification") or []:
        if isinstance(o, dict):
            out += [str(o.get("ParticipantObjectID", "")), str(o.get("ParticipantObjectName", ""))]
    return out


def matches(event: dict[str, Any], f: AuditFilter) -> bool:
    if f.kind and event.get("kind") != f.kind:
        return False
    if f.since is not None or f.until is not None:
        at = event_time(event)
        if at is None or (f.since and at < f.since) or (f.until and at >= f.until):
            return False
    if f.device_id:
        # The device's ID, or its name (an enrollment code names the device by it).
        if not {f.device_id, f.device_id.rsplit("/", 1)[-1]} & set(_ids(event)):
            return False
    elif f.device and not any(f.device in i for i in _ids(event)):
        return False
    if f.user:
        users = [str(event.get("user", "")), *_ids(event)]
        if not any(u == f.user or u.endswith(":" + f.user) for u in users):
            return False
    return True


def query_audit(path: Path, f: AuditFilter, *, page_size: int = PAGE_SIZE) -> AuditPage:
    """Page `f.page` (from 1) of the events matching `f`, newest first."""
    if f.device and not f.device_id:
        f = replace(f, device_id=device_named(f.device))
    page = max(1, min(f.page, MAX_PAGE))
    skip = (page - 1) * page_size
    found: list[dict[str, Any]] = []
    scanned = 0
    for event in merged_events(_sets(path, f), newest_first=True):
        if scanned >= MAX_SCAN:
            return AuditPage(found[:page_size], page, False, scanned, True)
        scanned += 1
        if event is None or not matches(event, f):
            continue
        if skip:
            skip -= 1
            continue
        found.append(event)
        if len(found) > page_size:
            return AuditPage(found[:page_size], page, True, scanned, False)
    return AuditPage(found, page, False, scanned, False)
