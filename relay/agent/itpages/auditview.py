"""The audit trail as the IT pages show it: filtered, newest first, paginated, bounded.

It reads the agent's JSON-lines files (audit.jsonl, then .1, .2 ... the oldest) from the
newest line backwards and stops after MAX_SCAN lines, whatever the filters, so a page
costs at most that much work however large the trail (the rotation bounds it anyway).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

__all__ = ["MAX_SCAN", "PAGE_SIZE", "AuditFilter", "AuditPage", "query_audit"]

PAGE_SIZE: Final = 50
MAX_PAGE: Final = 200
MAX_SCAN: Final = 200_000
MAX_FILTER_CHARS: Final = 200
KINDS: Final = (
    "enrollment",
    "renewal",
    "token_created",
    "revocation",
    "auth_refused",
    "it_login",
    "it_logout",
    "query",
    "transfer_begin",
    "transfer_end",
)


@dataclass(frozen=True)
class AuditFilter:
    device: str = ""  # substring of a participant or object id/name
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


def _files(path: Path) -> list[Path]:
    numbered = sorted(
        (p for p in path.parent.glob(f"{path.name}.*") if p.suffix[1:].isdigit()),
        key=lambda p: int(p.suffix[1:]),
    )
    return [path, *numbered]


def _lines_newest_first(path: Path) -> Iterator[str]:
    for file in _files(path):
        try:
            text = file.read_text("utf-8", errors="replace")
        except OSError:
            continue
        # "\n" only: str.splitlines() also splits on U+2028, U+2029, U+0085..., which
        # older files may hold raw inside an event's text.
        yield from (line for line in reversed(text.split("\n")) if line)


def _when(event: dict[str, Any]) -> datetime | None:
    ident = event.get("EventIdentification")
    raw = ident.get("EventDateTime") if isinstance(ident, dict) else None
    if not isinstance(raw, str):
        return None
    try:
        return datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return None


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
        at = _when(event)
        if at is None or (f.since and at < f.since) or (f.until and at >= f.until):
            return False
    if f.device and not any(f.device in i for i in _ids(event)):
        return False
    if f.user:
        users = [str(event.get("user", "")), *_ids(event)]
        if not any(u == f.user or u.endswith(":" + f.user) for u in users):
            return False
    return True


def query_audit(path: Path, f: AuditFilter, *, page_size: int = PAGE_SIZE) -> AuditPage:
    """Page `f.page` (from 1) of the events matching `f`, newest first."""
    page = max(1, min(f.page, MAX_PAGE))
    skip = (page - 1) * page_size
    found: list[dict[str, Any]] = []
    scanned = 0
    for line in _lines_newest_first(path):
        if scanned >= MAX_SCAN:
            return AuditPage(found[:page_size], page, False, scanned, True)
        scanned += 1
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(event, dict) or not matches(event, f):
            continue
        if skip:
            skip -= 1
            continue
        found.append(event)
        if len(found) > page_size:
            return AuditPage(found[:page_size], page, True, scanned, False)
    return AuditPage(found, page, False, scanned, False)
