"""Who may log in to the IT pages: one `Authenticator` protocol, two back-ends, and the
failed-login limiter that sits in front of both.

- `DirectoryAuthenticator`: bind as the user and require the directory's admin_group
  (relay.agent.directory; the same client that checks device holders);
- `LocalAuthenticator`: the scrypt password file of `it_pages.admins_file`.

Results carry a stable `result` for metrics and audit ("ok", "refused", "not_admin",
"unavailable"); the page itself never says which of refused/not_admin it was.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from relay.agent.directory import Directory, Refusal, RefusalReason
from relay.agent.itpages.passwords import PasswordFileError, read_admins, verify_password

__all__ = [
    "Authenticator",
    "DirectoryAuthenticator",
    "LocalAuthenticator",
    "LoginLimiter",
    "LoginResult",
]

#: Concurrent scrypt checks (32 MiB each): bounds the memory a login burst can take.
MAX_CONCURRENT_HASHES: Final = 2


@dataclass(frozen=True)
class LoginResult:
    """`result`: ok | refused | not_admin | unavailable; `detail` for the audit trail."""

    result: str
    user: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.result == "ok"


class Authenticator(Protocol):
    """Checks an IT admin's name and password. Never raises for what the user typed."""

    async def authenticate(self, user: str, password: str) -> LoginResult: ...


class LocalAuthenticator:
    """The admins file, re-read at each login (a new entry needs no restart)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_HASHES)

    async def authenticate(self, user: str, password: str) -> LoginResult:
        try:
            admins = read_admins(self.path)
        except PasswordFileError as exc:
            return LoginResult("unavailable", user, str(exc))
        async with self._slots:
            ok = await asyncio.to_thread(verify_password, admins.get(user), password)
        if ok:
            return LoginResult("ok", user, "local admin password")
        detail = "wrong password" if user in admins else "no such admin"
        return LoginResult("refused", user, detail)


class DirectoryAuthenticator:
    """The directory: the user's own bind, then membership of `admin_group`."""

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


class LoginLimiter:
    """Failed logins per source address and per user name in a sliding window.

    Blocked once either has `max_per_user` / `max_per_source` failures within `window`
    seconds. Bounded: at most `max_keys` addresses and names are tracked (the oldest are
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
        self._failures: OrderedDict[tuple[str, str], deque[float]] = OrderedDict()

    def _recent(self, key: tuple[str, str]) -> int:
        times = self._failures.get(key)
        if times is None:
            return 0
        horizon = self.clock() - self.window
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._failures[key]
            return 0
        return len(times)

    def blocked(self, source: str, user: str) -> bool:
        return (
            self._recent(("source", source)) >= self.max_per_source
            or self._recent(("user", user.lower())) >= self.max_per_user
        )

    def failed(self, source: str, user: str) -> None:
        now = self.clock()
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
            times.append(now)

    def succeeded(self, user: str) -> None:
        """A good login clears the user's count (not the address's)."""
        self._failures.pop(("user", user.lower()), None)

    def __len__(self) -> int:
        return len(self._failures)
