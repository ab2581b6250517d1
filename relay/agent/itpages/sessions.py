"""Server-side sessions of the IT pages: random ids, a CSRF token each, idle and
absolute expiry, a bounded count.

The cookie carries only the id (256 random bits); everything else stays here, in memory:
an agent restart logs everyone out, which is fine for a handful of IT staff.

Whether the session's user is still an IT admin is checked again once `recheck` seconds
(RECHECK_INTERVAL) have passed since the last check (`due`, `checked`): the app asks the
directory or the admins file then, and ends the session of someone who is no longer one.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

__all__ = ["RECHECK_INTERVAL", "Session", "SessionStore"]

#: Seconds after which a session's user is checked again (still an IT admin?).
RECHECK_INTERVAL: Final = 60.0


@dataclass
class Session:
    id: str
    user: str
    created: float
    last_used: float
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    checked: float = 0.0  # when the user was last found to be an IT admin (or tried)
    stamp: str = ""  # the login's LoginResult.stamp, for the re-check


class SessionStore:
    """At most `max_sessions`; a new one past that pushes out the least recently used."""

    def __init__(
        self,
        *,
        idle: float,
        max_age: float,
        max_sessions: int,
        recheck: float = RECHECK_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.idle = idle
        self.max_age = max_age
        self.max_sessions = max_sessions
        self.recheck = recheck
        self.clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # LRU order

    def create(self, user: str, *, stamp: str = "") -> Session:
        now = self.clock()
        self._prune(now)
        while len(self._sessions) >= self.max_sessions:
            self._sessions.popitem(last=False)
        session = Session(secrets.token_urlsafe(32), user, now, now, checked=now, stamp=stamp)
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The live session of `session_id` (its idle clock restarted), or None."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self.clock()
        if self._expired(session, now):
            del self._sessions[session_id]
            return None
        session.last_used = now
        self._sessions.move_to_end(session_id)
        return session

    def due(self, session: Session) -> bool:
        """Whether `session`'s user should be checked again now; if so, the check is
        taken as started (a request meanwhile does not start another)."""
        now = self.clock()
        if now - session.checked < self.recheck:
            return False
        session.checked = now
        return True

    def drop(self, session_id: str) -> Session | None:
        return self._sessions.pop(session_id, None)

    def _expired(self, session: Session, now: float) -> bool:
        return now - session.last_used >= self.idle or now - session.created >= self.max_age

    def _prune(self, now: float) -> None:
        for sid in [s.id for s in self._sessions.values() if self._expired(s, now)]:
            del self._sessions[sid]

    def __len__(self) -> int:
        return len(self._sessions)
