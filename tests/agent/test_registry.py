"""The device registry: token life cycle, revocation, last seen, and concurrent writers."""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from relay.agent import registry as registry_module
from relay.agent.registry import (
    MAX_PASSWORD_FAILURES,
    MAX_TTL,
    REGISTRY_FILE,
    SCHEMA_VERSION,
    DeviceRegistry,
    RedeemStatus,
    RegistryError,
    RevocationWatcher,
    RevokeResult,
)
from relay.trust.codes import hash_secret, new_secret, new_token_id

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)
DAY = timedelta(days=1)


@pytest.fixture
def reg(tmp_path: Path) -> Iterator[DeviceRegistry]:
    with DeviceRegistry(tmp_path / REGISTRY_FILE, site="main") as r:
        yield r


def test_file_is_private_and_in_wal_mode(tmp_path: Path, reg: DeviceRegistry) -> None:
    mode = stat.S_IMODE(os.stat(tmp_path / REGISTRY_FILE).st_mode)
    assert mode == 0o600
    (journal,) = reg._db.execute("PRAGMA journal_mode").fetchone()
    assert journal == "wal"


def test_token_redeemed_once(reg: DeviceRegistry) -> None:
    token_id, secret = reg.create_token("ws1", DAY, T0)
    first = reg.redeem_token(token_id, secret, "ws1", T0 + timedelta(minutes=5))
    assert first.ok and first.device == "ws1" and first.site == "main"
    again = reg.redeem_token(token_id, secret, "ws1", T0 + timedelta(minutes=6))
    assert again.status is RedeemStatus.REUSED


def test_only_the_hash_is_stored(reg: DeviceRegistry) -> None:
    token_id, secret = reg.create_token("ws1", DAY, T0)
    (stored,) = reg._db.execute(
        "SELECT secret_hash FROM tokens WHERE id = ?", (token_id,)
    ).fetchone()
    assert secret not in bytes(stored)
    raw = (reg.path).read_bytes() + reg.path.with_name(reg.path.name + "-wal").read_bytes()
    assert secret not in raw


def test_unknown_and_forged(reg: DeviceRegistry) -> None:
    token_id, secret = reg.create_token("ws1", DAY, T0)
    assert reg.redeem_token("0" * 16, secret, "ws1", T0).status is RedeemStatus.UNKNOWN
    forged = reg.redeem_token(token_id, b"\x00" * 20, "ws1", T0)
    assert forged.status is RedeemStatus.FORGED
    assert forged.device is None  # nothing learned without the secret
    assert reg.redeem_token(token_id, secret, "ws1", T0).ok  # forgery did not burn it


def test_expiry_boundary(reg: DeviceRegistry) -> None:
    token_id, secret = reg.create_token("ws1", timedelta(hours=1), T0)
    just_before = T0 + timedelta(hours=1) - timedelta(microseconds=1000)
    # Refusals do not consume the token, so the same token can probe both sides.
    expired = reg.redeem_token(token_id, secret, "ws1", T0 + timedelta(hours=1))
    assert expired.status is RedeemStatus.EXPIRED
    assert expired.expires_at == T0 + timedelta(hours=1)
    assert reg.redeem_token(token_id, secret, "ws1", just_before).ok


def test_wrong_device_does_not_consume(reg: DeviceRegistry) -> None:
    token_id, secret = reg.create_token("ws1", DAY, T0)
    wrong = reg.redeem_token(token_id, secret, "ws2", T0)
    assert wrong.status is RedeemStatus.WRONG_DEVICE and wrong.device == "ws1"
    assert reg.redeem_token(token_id, secret, "ws1", T0).ok


def test_ttl_limits_and_naive_times(reg: DeviceRegistry) -> None:
    with pytest.raises(RegistryError, match="lifetime"):
        reg.create_token("ws1", timedelta(0), T0)
    with pytest.raises(RegistryError, match="lifetime"):
        reg.create_token("ws1", MAX_TTL + timedelta(seconds=1), T0)
    with pytest.raises(ValueError, match="timezone"):
        reg.create_token("ws1", DAY, datetime(2030, 1, 1))
    with pytest.raises(RegistryError, match=r"^invalid device name 'bad name'"):
        reg.create_token("bad name", DAY, T0)


def test_open_tokens_are_capped(reg: DeviceRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "MAX_OPEN_TOKENS", 3)
    for i in range(3):
        reg.create_token(f"ws{i}", DAY, T0)
    with pytest.raises(RegistryError, match="still open"):
        reg.create_token("ws9", DAY, T0)
    # Once they expire, there is room again.
    reg.create_token("ws9", DAY, T0 + 2 * DAY)


def test_dead_tokens_are_pruned(reg: DeviceRegistry) -> None:
    reg.create_token("ws1", timedelta(hours=1), T0)
    reg.create_token("ws2", DAY, T0 + 40 * DAY)
    (count,) = reg._db.execute("SELECT COUNT(*) FROM tokens").fetchone()
    assert count == 1


def test_revocation(reg: DeviceRegistry) -> None:
    token_id, secret = reg.create_token("ws1", DAY, T0)
    reg.record_certificate("ws1", 0xABC, T0, T0 + 30 * DAY, T0)
    assert reg.revoke("ws1", T0 + DAY) is RevokeResult.REVOKED
    assert reg.revoke("ws1", T0 + DAY) is RevokeResult.ALREADY
    assert reg.is_revoked("ws1") and not reg.is_revoked("ws2")
    assert reg.revoke("typo", T0) is RevokeResult.REVOKED_UNKNOWN
    assert reg.revoked_devices() == ["typo", "ws1"]
    # Its open codes are gone, and no new one can be made.
    assert reg.redeem_token(token_id, secret, "ws1", T0).status is RedeemStatus.UNKNOWN
    with pytest.raises(RegistryError, match="revoked"):
        reg.create_token("ws1", DAY, T0)


def test_token_of_a_device_revoked_meanwhile(reg: DeviceRegistry) -> None:
    token_id, secret = reg.create_token("ws1", DAY, T0)
    # Revoke through SQL (as an older version might): the check at redemption still holds.
    reg._db.execute("INSERT INTO devices (name, site, revoked_at) VALUES ('ws1', 'main', 1)")
    assert reg.redeem_token(token_id, secret, "ws1", T0).status is RedeemStatus.REVOKED


def test_certificates_and_listing(reg: DeviceRegistry) -> None:
    reg.record_certificate("ws1", 0x10, T0, T0 + 30 * DAY, T0)
    reg.record_certificate("ws1", "0x0020", T0 + 20 * DAY, T0 + 50 * DAY, T0 + 20 * DAY)
    reg.touch("ws1", T0 + 21 * DAY)
    reg.touch("offline", T0)  # a device issued offline shows up once seen
    rows = {r.name: r for r in reg.list_devices()}
    ws1 = rows["ws1"]
    assert ws1.serial == "20" and ws1.not_after == T0 + 50 * DAY
    assert ws1.enrolled_at == T0 and ws1.certificates == 2
    assert ws1.last_seen == T0 + 21 * DAY and not ws1.revoked
    assert rows["offline"].enrolled_at is None and rows["offline"].serial is None
    assert reg.get_device("nobody") is None


def test_certificate_rows_are_bounded(reg: DeviceRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "KEEP_CERTIFICATES", 3)
    for i in range(10):
        start = T0 + i * DAY
        reg.record_certificate("ws1", i + 1, start, start + 30 * DAY, start)
    row = reg.get_device("ws1")
    assert row is not None and row.certificates == 3 and row.serial == "a"


def test_touch_is_throttled(reg: DeviceRegistry) -> None:
    assert reg.touch("ws1", T0)
    assert not reg.touch("ws1", T0 + timedelta(seconds=30))
    assert reg.touch("ws1", T0 + timedelta(seconds=61))
    row = reg.get_device("ws1")
    assert row is not None and row.last_seen == T0 + timedelta(seconds=61)


def test_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / REGISTRY_FILE
    with DeviceRegistry(path, site="main") as first:
        token_id, secret = first.create_token("ws1", DAY, T0)
        first.revoke("old", T0)
    with DeviceRegistry(path, site="main") as second:
        assert second.redeem_token(token_id, secret, "ws1", T0).ok
        assert second.revoked_devices() == ["old"]


def test_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / REGISTRY_FILE
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(RegistryError, match=str(path)):
        DeviceRegistry(path, site="main")


def test_newer_schema_refused(tmp_path: Path) -> None:
    path = tmp_path / REGISTRY_FILE
    DeviceRegistry(path, site="main").close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    with pytest.raises(RegistryError, match="newer"):
        DeviceRegistry(path, site="main")


def test_concurrent_redemptions_only_one_wins(tmp_path: Path) -> None:
    path = tmp_path / REGISTRY_FILE
    with DeviceRegistry(path, site="main") as setup:
        token_id, secret = setup.create_token("ws1", DAY, T0)
    results: list[RedeemStatus] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        with DeviceRegistry(path, site="main") as own:  # one connection each, like processes
            barrier.wait()
            results.append(own.redeem_token(token_id, secret, "ws1", T0).status)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == sorted([RedeemStatus.OK] + [RedeemStatus.REUSED] * 7)


_WRITER = """
import datetime as dt, sys
from pathlib import Path
from relay.agent.registry import DeviceRegistry
path, prefix, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
t0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
with DeviceRegistry(path, site="main") as reg:
    for i in range(n):
        name = f"{prefix}{i}"
        tid, secret = reg.create_token(name, dt.timedelta(days=1), t0)
        assert reg.redeem_token(tid, secret, name, t0).ok
        end = t0 + dt.timedelta(days=30)
        reg.record_certificate(name, f"{prefix}{i:04x}".encode().hex(), t0, end, t0)
        reg.touch(name, t0)
        if i % 10 == 0:
            reg.revoke(name, t0)
"""


def test_two_processes_and_this_one_write_at_once(tmp_path: Path) -> None:
    """The agent and the CLI write at the same time: nothing fails, nothing is lost."""
    path = tmp_path / REGISTRY_FILE
    DeviceRegistry(path, site="main").close()
    n = 60
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), prefix, str(n)],
            stderr=subprocess.PIPE,
        )
        for prefix in ("a", "b")
    ]
    with DeviceRegistry(path, site="main") as local:
        for i in range(n):
            local.touch(f"c{i}", T0)
            local.revoke(f"r{i}", T0)
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
    with DeviceRegistry(path, site="main") as check:
        rows = {r.name: r for r in check.list_devices()}
        assert len(rows) == 4 * n
        assert all(rows[f"a{i}"].certificates == 1 for i in range(n))
        revoked = check.revoked_devices()
        assert len(revoked) == n + 2 * (n // 10)


def test_watcher_sees_revocations_from_another_connection(tmp_path: Path) -> None:
    path = tmp_path / REGISTRY_FILE
    with DeviceRegistry(path, site="main") as agent, DeviceRegistry(path, site="main") as cli:
        cli.revoke("early", T0)
        watcher = RevocationWatcher(agent)
        assert watcher.snapshot() == ["early"]
        assert watcher.poll() == []
        cli.revoke("ws1", T0)
        cli.touch("ws2", T0)
        assert watcher.poll() == ["ws1"]
        assert watcher.poll() == []
        agent.revoke("ws3", T0)  # same connection: data_version does not move
        watcher.note_local_change()
        assert watcher.poll() == ["ws3"]


def test_a_token_for_a_user_binds_the_device(reg: DeviceRegistry) -> None:
    token_id, secret = reg.create_token("ws1", DAY, T0, user="alice")
    checked = reg.redeem_token(token_id, secret, "ws1", T0, consume=False)
    assert checked.ok and checked.user == "alice"
    spent = reg.redeem_token(token_id, secret, "ws1", T0)  # the check did not spend it
    assert spent.ok and spent.user == "alice"
    assert reg.redeem_token(token_id, secret, "ws1", T0).status is RedeemStatus.REUSED
    reg.record_certificate("ws1", 1, T0, T0 + DAY, T0, user="alice")
    reg.record_certificate("ws1", 2, T0, T0 + DAY, T0)  # a renewal keeps the user
    reg.record_certificate("ws2", 3, T0, T0 + DAY, T0, user="alice")
    reg.record_certificate("ws3", 4, T0, T0 + DAY, T0)
    assert reg.device_user("ws1") == "alice" and reg.device_user("ws3") is None
    assert reg.users_with_devices() == {"alice": ["ws1", "ws2"]}
    reg.revoke("ws2", T0)
    assert reg.users_with_devices() == {"alice": ["ws1"]}
    row = reg.get_device("ws1")
    assert row is not None and row.user == "alice"


#: The schema as relay wrote it before the password count (schema 2), frozen here: the
#: registry files in the field were made by it.
_SCHEMA_2 = """
CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    secret_hash BLOB NOT NULL,
    device TEXT NOT NULL,
    site TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    used_at REAL,
    user TEXT
);
CREATE INDEX tokens_device ON tokens (device);
CREATE TABLE devices (
    name TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    enrolled_at REAL,
    revoked_at REAL,
    last_seen REAL,
    user TEXT
);
CREATE TABLE certificates (
    serial TEXT PRIMARY KEY,
    device TEXT NOT NULL,
    not_before REAL NOT NULL,
    not_after REAL NOT NULL,
    issued_at REAL NOT NULL
);
CREATE INDEX certificates_device ON certificates (device, not_after);
"""


def _old_registry(path: Path, schema: str, version: int) -> None:
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode = WAL")
    db.executescript(schema)
    db.execute("INSERT INTO devices (name, site) VALUES ('old', 'main')")
    db.execute(f"PRAGMA user_version = {version}")
    db.commit()
    db.close()


def test_a_schema_1_registry_gains_the_user_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    _old_registry(path, _SCHEMA_2.replace(",\n    user TEXT", ""), 1)
    with DeviceRegistry(path, site="main") as r:
        assert r.device_user("old") is None
        r.record_certificate("old", 1, T0, T0 + DAY, T0, user="bob")
        assert r.device_user("old") == "bob"
        assert r._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_schema_2_registry_gains_the_password_count(tmp_path: Path) -> None:
    """A registry file from before the count opens; a code made then starts with every
    try left and still burns after MAX_PASSWORD_FAILURES wrong passwords."""
    path = tmp_path / "old.sqlite3"
    _old_registry(path, _SCHEMA_2, 2)
    token_id, secret = new_token_id(), new_secret()
    db = sqlite3.connect(path)
    db.execute(
        "INSERT INTO tokens (id, secret_hash, device, site, created_at, expires_at, user)"
        " VALUES (?, ?, 'ws1', 'main', ?, ?, 'alice')",
        (token_id, hash_secret(token_id, secret), T0.timestamp(), (T0 + DAY).timestamp()),
    )
    db.commit()
    db.close()
    with DeviceRegistry(path, site="main") as r:
        assert r._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert r.redeem_token(token_id, secret, "ws1", T0, consume=False).user == "alice"
        for _ in range(MAX_PASSWORD_FAILURES):
            assert r.start_password_attempt(token_id) is RedeemStatus.OK
            r.end_password_attempt(token_id, T0, wrong=True)
        assert r.redeem_token(token_id, secret, "ws1", T0).status is RedeemStatus.BURNT
        assert r.get_device("old") is not None
    with DeviceRegistry(path, site="main") as again:  # opening it twice changes nothing
        assert again.redeem_token(token_id, secret, "ws1", T0).status is RedeemStatus.BURNT


def test_an_active_device_is_never_bound_to_another_user(reg: DeviceRegistry) -> None:
    """A code for a name in use (enrolled, not revoked) is refused unless it is for the
    same user (a PC enrolled again, e.g. after losing its identity); and a code made
    before the name was taken cannot take it at redemption either."""
    early, early_secret = reg.create_token("ws1", DAY, T0, user="bob")  # made first
    token_id, secret = reg.create_token("ws1", DAY, T0, user="alice")
    assert reg.redeem_token(token_id, secret, "ws1", T0).ok
    reg.record_certificate("ws1", 1, T0, T0 + DAY, T0, user="alice")
    with pytest.raises(RegistryError, match=r"'ws1' is enrolled.*revoke it first or choose"):
        reg.create_token("ws1", DAY, T0, user="bob")
    with pytest.raises(RegistryError, match="revoke it first"):
        reg.create_token("ws1", DAY, T0)  # no user is another user too
    assert reg.redeem_token(early, early_secret, "ws1", T0, consume=False).status == "in_use"
    assert reg.redeem_token(early, early_secret, "ws1", T0).status == "in_use"
    assert reg.device_user("ws1") == "alice"
    # alice enrolls the PC again (a new disk): her own code is fine
    again, again_secret = reg.create_token("ws1", DAY, T0, user="alice")
    assert reg.redeem_token(again, again_secret, "ws1", T0).ok
    # without a directory (no user at all), a name in use may get a new code as before
    reg.record_certificate("ws2", 2, T0, T0 + DAY, T0)
    plain, plain_secret = reg.create_token("ws2", DAY, T0)
    assert reg.redeem_token(plain, plain_secret, "ws2", T0).ok
    # a device issued offline and seen (no user) is in use as well
    reg.touch("offline", T0)
    with pytest.raises(RegistryError, match="revoke it first"):
        reg.create_token("offline", DAY, T0, user="bob")


def test_wrong_passwords_burn_a_code(reg: DeviceRegistry) -> None:
    token_id, secret = reg.create_token("ws1", DAY, T0, user="alice")
    for _ in range(MAX_PASSWORD_FAILURES - 1):
        assert reg.start_password_attempt(token_id) is RedeemStatus.OK
        assert reg.end_password_attempt(token_id, T0, wrong=True) is False
    assert reg.redeem_token(token_id, secret, "ws1", T0, consume=False).ok
    assert reg.start_password_attempt(token_id) is RedeemStatus.OK
    assert reg.end_password_attempt(token_id, T0, wrong=True) is True  # this one burnt it
    for consume in (False, True):
        burnt = reg.redeem_token(token_id, secret, "ws1", T0, consume=consume)
        assert burnt.status is RedeemStatus.BURNT and burnt.user == "alice"
    assert reg.start_password_attempt(token_id) is RedeemStatus.BURNT
    # An attempt that was under way and now finds the directory down gives back nothing.
    assert reg.end_password_attempt(token_id, T0, wrong=False) is False
    assert reg.redeem_token(token_id, secret, "ws1", T0).status is RedeemStatus.BURNT
    # Without the secret one still learns nothing; a burnt code is no longer open.
    assert reg.redeem_token(token_id, b"\x00" * 20, "ws1", T0).status is RedeemStatus.FORGED
    (still_open,) = reg._db.execute("SELECT COUNT(*) FROM tokens WHERE used_at IS NULL").fetchone()
    assert still_open == 0


def test_only_a_wrong_password_spends_a_try(reg: DeviceRegistry) -> None:
    """The directory down, the account disabled, the user outside the group, or the
    password right: the try is given back."""
    token_id, secret = reg.create_token("ws1", DAY, T0, user="alice")
    for _ in range(3 * MAX_PASSWORD_FAILURES):
        assert reg.start_password_attempt(token_id) is RedeemStatus.OK
        assert reg.end_password_attempt(token_id, T0, wrong=False) is False
    assert reg.redeem_token(token_id, secret, "ws1", T0).ok
    assert reg.start_password_attempt(token_id) is RedeemStatus.REUSED
    assert reg.start_password_attempt("0" * 16) is RedeemStatus.UNKNOWN


def test_attempts_under_way_count_against_the_limit(reg: DeviceRegistry) -> None:
    """Counted when they start: attempts whose directory answer is still to come cannot
    ask the directory more than MAX_PASSWORD_FAILURES times between them."""
    token_id, secret = reg.create_token("ws1", DAY, T0, user="alice")
    for _ in range(MAX_PASSWORD_FAILURES):
        assert reg.start_password_attempt(token_id) is RedeemStatus.OK
    assert reg.start_password_attempt(token_id) is RedeemStatus.BURNT
    assert reg.end_password_attempt(token_id, T0, wrong=False) is False  # one was right
    assert reg.redeem_token(token_id, secret, "ws1", T0).ok


def test_concurrent_password_attempts_never_exceed_the_limit(tmp_path: Path) -> None:
    path = tmp_path / REGISTRY_FILE
    with DeviceRegistry(path, site="main") as setup:
        token_id, _ = setup.create_token("ws1", DAY, T0, user="alice")
    results: list[RedeemStatus] = []
    burnt: list[bool] = []
    workers = 3 * MAX_PASSWORD_FAILURES
    barrier = threading.Barrier(workers)

    def worker() -> None:
        with DeviceRegistry(path, site="main") as own:  # one connection each, like processes
            barrier.wait()
            status = own.start_password_attempt(token_id)
            results.append(status)
            if status is RedeemStatus.OK:
                burnt.append(own.end_password_attempt(token_id, T0, wrong=True))

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results.count(RedeemStatus.OK) == MAX_PASSWORD_FAILURES
    assert results.count(RedeemStatus.BURNT) == workers - MAX_PASSWORD_FAILURES
    assert burnt.count(True) == 1  # burnt once: one audit event


def test_a_burnt_code_does_not_hold_an_open_slot(
    reg: DeviceRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry_module, "MAX_OPEN_TOKENS", 1)
    token_id, _ = reg.create_token("ws1", DAY, T0, user="alice")
    for _ in range(MAX_PASSWORD_FAILURES):
        reg.start_password_attempt(token_id)
        reg.end_password_attempt(token_id, T0, wrong=True)
    reg.create_token("ws1", DAY, T0, user="alice")  # IT's new code: the only open one
