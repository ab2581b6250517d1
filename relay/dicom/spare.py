"""`SpareAssociation`: at most one association with the PACS, opened for the next request.

Associating is the first thing every query and retrieve waits for: a pynetdicom PACS
takes about 20 ms on loopback to answer a C-GET's A-ASSOCIATE-RQ, some PACSes much more,
and the first image waits for it. Viewers ask in bursts (a query, then its retrieve; the
next study; a prefetch list), so once a request has ended the agent opens one
association for the next and holds it at most `pacs.spare_association` seconds, then
releases it. The PACS sees one extra idle association at most, and none once the
viewers are quiet: a spare is only opened after a request, never on a timer.

Thread-safe: operations take the spare and end on their own threads. Which contexts a
spare proposes is the caller's to say (`refill`); this module opens, holds, times and
counts.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Final

from pynetdicom.association import Association

from relay.dicom.ending import OpenAssociations
from relay.dicom.pacs_assoc import associate
from relay.dicom.pacs_target import PacsTarget

__all__ = ["OUTCOMES", "SpareAssociation"]

log = logging.getLogger(__name__)

# What became of spares, for relay_pacs_spare_associations_total{outcome}: opened, used
# by a request, expired (released unused), stale (the PACS had ended it), unsuited (the
# PACS had not accepted what the request needed), failed (to open).
OUTCOMES: Final = ("opened", "used", "expired", "stale", "unsuited", "failed")


class SpareAssociation:
    """One slot for an idle association, refilled after requests, released when idle."""

    def __init__(
        self,
        seconds: float,
        clock: Callable[[], float] = time.monotonic,
        associations: OpenAssociations | None = None,
    ) -> None:
        """`seconds`: how long a spare may stay idle (0: never open one); `associations`:
        the owner's, which ends the spare (one opening too) at its stop."""
        self.seconds = seconds
        self.associations = associations
        self._clock = clock
        self._lock = threading.Lock()
        self._assoc: Association | None = None
        self._deadline = 0.0
        self._timer: threading.Timer | None = None
        self._opening = False
        self._closed = False
        self._counts: Counter[str] = Counter()

    @property
    def enabled(self) -> bool:
        return self.seconds > 0

    def counts(self) -> dict[str, int]:
        """Spares by outcome (OUTCOMES), since the agent started."""
        with self._lock:
            return {outcome: self._counts[outcome] for outcome in OUTCOMES}

    def take(self, wanted: str) -> Association | None:
        """The spare, if it is still established, young enough and accepted the
        presentation context `wanted` (an abstract syntax); else None. Whoever takes it
        owns it (and releases it)."""
        with self._lock:
            assoc, self._assoc = self._assoc, None
            self._cancel_timer()
            if assoc is None:
                return None
            if not assoc.is_established:
                outcome = "stale"
            elif self._clock() >= self._deadline:
                outcome = "expired"
            elif not any(str(cx.abstract_syntax) == wanted for cx in assoc.accepted_contexts):
                outcome = "unsuited"  # the next request refills with what it needs
            else:
                outcome = "used"
            self._counts[outcome] += 1
        if outcome == "used":
            return assoc
        _release(assoc)
        return None

    def vacant(self) -> bool:
        """Whether `refill` would open one now (ask before building its contexts)."""
        with self._lock:
            return self._vacant()

    def refill(self, pacs: PacsTarget, cxs: Sequence[Any], ext_neg: Sequence[Any] = ()) -> None:
        """Open a spare proposing `cxs` (and `ext_neg`) on a thread of its own, unless one
        is held or opening."""
        with self._lock:
            if not self._vacant():
                return
            self._opening = True
        threading.Thread(
            target=self._open, args=(pacs, cxs, ext_neg), name="pacs-spare", daemon=True
        ).start()

    def close(self) -> None:
        """Release the spare (the agent is stopping) and open no more."""
        with self._lock:
            self._closed = True
            assoc, self._assoc = self._assoc, None
            self._cancel_timer()
        if assoc is not None:
            _release(assoc)

    # -- internals ------------------------------------------------------------------

    def _open(self, pacs: PacsTarget, cxs: Sequence[Any], ext_neg: Sequence[Any]) -> None:
        assoc: Association | None
        try:
            assoc = associate(pacs, cxs, ext_neg=ext_neg, keep=(self.associations,))
        except Exception as exc:  # the request that follows reports; a spare never crashes
            log.debug("spare association failed: %s", type(exc).__name__)
            assoc = None
        with self._lock:
            self._opening = False
            if assoc is None or not assoc.is_established:
                self._counts["failed"] += 1
                keep = False
            elif self._closed or self._assoc is not None:
                keep = False
            else:
                self._counts["opened"] += 1
                self._assoc = assoc
                self._deadline = self._clock() + self.seconds
                self._timer = threading.Timer(self.seconds, self._expire, args=(assoc,))
                self._timer.daemon = True
                self._timer.start()
                keep = True
        if not keep and assoc is not None and assoc.is_established:
            _release(assoc)

    def _vacant(self) -> bool:
        return self.enabled and not self._closed and not self._opening and self._assoc is None

    def _expire(self, assoc: Association) -> None:
        with self._lock:
            if self._assoc is not assoc:
                return  # taken meanwhile
            self._assoc = None
            self._timer = None
            self._counts["expired"] += 1
        _release(assoc)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _release(assoc: Association) -> None:
    with contextlib.suppress(Exception):  # the PACS may be ending it too
        if assoc.is_established:
            assoc.release()
