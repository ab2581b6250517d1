"""The periodic re-check: devices of users who left lose their certificates' worth.

Every `recheck_interval`, each directory user holding devices (not revoked) is looked up.
A user disabled, deleted or out of the group gets all their devices revoked through the
registry (the running agent pushes the revocations to every gateway and closes the
devices' live sessions), each revocation audited with the reason.

What it never does:

- act on a directory it cannot reach, or that answers something odd (the user base or
  the group gone, a user twice): the whole check changes nothing, `relay_directory_up`
  goes to 0 and one line is logged (one per failed check). The first failed lookup
  ends the check at once: no lookup starts after it, the ones under way are dropped
  (and it never holds the directory's last connection: see client.py);
- run longer than `RECHECK_DEADLINE`: ldap3's timeout bounds each read, so a directory
  that trickles bytes would hold the check (and its connections) for ever. At the
  deadline the lookups are given up, their connections cut, and the check is
  "unavailable": nothing is revoked (no revocation starts before every lookup is in,
  and a lookup that did not finish says nothing about the user);
- revoke more users' devices in one check than `max_revocations_per_check`: a directory
  that suddenly "loses" many users (a wrong base after a migration, a group emptied by
  mistake) is more likely broken than a mass departure. Then nothing is revoked, an error
  is logged and audited each check, and `relay_directory_checks_total{result="guard"}`
  counts it, until IT fixes the directory or revokes by hand.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from relay.agent.audit import AuditLog, Outcome
from relay.agent.directory.client import (
    Directory,
    DirectoryError,
    DirectoryUnavailable,
    UserStatus,
)
from relay.agent.registry import DeviceRegistry, RegistryError, RevokeResult

__all__ = ["CHECK_RESULTS", "RECHECK_DEADLINE", "DirectoryMetrics", "Recheck"]

log = logging.getLogger(__name__)

#: Seconds one re-check may spend on the directory, waiting for connections included
#: (the revocations after it are registry writes, not bounded by it). Logins wait at most
#: 15 s (itpages.app.LOGIN_TIMEOUT); a re-check looks up every user holding devices,
#: about 0.05 s each on a healthy directory with up to 3 at once: 5 minutes is far above
#: what thousands of users take, and below the default 15-minute interval.
RECHECK_DEADLINE: Final = 300.0
#: `relay_directory_checks_total{result}`: all exported from zero.
CHECK_RESULTS: Final = ("ok", "revoked", "unavailable", "error", "guard")
_REASONS: Final = {
    UserStatus.DISABLED: "the account is disabled in the directory",
    UserStatus.DELETED: "the user no longer exists in the directory",
    UserStatus.NOT_IN_GROUP: "the user is no longer in the directory group",
}


@dataclass(eq=False)  # a prometheus registry keys its collectors by identity
class DirectoryMetrics(Collector):
    """`relay_directory_up` (1 after a check that reached the directory, 0 after one that
    did not; absent before the first), `relay_directory_checks_total{result}` and
    `relay_directory_revocations_total`."""

    up: int | None = None
    checks: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CHECK_RESULTS, 0))
    revocations: int = 0

    def collect(self) -> Iterator[Metric]:
        if self.up is not None:
            yield GaugeMetricFamily(
                "relay_directory_up",
                "1 if the last directory re-check reached the directory, else 0",
                value=self.up,
            )
        family = CounterMetricFamily(
            "relay_directory_checks", "Directory re-checks by result", labels=["result"]
        )
        for result, count in self.checks.items():
            family.add_metric([result], count)
        yield family
        yield CounterMetricFamily(
            "relay_directory_revocations",
            "Devices revoked because their directory user left",
            value=self.revocations,
        )


class Recheck:
    """One site's re-check; `check()` once, `run()` on the schedule."""

    def __init__(
        self,
        directory: Directory,
        registry: DeviceRegistry,
        audit: AuditLog,
        *,
        agent: str,
        device_uri: Callable[[str], str],
        now: Callable[[], datetime],
        on_revoked: Callable[[], None],
        metrics: DirectoryMetrics | None = None,
        deadline: float = RECHECK_DEADLINE,
    ) -> None:
        self.directory = directory
        self.registry = registry
        self.audit = audit
        self.agent = agent  # our SPIFFE ID: the actor of the revocations
        self.device_uri = device_uri
        self.now = now
        self.on_revoked = on_revoked  # the registry changed under the revocation watcher
        self.metrics = metrics or DirectoryMetrics()
        self.limit = directory.settings.max_revocations_per_check
        self.deadline = deadline

    def _count(self, result: str) -> str:
        self.metrics.checks[result] += 1
        return result

    async def check(self) -> str:
        """One re-check; returns its result (one of CHECK_RESULTS)."""
        try:
            held = await asyncio.to_thread(self.registry.users_with_devices)
        except RegistryError as exc:
            log.error("directory re-check: cannot read the registry", extra={"error": str(exc)})
            return self._count("error")
        users = sorted(held)
        try:
            async with asyncio.timeout(self.deadline):
                if not held:
                    await self.directory.check()  # keeps relay_directory_up meaningful
                    self.metrics.up = 1
                    return self._count("ok")
                statuses = await self._lookup_all(users)
        except TimeoutError:
            self.metrics.up = 0
            log.warning(
                "directory re-check did not finish within %g s; given up, nothing revoked",
                self.deadline,
                extra={"directory": self.directory.settings.url},
            )
            return self._count("unavailable")
        except DirectoryUnavailable as exc:
            self.metrics.up = 0
            log.warning(
                "directory unreachable; re-check skipped, nothing revoked",
                extra={"directory": self.directory.settings.url, "error": str(exc)},
            )
            return self._count("unavailable")
        except DirectoryError as exc:
            self.metrics.up = 1
            log.error(
                "directory answer not trusted; re-check skipped, nothing revoked",
                extra={"directory": self.directory.settings.url, "error": str(exc)},
            )
            return self._count("error")
        self.metrics.up = 1
        leaving = {u: s for u, s in zip(users, statuses, strict=True) if s is not UserStatus.ACTIVE}
        if not leaving:
            return self._count("ok")
        if len(leaving) > self.limit:
            self._refuse_mass_revocation(leaving, held)
            return self._count("guard")
        await asyncio.to_thread(self._revoke, leaving, held)
        return self._count("revoked")

    async def _lookup_all(self, users: list[str]) -> list[UserStatus]:
        """Every user's standing, or the first DirectoryError, which ends the lookups.

        As many workers as the re-check may hold connections, each taking the next user
        when its lookup is done: after a failure no lookup starts, and the ones under way
        are cancelled (their threads run out their own timeout). asyncio.gather left
        every lookup running after the first failure, each waiting for a connection and
        then its timeout, so an outage grew a backlog past the next check that IT logins
        and enrollments queued behind.
        """
        statuses: dict[str, UserStatus] = {}
        todo = iter(users)  # shared: each user once

        async def worker() -> None:
            for user in todo:
                statuses[user] = await self.directory.lookup(user)

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(self.directory.background_slots, len(users))):
                    group.create_task(worker())
        except BaseExceptionGroup as failed:
            if all(isinstance(e, DirectoryError) for e in failed.exceptions):
                raise failed.exceptions[0] from None  # the first to fail ended the check
            raise  # a bug among them: run() logs it with its traceback
        return [statuses[u] for u in users]

    def _refuse_mass_revocation(
        self, leaving: Mapping[str, UserStatus], held: Mapping[str, list[str]]
    ) -> None:
        devices = sum(len(held[u]) for u in leaving)
        message = (
            f"directory re-check: {len(leaving)} of {len(held)} users with devices would lose "
            f"them ({devices} devices), above max_revocations_per_check={self.limit}; "
            "nothing revoked: check the directory, or revoke by hand"
        )
        log.error(message, extra={"users": ",".join(sorted(leaving)[:20])})
        self.audit.revocation(
            now=self.now(),
            device=self.agent,
            actor=f"{self.agent} (directory re-check)",
            outcome=Outcome.MAJOR_FAILURE,
            description=message,
        )

    def _revoke(self, leaving: Mapping[str, UserStatus], held: Mapping[str, list[str]]) -> None:
        revoked = 0
        try:
            for user, status in sorted(leaving.items()):
                reason = _REASONS[status]
                for name in held[user]:
                    at = self.now()
                    if self.registry.revoke(name, at) is RevokeResult.ALREADY:
                        continue
                    revoked += 1
                    uri = self.device_uri(name)
                    self.audit.revocation(
                        now=at,
                        device=uri,
                        actor=f"{self.agent} (directory re-check)",
                        description=f"device {name} of user {user} revoked: {reason}",
                        user=user,
                    )
                    log.warning(
                        "device revoked: its directory user left",
                        extra={"device": uri, "user": user, "status": status.value},
                    )
        except RegistryError as exc:
            log.error("directory re-check: cannot revoke", extra={"error": str(exc)})
        finally:
            self.metrics.revocations += revoked
            if revoked:
                self.on_revoked()

    async def run(self) -> None:
        """Check now, then every `recheck_interval` seconds, until cancelled."""
        interval = self.directory.settings.recheck_interval
        while True:
            try:
                await self.check()
            except Exception:  # a bug must not end the schedule; nothing was revoked by it
                log.exception("directory re-check failed")
                self._count("error")
            await asyncio.sleep(interval)
