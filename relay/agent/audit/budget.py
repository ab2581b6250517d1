"""How many refusals each source may write to the security set one by one.

The security set (`audit.jsonl`) rotates at its size like any set, so whoever can make
the agent write security events fast enough could rotate the earlier ones (an attack's
start, an enrollment, a revocation) away. Successes need a credential (a code, a
password, a certificate due for renewal, an IT session) and are written one by one;
refusals cost the sender nothing, and every sender may be hostile (the gateway too: it
states the peer address of an enrollment, so such an "address" may be made up for each
request). Who can have the agent write which refusal:

| kind          | refused                              | source (the key here)           |
|---------------|--------------------------------------|---------------------------------|
| enrollment    | anyone at the enrollment door, any   | the peer address (the gateway's |
|               | rate (bad code, wrong password, CSR) | word), else the claimed device  |
| renewal       | an enrolled device (not due, busy)   | the device (its inner TLS)      |
| it_login      | a browser at the IT pages' login     | its address                     |
|               | (after `LoginLimiter`'s 20 a 15 min  |                                 |
|               | per address, one summary per block)  |                                 |
| auth_refused  | links a gateway refused, reported    | not here: LIMITED_UPSTREAM      |
| token_created,| IT admins only (CLI, IT pages); not  | the requestor                   |
| revocation,   | refusals but for a failed push       |                                 |
| it_logout     |                                      |                                 |

A major failure (a code burnt by its last wrong password, a mass revocation refused)
happens once and is written one by one, like a success.

Each (kind, source) has a token bucket of SOURCE_BURST refusals written in full,
refilled one per SOURCE_REFILL, and each kind one of KIND_BURST, refilled one per
KIND_REFILL, so that sources made up by the thousand still share one bound. A refusal
that finds either empty is counted, never dropped: into its source's aggregate (at most
MAX_AGGREGATES sources a kind at a time), else into its kind's aggregate of "other
sources" (naming the first few); an aggregate is written as one record
AGGREGATE_INTERVAL after its first refusal (by a timer, or the next event), or at
close: the last refusal's event, its worst outcome, and `aggregate` = {count, first,
last, source, sources}. An event that stands for several refusals
(`AuditEvent.refusals`: the IT login limiter's summary) counts as that many.

A sustained flood of one kind, from any number of sources, thus writes about KIND_BURST,
then at most 720 refusals a day in full and (MAX_AGGREGATES + 1) x 24 = 216 aggregates:
~0.7 MB a day a kind, ~2 MB for the three; the default security set (10 MiB x 11)
holds about two months of it.

The buckets live in memory, and a new process used to start with every bucket full: an
agent that restarts (a crash, systemd's `Restart=on-failure` 2 s later) wrote KIND_BURST
more refusals of each kind in full each time, so a sender able to crash it in a loop
would have had the budget's bound times the restarts. The file is the memory instead:
before its first refusal (the agent: as it starts, off its loop), a process `recall`s
the refusals written in full to the security set in the last RECALL_WINDOW (read newest
first, at most MAX_RECALL_LINES lines), and each bucket they name starts empty at the
window's start and takes one token per refusal, in time order. That can only be less
than the bucket truly held (it held at least nothing then), and a bucket with no refusal
in the window is full, as it truly is by then. A crash still loses the aggregates not
yet written (counted refusals of at most AGGREGATE_INTERVAL, at most MAX_AGGREGATES + 1
a kind): a clean stop writes them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Final

from relay.agent.audit.events import AuditEvent, Outcome, host_of, iso_time

__all__ = [
    "AGGREGATE_INTERVAL",
    "KIND_BURST",
    "KIND_REFILL",
    "LIMITED_UPSTREAM",
    "MAX_AGGREGATES",
    "MAX_RECALL_LINES",
    "MAX_SOURCES",
    "OTHER_SOURCES",
    "RECALL_WINDOW",
    "SOURCE_BURST",
    "SOURCE_REFILL",
    "RefusalBudget",
    "budgeted",
    "source_of",
    "written_refusal",
]

SOURCE_BURST: Final = 10
"""Refusals of one kind from one source written in full at first: an honest user's few
mistakes, and the start of an attack, each with all its detail."""
SOURCE_REFILL: Final = timedelta(minutes=10)
"""Then one more in full per this long (the pace renewal refusals were audited at)."""
KIND_BURST: Final = 100
"""Refusals of one kind written in full at first, all sources together: sources made up
for each request (a compromised gateway's peer addresses) share it."""
KIND_REFILL: Final = timedelta(minutes=2)
"""Then one more of the kind in full per this long: 720 a day."""
AGGREGATE_INTERVAL: Final = timedelta(hours=1)
"""An aggregate is written this long after its first refusal (its record says the first
and last time, so the hour bounds nothing but how late it is written)."""
MAX_AGGREGATES: Final = 8
"""Sources of one kind aggregated one by one at a time; refusals from more go to the
kind's aggregate of OTHER_SOURCES (which names the first MAX_NAMED_SOURCES of them)."""
MAX_NAMED_SOURCES: Final = 8
MAX_SOURCES: Final = 10_000
"""Source buckets remembered, the one used longest ago forgotten first (its source then
starts a new burst; the kind's bucket still holds)."""
RECALL_WINDOW: Final = KIND_BURST * KIND_REFILL
"""How far back a new process reads the refusals written in full (200 min): an empty kind
bucket is full again after this long, a source's (SOURCE_BURST x SOURCE_REFILL, 100 min)
sooner."""
MAX_RECALL_LINES: Final = 20_000
"""Lines of the security set read back at most (a few MB at its usual ~1 KB a line): the
window holds ~1,000 budgeted lines under a flood of all three kinds, besides successes
and gateways' reports. Past it, the window starts at the oldest line read."""
OTHER_SOURCES: Final = "*"
LIMITED_UPSTREAM: Final = frozenset({"auth_refused"})
"""Kinds limited where they arrive, by their true source: a gateway's refusal reports
(relay.agent.linktrust: per gateway the agent dials, a burst of 20, then one a minute,
the rest counted into the next), which no gateway can make look like another's."""


UNBUDGETED_OUTCOMES: Final = frozenset({Outcome.SUCCESS, Outcome.MAJOR_FAILURE})
"""Written one by one whoever sends them: successes need a credential, and a major
failure is something that happens once, not a refusal a sender repeats at will (the
wrong password that burns a code, a directory re-check's mass revocation refused)."""


def budgeted(event: AuditEvent) -> bool:
    """Whether `event` (bound for the security set) goes through the budget: a refusal
    (minor or serious failure) of a kind not limited upstream."""
    return event.outcome not in UNBUDGETED_OUTCOMES and event.kind not in LIMITED_UPSTREAM


def source_of(event: AuditEvent) -> str:
    """Where a refusal came from: its requestor's address (without a port), else its
    requestor's ID; "unknown" without a requestor."""
    for p in event.participants:
        if p.requestor:
            return host_of(p.address) if p.address else p.user_id or "unknown"
    return "unknown"


def written_refusal(event: Mapping[str, object]) -> tuple[str, str] | None:
    """(kind, source) of a line of the security set that took a token when it was
    written (a refusal written in full, not an aggregate), else None: what `recall`
    charges. The source is read as `source_of` made it (the address is stored as
    host_of gave it)."""
    ident = event.get("EventIdentification")
    outcome = ident.get("EventOutcomeIndicator") if isinstance(ident, dict) else None
    kind = event.get("kind")
    if not isinstance(kind, str) or not isinstance(outcome, int) or "aggregate" in event:
        return None
    if outcome in UNBUDGETED_OUTCOMES or kind in LIMITED_UPSTREAM:
        return None
    participants = event.get("ActiveParticipant")
    for p in participants if isinstance(participants, list) else []:
        if isinstance(p, dict) and p.get("UserIsRequestor"):
            return kind, str(p.get("NetworkAccessPointID") or p.get("UserID") or "unknown")
    return kind, "unknown"


@dataclass
class _Bucket:
    tokens: float
    at: datetime

    def take(self, now: datetime, burst: int, refill: timedelta) -> bool:
        """Refill for the time since the last call (none if the clock went back), then
        take one token if there is one."""
        elapsed = max(timedelta(0), now - self.at)
        self.tokens = min(float(burst), self.tokens + elapsed / refill)
        self.at = max(self.at, now)
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def charge(self, now: datetime, burst: int, refill: timedelta) -> None:
        """A token the past took (`recall`): refill, then one less, never below none.
        Charged from a bucket that held no more than the past's, it holds no more after
        (the past's had a token to take), so a recalled bucket is never too generous."""
        if not self.take(now, burst, refill):
            self.tokens = 0.0  # less than one, less one, is none


@dataclass
class _Aggregate:
    """Refusals of one kind from one source (or OTHER_SOURCES) counted, not written."""

    source: str
    first: datetime
    last_event: AuditEvent
    count: int = 0
    outcome: Outcome = Outcome.SUCCESS
    sources: list[str] = field(default_factory=list)  # OTHER_SOURCES: the first few named

    @property
    def due(self) -> datetime:
        return self.first + AGGREGATE_INTERVAL

    def add(self, event: AuditEvent, source: str) -> None:
        self.count += max(1, event.refusals)
        self.last_event = event
        self.outcome = max(self.outcome, event.outcome)
        if source not in self.sources and len(self.sources) < MAX_NAMED_SOURCES:
            self.sources.append(source)

    def record(self, at: datetime) -> AuditEvent:
        """The one event that stands for them all, at `at`."""
        last = self.last_event
        where = (
            f"{len(self.sources)}{'+' if len(self.sources) >= MAX_NAMED_SOURCES else ''}"
            " other sources"
            if self.source == OTHER_SOURCES
            else self.source
        )
        return replace(
            last,
            at=at,
            outcome=self.outcome,
            description=(
                f"aggregated: {self.count} {last.kind} refusals from {where} between "
                f"{iso_time(self.first)} and {iso_time(last.at)}, over the audit budget, "
                f"not written one by one (the last: {last.description})"
            ),
            refusals=self.count,
            aggregate={
                "count": self.count,
                "first": iso_time(self.first),
                "last": iso_time(last.at),
                "source": self.source,
                "sources": list(self.sources),
            },
        )


class RefusalBudget:
    """Decides, for each refusal bound for the security set, whether it is written now
    or counted into an aggregate written later (`due`, `drain`). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sources: OrderedDict[tuple[str, str], _Bucket] = OrderedDict()
        self._kinds: dict[str, _Bucket] = {}
        self._aggregates: dict[tuple[str, str], _Aggregate] = {}

    def admit(self, event: AuditEvent) -> datetime | None:
        """Either take a token for `event` (None: write it now) or count it into an
        aggregate: then the time that aggregate is due, to have `due()` called then."""
        source = source_of(event)
        key = (event.kind, source)
        with self._lock:
            if self._take(key, event.at):
                return None
            aggregate = self._aggregates.get(key) or self._open(key, event)
            aggregate.add(event, source)
            return aggregate.due

    def recall(self, written: Iterable[tuple[str, str, datetime]], since: datetime) -> None:
        """Charge the buckets with refusals an earlier process wrote in full, (kind,
        source, time) oldest first, all since `since`: each bucket they name starts
        empty at `since` (see the module docstring)."""
        with self._lock:
            for kind, source, at in written:
                key = (kind, source)
                bucket = self._sources.pop(key, None) or _Bucket(0.0, since)
                self._sources[key] = bucket
                while len(self._sources) > MAX_SOURCES:
                    self._sources.popitem(last=False)
                bucket.charge(at, SOURCE_BURST, SOURCE_REFILL)
                kind_bucket = self._kinds.setdefault(kind, _Bucket(0.0, since))
                kind_bucket.charge(at, KIND_BURST, KIND_REFILL)

    def _take(self, key: tuple[str, str], now: datetime) -> bool:
        """A token from both the source's and the kind's buckets, or from neither."""
        source = self._sources.pop(key, None) or _Bucket(float(SOURCE_BURST), now)
        self._sources[key] = source  # most recently used last
        while len(self._sources) > MAX_SOURCES:
            self._sources.popitem(last=False)
        kind = self._kinds.setdefault(key[0], _Bucket(float(KIND_BURST), now))
        if not source.take(now, SOURCE_BURST, SOURCE_REFILL):
            return False
        if kind.take(now, KIND_BURST, KIND_REFILL):
            return True
        source.tokens += 1  # not written: the source keeps its token
        return False

    def _open(self, key: tuple[str, str], event: AuditEvent) -> _Aggregate:
        """The aggregate `event` goes into: its source's, or its kind's OTHER_SOURCES one
        once MAX_AGGREGATES sources of the kind are aggregated."""
        kind, _ = key
        open_here = sum(1 for k, _ in self._aggregates if k == kind)
        if open_here >= MAX_AGGREGATES:
            key = (kind, OTHER_SOURCES)
            existing = self._aggregates.get(key)
            if existing is not None:
                return existing
        aggregate = _Aggregate(source=key[1], first=event.at, last_event=event)
        self._aggregates[key] = aggregate
        return aggregate

    def due(self, now: datetime) -> list[AuditEvent]:
        """The records of the aggregates due at `now`, forgotten here: write them."""
        with self._lock:
            ready = sorted((k for k, a in self._aggregates.items() if a.due <= now), key=self._due)
            records = []
            for key in ready:
                aggregate = self._aggregates.pop(key)
                records.append(aggregate.record(aggregate.due))
            return records

    def drain(self) -> list[AuditEvent]:
        """Every aggregate's record now, due or not (at close), each at its last refusal."""
        with self._lock:
            aggregates, self._aggregates = list(self._aggregates.values()), {}
        return [a.record(a.last_event.at) for a in aggregates]

    def _due(self, key: tuple[str, str]) -> datetime:
        return self._aggregates[key].due

    @property
    def pending(self) -> int:
        """Aggregates not written yet."""
        return len(self._aggregates)
