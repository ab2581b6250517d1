"""The re-check against a real slapd, with a real registry and audit trail: who loses
devices, and what never causes a revocation (an outage, an odd answer, too many)."""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from relay.agent.audit import AuditLog, read_events
from relay.agent.directory import Directory, DirectorySettings, Refusal, RefusalReason
from relay.agent.directory.recheck import DirectoryMetrics, Recheck
from relay.agent.registry import DeviceRegistry
from tests.interop.harness.slapd import PASSWORDS, Slapd

from .blackhole import BlackHole, Trickle

T0 = datetime(2030, 1, 1, 12, tzinfo=dt.UTC)
AGENT = "spiffe://hospital.test/agent/main"


def uri(name: str) -> str:
    return f"spiffe://hospital.test/device/main/{name}"


class Fixture:
    def __init__(self, tmp: Path, settings: DirectorySettings) -> None:
        self.registry = DeviceRegistry(tmp / "registry.sqlite3", site="main")
        self.audit = AuditLog(tmp / "audit.log", source_id=AGENT, site="main")
        self.audit.user_of = lambda u: self.registry.device_user(u.rsplit("/", 1)[-1])
        self.changed = 0
        self.metrics = DirectoryMetrics()
        self.settings = settings
        self.path = tmp / "audit.log"

    def recheck(self, **overrides: object) -> Recheck:
        return Recheck(
            Directory(replace(self.settings, **overrides)),  # type: ignore[arg-type]
            self.registry,
            self.audit,
            agent=AGENT,
            device_uri=uri,
            now=lambda: T0,
            on_revoked=self.note,
            metrics=self.metrics,
        )

    def note(self) -> None:
        self.changed += 1

    def hold(self, device: str, user: str) -> None:
        self.registry.record_certificate(device, 1, T0, T0 + timedelta(days=1), T0, user=user)

    def status(self, device: str) -> str:
        row = self.registry.get_device(device)
        assert row is not None
        return "revoked" if row.revoked else "active"


@pytest.fixture
def f(tmp_path: Path, settings: DirectorySettings) -> Fixture:
    fixture = Fixture(tmp_path, settings)
    for device, user in [("a1", "alice"), ("a2", "alice"), ("c1", "carol"), ("d1", "dave")]:
        fixture.hold(device, user)
    return fixture


async def test_users_who_left_lose_all_their_devices(slapd: Slapd, f: Fixture) -> None:
    recheck = f.recheck()
    assert await recheck.check() == "ok" and f.metrics.up == 1 and f.changed == 0
    slapd.lock("alice")
    slapd.remove_member("dave")
    assert await recheck.check() == "revoked"
    assert [f.status(d) for d in ("a1", "a2", "c1", "d1")] == [
        "revoked",
        "revoked",
        "active",
        "revoked",
    ]
    assert f.changed == 1 and f.metrics.revocations == 3
    events = [e for e in read_events(f.path) if e["kind"] == "revocation"]
    assert {e["user"] for e in events} == {"alice", "dave"}
    by_device = {e["ParticipantObjectIdentification"][0]["ParticipantObjectID"]: e for e in events}
    assert "disabled" in by_device[uri("a1")]["EventIdentification"]["EventOutcomeDescription"]
    assert "group" in by_device[uri("d1")]["EventIdentification"]["EventOutcomeDescription"]
    # Revoked devices are no longer looked up; nothing more to do.
    assert await recheck.check() == "ok" and f.metrics.revocations == 3
    slapd.delete("carol")
    assert await recheck.check() == "revoked" and f.status("c1") == "revoked"


async def test_an_outage_changes_nothing(slapd: Slapd, f: Fixture) -> None:
    recheck = f.recheck(timeout=2.0)
    slapd.kill()
    assert await recheck.check() == "unavailable"
    assert f.metrics.up == 0 and f.metrics.checks["unavailable"] == 1
    assert all(f.status(d) == "active" for d in ("a1", "a2", "c1", "d1"))
    assert f.changed == 0 and not read_events(f.path)


async def test_a_missing_group_or_base_changes_nothing(f: Fixture) -> None:
    gone = "cn=gone,ou=groups,dc=hospital,dc=test"
    assert await f.recheck(group=gone).check() == "error"
    assert await f.recheck(user_base="ou=gone,dc=hospital,dc=test").check() == "error"
    assert all(f.status(d) == "active" for d in ("a1", "a2", "c1", "d1"))
    assert f.metrics.checks["error"] == 2 and f.metrics.up == 1


async def test_too_many_leaving_at_once_revokes_nothing(slapd: Slapd, f: Fixture) -> None:
    recheck = f.recheck(max_revocations_per_check=1)
    slapd.remove_member("alice")
    slapd.remove_member("dave")
    assert await recheck.check() == "guard"
    assert all(f.status(d) == "active" for d in ("a1", "a2", "c1", "d1"))
    (event,) = read_events(f.path)
    assert event["EventIdentification"]["EventOutcomeIndicator"] == 12
    assert "max_revocations_per_check=1" in event["EventIdentification"]["EventOutcomeDescription"]
    # Within the limit, the same check goes ahead.
    assert await f.recheck(max_revocations_per_check=2).check() == "revoked"
    assert f.status("a1") == f.status("d1") == "revoked"


async def test_no_devices_still_checks_the_directory(
    slapd: Slapd, tmp_path: Path, settings: DirectorySettings
) -> None:
    empty = Fixture(tmp_path, settings)
    assert await empty.recheck().check() == "ok" and empty.metrics.up == 1
    slapd.kill()
    assert await empty.recheck(timeout=2.0).check() == "unavailable"
    assert empty.metrics.up == 0


async def test_an_outage_ends_the_check_at_once_and_leaves_logins_a_slot(
    slapd: Slapd, f: Fixture
) -> None:
    """A directory that stops answering (each operation waits its whole timeout): the
    first failed lookup ends the check and the lookups not yet done are dropped, not
    left to run for minutes behind it; and an IT login or enrollment meanwhile gets a
    connection of its own instead of queueing behind the re-check's lookups."""
    for i in range(36):
        f.hold(f"x{i}", f"user{i:02d}")  # 40 users with devices
    hole = await BlackHole().start()
    try:
        settings = hole.settings(f.settings, timeout=1.0)
        directory = Directory(replace(settings, max_connections=4))
        recheck = Recheck(directory, f.registry, f.audit, agent=AGENT, device_uri=uri,
                          now=lambda: T0, on_revoked=f.note, metrics=f.metrics)  # fmt: skip
        loop = asyncio.get_running_loop()
        check = asyncio.create_task(recheck.check())
        await asyncio.sleep(0.2)  # the re-check holds every connection it may
        t0 = loop.time()
        login = await directory.authenticate("carol", PASSWORDS["carol"], admin=True)
        assert isinstance(login, Refusal) and login.reason is RefusalReason.UNAVAILABLE
        assert loop.time() - t0 < 2.5  # its own timeout, not 40 lookups' worth
        assert await check == "unavailable"
        assert loop.time() - t0 < 2.5
        opened = hole.connections
        await asyncio.sleep(1.5)  # the lookups not started stay unstarted
        assert hole.connections == opened <= 4
        assert all(f.status(d) == "active" for d in ("a1", "a2", "c1", "d1", "x0"))
        directory.close()
    finally:
        await hole.close()


async def test_a_directory_that_trickles_is_given_up_at_the_deadline_revoking_nothing(
    f: Fixture,
) -> None:
    """ldap3's timeout bounds each read: a directory sending a byte every 0.2 s held the
    re-check, and its connections, for ever. Now the check ends at its deadline as
    "unavailable", revokes nothing, and its connections are cut at once."""
    trickle = await Trickle(every=0.2).start()
    try:
        settings = trickle.settings(f.settings, timeout=1.0)
        directory = Directory(replace(settings, max_connections=4))
        recheck = Recheck(directory, f.registry, f.audit, agent=AGENT, device_uri=uri,
                          now=lambda: T0, on_revoked=f.note, metrics=f.metrics,
                          deadline=0.8)  # fmt: skip
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await asyncio.wait_for(recheck.check(), 5.0) == "unavailable"
        assert loop.time() - t0 < 1.5
        assert f.metrics.up == 0 and f.metrics.checks["unavailable"] == 1
        assert trickle.connections == 3  # the re-check's slots were all in use
        async with asyncio.timeout(1.0):  # cut, not left dripping
            await trickle.idle.wait()
        assert all(f.status(d) == "active" for d in ("a1", "a2", "c1", "d1"))
        assert f.changed == 0 and not read_events(f.path)
        directory.close()
    finally:
        await trickle.close()
