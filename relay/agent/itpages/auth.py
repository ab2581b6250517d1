"""Who may log in to the IT pages: one `Authenticator` protocol, two back-ends, the
failed-login limiter that sits in front of both (`LoginLimiter`), and which of the
logins it refuses reach the audit trail (`RefusalSampler`).

- `DirectoryAuthenticator`: bind as the user and require the directory's admin_group
  (relay.agent.directory; the same client that checks device holders);
- `LocalAuthenticator`: the scrypt password file of `it_pages.admins_file`.

Results carry a stable `result` for metrics and audit ("ok", "refused", "not_admin",
"unavailable"); the page itself never says which of refused/not_admin it was.
`still_admin(user, stamp)` answers again for a logged-in admin (True, False, or None:
cannot tell now); `stamp` is the login's `LoginResult.stamp`, so that a local admin's
new password (`relay it-admin passwd`) ends the sessions opened with the old one.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final, Protocol

from relay.agent.directory import Directory, DirectoryError, Refusal, RefusalReason
from relay.agent.itpages.passwords import (
    PasswordFileError,
    dummy_like,
    read_admins,
    verify_password,
)

__all__ = [
    "Attempt",
    "Authenticator",
    "DirectoryAuthenticator",
    "LocalAuthenticator",
    "LoginLimiter",
    "LoginResult",
    "RefusalSampler",
    "Suppressed",
]

#: Concurrent scrypt checks (passwords.MAX_HASH_MEMORY, 128 MiB, each at most): bounds
#: the memory (256 MiB) and the cores a login burst can take; a login waits for a slot
#: within its LOGIN_TIMEOUT (15 s: at ~0.3-0.9 s a check, dozens queued get through).
MAX_CONCURRENT_HASHES: Final = 2


@dataclass(frozen=True)
class LoginResult:
    """`result`: ok | refused | not_admin | unavailable; `detail` for the audit trail."""

    result: str
    user: str
    detail: str = ""
    #: What the credentials were at login (the local admins file: a digest of the
    #: user's entry), handed back to `still_admin`; "" when nothing is to compare.
    stamp: str = ""

    @property
    def ok(self) -> bool:
        return self.result == "ok"


class Authenticator(Protocol):
    """Checks an IT admin's name and password. Never raises for what the user typed."""

    #: What answers, for messages: "the directory", "the password check".
    what: str

    async def authenticate(self, user: str, password: str) -> LoginResult: ...

    async def still_admin(self, user: str, stamp: str = "") -> bool | None:
        """Whether `user` (logged in earlier, `stamp` from that login) is still an IT
        admin with the same credentials; None when that cannot be told now (the
        directory or the file unavailable)."""
        ...


class LocalAuthenticator:
    """The admins file, re-read at each login (a new entry needs no restart). A file
    that is missing, does not read or holds no admin answers "unavailable" (503)."""

    what = "the password check"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_HASHES)

    async def authenticate(self, user: str, password: str) -> LoginResult:
        try:
            admins = read_admins(self.path)
        except PasswordFileError as exc:
            return LoginResult("unavailable", user, str(exc))
        if not admins:
            # No one can log in: not the user's failure (not a failed login for the
            # limiter), as for a missing file, until `relay it-admin passwd` writes one.
            return LoginResult("unavailable", user, f"{self.path} holds no admin")
        await self._slots.acquire()
        # The slot is free again when the thread is, not when the caller stops waiting
        # (a login that timed out): the scrypt checks at once stay bounded.
        dummy = dummy_like(admins.values())  # an unknown name costs what a known one does
        check = asyncio.ensure_future(
            asyncio.to_thread(verify_password, admins.get(user), password, dummy=dummy)
        )
        check.add_done_callback(lambda _: self._slots.release())
        ok = await asyncio.shield(check)
        if ok:
            return LoginResult("ok", user, "local admin password", entry_stamp(admins[user]))
        detail = "wrong password" if user in admins else "no such admin"
        return LoginResult("refused", user, detail)

    async def still_admin(self, user: str, stamp: str = "") -> bool | None:
        """`user` still has a line in the file, the one it logged in with (`stamp`): a
        new password ends the sessions of the old one, as removing the line does
        (None: the file cannot be read now)."""
        try:
            stored = read_admins(self.path).get(user)
        except PasswordFileError:
            return None
        if stored is None:
            return False
        return not stamp or hmac.compare_digest(entry_stamp(stored), stamp)


def entry_stamp(stored: str) -> str:
    """A digest of an admins file entry (its salt changes at every `relay it-admin
    passwd`): what a session remembers of the password it was opened with, without
    keeping the hash itself."""
    return hashlib.sha256(stored.encode()).hexdigest()


class DirectoryAuthenticator:
    """The directory: the user's own bind, then membership of `admin_group`."""

    what = "the directory"

    def __init__(self, directory: Directory) -> None:
        self.directory = directory

    async def authenticate(self, user: str, password: str) -> LoginResult:
        answer = await self.directory.authenticate(user, password, admin=True)
        if not isinstance(answer, Refusal):
            return LoginResult("ok", answer.name, f"directory bind as {answer.dn}")
        if answer.reason is RefusalReason.UNAVAILABLE:
            return LoginResult("unavailable", user, answer.detail)
        if answer.reason is RefusalReason.NOT_IN_GROUP:
            return LoginResult("not_admin", user, answer.detail)
        return LoginResult("refused", user, f"{answer.reason.code}: {answer.detail}")

    async def still_admin(self, user: str, stamp: str = "") -> bool | None:
        """In admin_group, not disabled, not deleted (None: the directory did not
        answer, or answered something not to act on). A password changed in the
        directory is not seen here (`stamp` is unused): disabling the account is."""
        try:
            return await self.directory.is_admin(user)
        except DirectoryError:
            return None


@dataclass(eq=False)
class Attempt:
    """A login attempt counted as failed from before its check (`LoginLimiter.reserve`)."""

    source: str
    user: str  # lower case
    entry: tuple[float, int]  # (time, sequence number): its place in the counts
    released: bool = False


class LoginLimiter:
    """Failed logins per source address and per user name in a sliding window.

    Blocked once either has `max_per_user` / `max_per_source` failures within `window`
    seconds. An attempt counts as failed from the moment it is let through (`reserve`),
    before its password is checked, and is taken back if it did not fail (`release`):
    attempts in flight at the same time thus count against each other, so a burst of
    parallel guesses cannot all pass the check before the first failure is recorded.

    Bounded: at most `max_keys` addresses and names are tracked (the oldest are
    forgotten first), each with at most its limit of timestamps.
    """

    def __init__(
        self,
        *,
        max_per_user: int = 5,
        max_per_source: int = 20,
        window: float = 900.0,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_per_user = max_per_user
        self.max_per_source = max_per_source
        self.window = window
        self.max_keys = max_keys
        self.clock = clock
        self._failures: OrderedDict[tuple[str, str], deque[tuple[float, int]]] = OrderedDict()
        self._sequence = itertools.count()

    def _recent(self, key: tuple[str, str]) -> int:
        times = self._failures.get(key)
        if times is None:
            return 0
        horizon = self.clock() - self.window
        while times and times[0][0] <= horizon:
            times.popleft()
        if not times:
            del self._failures[key]
            return 0
        return len(times)

    def blocking(self, source: str, user: str) -> tuple[str, str] | None:
        """What blocks a login of `user` from `source`: ("source", address) or ("user",
        name in lower case); None if nothing does."""
        if self._recent(("source", source)) >= self.max_per_source:
            return ("source", source)
        name = user.lower()
        if self._recent(("user", name)) >= self.max_per_user:
            return ("user", name)
        return None

    def blocked(self, source: str, user: str) -> bool:
        return self.blocking(source, user) is not None

    def reserve(self, source: str, user: str) -> Attempt | None:
        """None if blocked; else the attempt, already counted as failed.

        Check and count are one step (no await between), so concurrent attempts see
        each other. Call `release()` when the attempt did not fail; an attempt that
        never gets a result (its request cancelled) stays counted, on the safe side.
        """
        if self.blocked(source, user):
            return None
        return Attempt(source, user.lower(), self._add(source, user))

    def release(self, attempt: Attempt) -> None:
        """Take back a reserved attempt that did not fail (a success, a directory that
        did not answer). Twice is once."""
        if attempt.released:
            return
        attempt.released = True
        for key in (("source", attempt.source), ("user", attempt.user)):
            times = self._failures.get(key)
            if times is None:
                continue
            if attempt.entry in times:
                times.remove(attempt.entry)
            if not times:
                del self._failures[key]

    def failed(self, source: str, user: str) -> None:
        self._add(source, user)

    def _add(self, source: str, user: str) -> tuple[float, int]:
        entry = (self.clock(), next(self._sequence))
        for key, limit in (
            (("source", source), self.max_per_source),
            (("user", user.lower()), self.max_per_user),
        ):
            times = self._failures.get(key)
            if times is None:
                while len(self._failures) >= self.max_keys:
                    self._failures.popitem(last=False)
                times = self._failures[key] = deque(maxlen=limit)
            else:
                self._failures.move_to_end(key)
            times.append(entry)
        return entry

    def succeeded(self, user: str) -> None:
        """A good login clears the user's count (not the address's)."""
        self._failures.pop(("user", user.lower()), None)

    def __len__(self) -> int:
        return len(self._failures)


@dataclass
class Suppressed:
    """Refused logins of one block not audited one by one: `count` of them after the one
    audited at `since`; `user` and `peer` of the last."""

    key: tuple[str, str]  # what blocked: ("source", address) or ("user", name)
    since: datetime
    started: float  # the clock's time of the audited refusal
    user: str
    peer: str
    count: int = 0

    def describe(self, window: float) -> str:
        what = (
            f"from address {self.key[1]}" if self.key[0] == "source" else f"for user {self.key[1]}"
        )
        return (
            f"rate_limited: {self.count} more refused logins {what} within "
            f"{window / 60:g} min of the one audited at {self.since.isoformat()}, "
            f"not audited one by one (the last as {self.user!r} from {self.peer})"
        )


class RefusalSampler:
    """Which rate-limited login refusals reach the audit trail: the first of a block,
    then one count.

    A blocked login is refused (429) whatever it brings, at no cost to the sender, so
    auditing each would let anyone write audit events as fast as they send requests,
    and rotation would then drop the oldest files (patient transfers with them). Keyed
    by what blocks (`LoginLimiter.blocking`: the address, else the user name), not by
    the (address, name) pair, which a blocked address could vary at will. The first
    refusal of a key is audited; the ones after it within `window` seconds are counted,
    and `due()` hands the count over once the window has ended. At most `max_keys`
    keys: a new one past that pushes out the oldest, whose count is handed over then.
    """

    def __init__(
        self,
        *,
        window: float,
        max_keys: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self.max_keys = max_keys
        self.clock = clock
        self._blocks: OrderedDict[tuple[str, str], Suppressed] = OrderedDict()  # oldest first

    def refused(
        self, key: tuple[str, str], *, user: str, peer: str, at: datetime
    ) -> tuple[bool, list[Suppressed]]:
        """A refusal of `key`: (audit it?, counts to audit first)."""
        ended = self.due()
        block = self._blocks.get(key)
        if block is not None:
            block.count += 1
            block.user, block.peer = user, peer
            return False, ended
        while len(self._blocks) >= self.max_keys:
            _, oldest = self._blocks.popitem(last=False)
            if oldest.count:
                ended.append(oldest)
        self._blocks[key] = Suppressed(key, at, self.clock(), user, peer)
        return True, ended

    def due(self) -> list[Suppressed]:
        """The counts (above zero) of the blocks whose window has ended, forgotten now."""
        horizon = self.clock() - self.window
        ended: list[Suppressed] = []
        while self._blocks:
            key, block = next(iter(self._blocks.items()))
            if block.started > horizon:
                break
            del self._blocks[key]
            if block.count:
                ended.append(block)
        return ended

    def drain(self) -> list[Suppressed]:
        """Every count above zero, ended or not (at shutdown), forgotten now."""
        blocks = [b for b in self._blocks.values() if b.count]
        self._blocks.clear()
        return blocks

    def __len__(self) -> int:
        return len(self._blocks)
