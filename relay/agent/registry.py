"""The agent's device registry: enrollment tokens, devices and their certificates, in SQLite.

One file, `state_dir/registry.sqlite3`, shared by the running agent and the `relay token`
and `relay device` commands. It is safe for them to write at the same time:

- WAL journal mode, so readers never block the writer and the writer never blocks them;
- `busy_timeout`, so a writer waits for another's (millisecond) transaction instead of
  failing with "database is locked";
- every operation is its own short transaction, and every read-modify-write starts with
  BEGIN IMMEDIATE (the write lock is taken before reading), so e.g. two redemptions of
  the same token cannot both succeed, nor concurrent password attempts on one code
  exceed MAX_PASSWORD_FAILURES.

Time is always passed in (timezone-aware datetimes); nothing here reads a clock. Every
table is bounded: old tokens and old certificate rows are pruned, open tokens and
devices are capped.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final

from relay.trust.codes import hash_secret, new_secret, new_token_id, secret_matches
from relay.trust.identity import check_name

__all__ = [
    "BUSY_TIMEOUT",
    "MAX_DEVICES",
    "MAX_OPEN_TOKENS",
    "MAX_PASSWORD_FAILURES",
    "MAX_TTL",
    "REGISTRY_FILE",
    "SCHEMA_VERSION",
    "CertificateRow",
    "DeviceRegistry",
    "DeviceRow",
    "RedeemStatus",
    "Redeemed",
    "RegistryError",
    "RegistryUnavailable",
    "RevocationWatcher",
    "RevokeResult",
]

REGISTRY_FILE: Final = "registry.sqlite3"
#: 2: tokens.user and devices.user (the directory user a device is bound to).
#: 3: tokens.password_failures (wrong passwords given with a code).
SCHEMA_VERSION: Final = 3
BUSY_TIMEOUT: Final = 5.0  # seconds a writer waits for another's transaction
MAX_TTL: Final = timedelta(days=30)
MAX_OPEN_TOKENS: Final = 1000  # unused, unexpired tokens at once
MAX_DEVICES: Final = 100_000
#: The wrong directory password that burns a code bound to a user: whoever holds a code
#: gets this many guesses at its user's password, not an oracle.
MAX_PASSWORD_FAILURES: Final = 5
KEEP_CERTIFICATES: Final = 20  # certificate rows kept per device (the newest)
#: Used or expired tokens are deleted this long after they stopped being usable.
TOKEN_RETENTION: Final = timedelta(days=30)
#: touch() writes last_seen at most this often per device (streams are frequent).
TOUCH_INTERVAL: Final = 60.0

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    secret_hash BLOB NOT NULL,
    device TEXT NOT NULL,
    site TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    used_at REAL,
    user TEXT,
    password_failures INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS tokens_device ON tokens (device);
CREATE TABLE IF NOT EXISTS devices (
    name TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    enrolled_at REAL,
    revoked_at REAL,
    last_seen REAL,
    user TEXT
);
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY,
    device TEXT NOT NULL,
    not_before REAL NOT NULL,
    not_after REAL NOT NULL,
    issued_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS certificates_device ON certificates (device, not_after);
"""
#: Columns added since schema 1: (table, column, type), added to a registry made before.
_ADDED_COLUMNS: Final = (
    ("tokens", "user", "TEXT"),
    ("devices", "user", "TEXT"),
    ("tokens", "password_failures", "INTEGER NOT NULL DEFAULT 0"),
)


class RegistryError(Exception):
    """The registry cannot do what was asked; str() is one line naming the file."""


class RegistryUnavailable(RegistryError):
    """The registry file itself failed (SQLite: unreadable, corrupt, disk full, locked
    past the busy timeout), not the request: callers answer "try later" (an IT page's
    503), not "bad input"."""


class RedeemStatus(enum.StrEnum):
    """The outcome of presenting a token. Values are stable (metrics, audit)."""

    OK = "ok"
    UNKNOWN = "unknown"  # no such token id
    FORGED = "forged"  # the secret does not match
    EXPIRED = "expired"
    REUSED = "reused"  # already redeemed once
    WRONG_DEVICE = "wrong_device"  # issued for another device name
    REVOKED = "revoked"  # the device was revoked after the token was made
    IN_USE = "in_use"  # the name was enrolled for another user after the token was made
    BURNT = "burnt"  # spent by MAX_PASSWORD_FAILURES wrong passwords


@dataclass(frozen=True)
class Redeemed:
    """The result of `DeviceRegistry.redeem_token`. `device`/`site` are the token's (if known)."""

    status: RedeemStatus
    token_id: str
    device: str | None = None
    site: str | None = None
    expires_at: datetime | None = None
    user: str | None = None  # the directory user the token was created for

    @property
    def ok(self) -> bool:
        return self.status is RedeemStatus.OK


class RevokeResult(enum.StrEnum):
    REVOKED = "revoked"  # newly revoked, known device
    REVOKED_UNKNOWN = "revoked_unknown"  # newly revoked, name never seen before
    ALREADY = "already"  # was revoked already


@dataclass(frozen=True)
class DeviceRow:
    """One device as `relay device list` shows it (latest certificate included)."""

    name: str
    site: str
    enrolled_at: datetime | None
    revoked_at: datetime | None
    last_seen: datetime | None
    serial: str | None  # of the newest certificate (hex)
    not_after: datetime | None  # of the newest certificate
    certificates: int
    user: str | None = None  # the directory user it is bound to

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True)
class CertificateRow:
    """One certificate issued to a device, as the registry recorded it."""

    serial: str  # hex
    not_before: datetime
    not_after: datetime
    issued_at: datetime


def _ts(when: datetime) -> float:
    if when.tzinfo is None:
        raise ValueError("timezone-aware datetime required (use datetime.now(UTC))")
    return when.timestamp()


def _dt(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, dt.UTC)


def _check_device(name: str) -> str:
    try:
        return check_name(name, "device name")
    except ValueError as exc:
        raise RegistryError(str(exc)) from None


def serial_hex(serial: int | str) -> str:
    """A certificate serial as lowercase hex without leading zeros (how rows store it)."""
    if isinstance(serial, int):
        if serial < 0:
            raise ValueError("negative serial")
        return format(serial, "x")
    text = serial.lower().removeprefix("0x").lstrip("0") or "0"
    int(text, 16)  # ValueError if not hex
    return text


class DeviceRegistry:
    """The registry of one site. Methods are thread-safe and each is one transaction.

    Blocking (SQLite): an asyncio caller runs them with `asyncio.to_thread` if it cares
    about a few milliseconds, or inline otherwise.
    """

    def __init__(self, path: Path, *, site: str, busy_timeout: float = BUSY_TIMEOUT) -> None:
        self.path = Path(path)
        self.site = check_name(site, "site name")
        self._lock = threading.Lock()
        self._touched: dict[str, float] = {}
        try:
            if not self.path.exists():
                # Create it 0600 before SQLite does (with the umask's mode): it lists devices.
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
                os.close(fd)
            self._db = sqlite3.connect(
                self.path,
                timeout=busy_timeout,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,
            )
        except (OSError, sqlite3.Error) as exc:
            raise RegistryError(f"{self.path}: cannot open the registry ({exc})") from None
        try:
            self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise RegistryError(f"{self.path}: cannot switch the registry to WAL mode")
            # NORMAL in WAL mode: a power loss may lose the last transactions, never
            # corrupt the file; a crash of the process loses nothing.
            self._db.execute("PRAGMA synchronous = NORMAL")
            with self._write():
                version = self._db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise RegistryError(
                        f"{self.path}: registry schema {version} is newer than this relay "
                        f"understands ({SCHEMA_VERSION}); upgrade relay"
                    )
                # Statement by statement: executescript() would COMMIT our transaction.
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                for table, column, kind in _ADDED_COLUMNS:
                    present = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
                    if column not in present:
                        self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise RegistryError(f"{self.path}: not a usable registry ({exc})") from None
        except BaseException:
            self._db.close()
            raise

    # -- plumbing

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> DeviceRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: BEGIN IMMEDIATE takes the write lock before any read."""
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise self._busy(exc) from None
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        try:
            db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise self._busy(exc) from None

    def _busy(self, exc: sqlite3.OperationalError) -> RegistryError:
        return RegistryUnavailable(f"{self.path}: registry busy or unwritable ({exc})")

    @contextlib.contextmanager
    def _op(self) -> Iterator[None]:
        """Serialize this object's use across threads; map SQLite errors to one line."""
        with self._lock:
            try:
                yield
            except sqlite3.Error as exc:
                raise RegistryUnavailable(f"{self.path}: {exc}") from None

    # -- tokens

    def create_token(
        self, device: str, ttl: timedelta, now: datetime, *, user: str | None = None
    ) -> tuple[str, bytes]:
        """A new one-time token for `device`: (token id, secret). Only a hash is stored.

        `user`: the directory user the device will be bound to (checked at enrollment).

        Refuses a revoked device name (its identity stays revoked at every gateway; enroll
        the PC under a new name), a name in use by another user (`_held_by_another`), a TTL
        outside (0, MAX_TTL], and more than MAX_OPEN_TOKENS open tokens. Prunes tokens
        that have been dead for a while.
        """
        _check_device(device)
        if not timedelta(0) < ttl <= MAX_TTL:
            raise RegistryError(f"the code lifetime must be above 0 and at most {MAX_TTL}")
        t = _ts(now)
        token_id, secret = new_token_id(), new_secret()
        with self._op(), self._write() as db:
            horizon = t - TOKEN_RETENTION.total_seconds()
            db.execute(
                "DELETE FROM tokens WHERE expires_at < ? OR (used_at IS NOT NULL AND used_at < ?)",
                (horizon, horizon),
            )
            row = db.execute(
                "SELECT revoked_at, user FROM devices WHERE name = ?", (device,)
            ).fetchone()
            if row is not None and row[0] is not None:
                raise RegistryError(
                    f"device {device!r} is revoked; enroll the PC under a new device name"
                )
            if _held_by_another(row, user):
                assert row is not None
                holder = f"user {row[1]!r}" if row[1] is not None else "no directory user"
                raise RegistryError(
                    f"device {device!r} is enrolled ({holder}) and not revoked: revoke it "
                    "first or choose another device name"
                )
            (open_tokens,) = db.execute(
                "SELECT COUNT(*) FROM tokens WHERE used_at IS NULL AND expires_at > ?", (t,)
            ).fetchone()
            if open_tokens >= MAX_OPEN_TOKENS:
                raise RegistryError(
                    f"{self.path}: {open_tokens} enrollment codes are still open "
                    f"(limit {MAX_OPEN_TOKENS}); wait for them to expire"
                )
            db.execute(
                "INSERT INTO tokens (id, secret_hash, device, site, created_at, expires_at,"
                " user) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    token_id,
                    hash_secret(token_id, secret),
                    device,
                    self.site,
                    t,
                    t + ttl.total_seconds(),
                    user,
                ),
            )
        return token_id, secret

    def redeem_token(
        self, token_id: str, secret: bytes, device: str, now: datetime, *, consume: bool = True
    ) -> Redeemed:
        """Check a presented token and, if it is good, mark it used in the same transaction.

        `consume` False only checks (the agent asks the directory before it spends a code
        bound to a user, then redeems for real: the checks run again then).

        The secret is checked before anything else, so that without it one learns nothing
        about a token (expired, used, which device) beyond whether its id exists. A
        refused attempt does not consume the token (wrong passwords are counted apart:
        `start_password_attempt`). A code for a device name now held by another user is
        IN_USE (`_held_by_another`), spending nothing. A code burnt by wrong passwords is
        BURNT.
        """
        t = _ts(now)
        with self._op(), self._write() as db:
            row = db.execute(
                "SELECT secret_hash, device, site, expires_at, used_at, user,"
                " password_failures FROM tokens WHERE id = ?",
                (token_id,),
            ).fetchone()
            if row is None:
                return Redeemed(RedeemStatus.UNKNOWN, token_id)
            stored_hash, token_device, site, expires_at, used_at, user, failures = row
            if not secret_matches(token_id, secret, bytes(stored_hash)):
                return Redeemed(RedeemStatus.FORGED, token_id)
            result = Redeemed(RedeemStatus.OK, token_id, token_device, site, _dt(expires_at), user)
            if used_at is not None:
                spent = (
                    RedeemStatus.BURNT if failures >= MAX_PASSWORD_FAILURES else RedeemStatus.REUSED
                )
                return _with_status(result, spent)
            if t >= expires_at:
                return _with_status(result, RedeemStatus.EXPIRED)
            if device != token_device:
                return _with_status(result, RedeemStatus.WRONG_DEVICE)
            known = db.execute(
                "SELECT revoked_at, user FROM devices WHERE name = ?", (token_device,)
            ).fetchone()
            if known is not None and known[0] is not None:
                return _with_status(result, RedeemStatus.REVOKED)
            # A code made before another user's enrollment took the name (two codes for
            # one new name, or a code older than this check) must not move the device:
            # enrollment records the code's user on the device.
            if _held_by_another(known, user):
                return _with_status(result, RedeemStatus.IN_USE)
            if consume:
                db.execute("UPDATE tokens SET used_at = ? WHERE id = ?", (t, token_id))
            return result

    def start_password_attempt(self, token_id: str) -> RedeemStatus:
        """Count a password attempt with this code before the directory is asked: OK, or
        BURNT (no tries left), REUSED or UNKNOWN (spent or deleted since it was checked).

        Counted up front, under the write lock that checks the limit, so that attempts
        under way at once (one code, many streams) cannot ask the directory more than
        MAX_PASSWORD_FAILURES times between them: each bind is a guess, and a step towards
        the user's lockout. `end_password_attempt` gives the try back unless the password
        was wrong; one never ended (the PC gone, the agent stopped) stays spent.
        """
        with self._op(), self._write() as db:
            row = db.execute(
                "SELECT used_at, password_failures FROM tokens WHERE id = ?", (token_id,)
            ).fetchone()
            if row is None:
                return RedeemStatus.UNKNOWN
            used_at, failures = row
            if failures >= MAX_PASSWORD_FAILURES:
                return RedeemStatus.BURNT
            if used_at is not None:
                return RedeemStatus.REUSED
            db.execute(
                "UPDATE tokens SET password_failures = password_failures + 1 WHERE id = ?",
                (token_id,),
            )
            return RedeemStatus.OK

    def end_password_attempt(self, token_id: str, now: datetime, *, wrong: bool) -> bool:
        """The directory answered an attempt counted by `start_password_attempt`.

        A wrong password keeps its try; once the tries are all spent the code is burnt
        (marked used, so it is neither open nor redeemable): True for the attempt that
        burnt it, once. Anything else (the password right, the account disabled, the
        user outside the group, the directory unavailable) gives the try back, unless the
        code is spent already.
        """
        t = _ts(now)
        with self._op(), self._write() as db:
            if not wrong:
                db.execute(
                    "UPDATE tokens SET password_failures = password_failures - 1"
                    " WHERE id = ? AND used_at IS NULL AND password_failures > 0",
                    (token_id,),
                )
                return False
            burnt = db.execute(
                "UPDATE tokens SET used_at = ? WHERE id = ? AND used_at IS NULL"
                " AND password_failures >= ?",
                (t, token_id, MAX_PASSWORD_FAILURES),
            )
            return burnt.rowcount == 1

    # -- devices and certificates

    def record_certificate(
        self,
        device: str,
        serial: int | str,
        not_before: datetime,
        not_after: datetime,
        now: datetime,
        *,
        user: str | None = None,
    ) -> None:
        """Remember a certificate issued to `device` (creating the device if new).

        Sets enrolled_at on the first certificate, and the device's directory `user` when
        given (enrollment; a renewal keeps it). Keeps the newest KEEP_CERTIFICATES rows
        per device.
        """
        _check_device(device)
        serial_text = serial_hex(serial)
        t = _ts(now)
        with self._op(), self._write() as db:
            self._ensure_device(db, device)
            db.execute(
                "UPDATE devices SET enrolled_at = ? WHERE name = ? AND enrolled_at IS NULL",
                (t, device),
            )
            if user is not None:
                db.execute("UPDATE devices SET user = ? WHERE name = ?", (user, device))
            db.execute(
                "INSERT OR REPLACE INTO certificates"
                " (serial, device, not_before, not_after, issued_at) VALUES (?, ?, ?, ?, ?)",
                (serial_text, device, _ts(not_before), _ts(not_after), t),
            )
            db.execute(
                "DELETE FROM certificates WHERE device = ? AND serial NOT IN ("
                " SELECT serial FROM certificates WHERE device = ?"
                " ORDER BY not_after DESC, issued_at DESC LIMIT ?)",
                (device, device, KEEP_CERTIFICATES),
            )

    def newest_certificates(self, device: str, count: int = 2) -> list[CertificateRow]:
        """The last `count` certificates issued to `device`, newest first (by issue time,
        not expiry: a shorter lifetime makes the newest end before older ones)."""
        with self._op():
            rows = self._db.execute(
                "SELECT serial, not_before, not_after, issued_at FROM certificates"
                " WHERE device = ? ORDER BY issued_at DESC, rowid DESC LIMIT ?",
                (device, count),
            ).fetchall()
        return [
            CertificateRow(str(serial), *(datetime.fromtimestamp(t, dt.UTC) for t in (nb, na, at)))
            for serial, nb, na, at in rows
        ]

    def _ensure_device(self, db: sqlite3.Connection, device: str) -> bool:
        """Insert the device row if missing; True if it was created."""
        if db.execute("SELECT 1 FROM devices WHERE name = ?", (device,)).fetchone():
            return False
        (count,) = db.execute("SELECT COUNT(*) FROM devices").fetchone()
        if count >= MAX_DEVICES:
            raise RegistryError(f"{self.path}: the registry holds {MAX_DEVICES} devices already")
        db.execute("INSERT INTO devices (name, site) VALUES (?, ?)", (device, self.site))
        return True

    def revoke(self, device: str, now: datetime) -> RevokeResult:
        """Revoke `device` for good, and delete its unused tokens.

        A name never seen is revoked too (it may be a device issued offline that has not
        connected yet); the result says so, so the CLI can warn about a typo.
        """
        _check_device(device)
        t = _ts(now)
        with self._op(), self._write() as db:
            created = self._ensure_device(db, device)
            row = db.execute("SELECT revoked_at FROM devices WHERE name = ?", (device,)).fetchone()
            if row[0] is not None:
                return RevokeResult.ALREADY
            db.execute("UPDATE devices SET revoked_at = ? WHERE name = ?", (t, device))
            db.execute("DELETE FROM tokens WHERE device = ? AND used_at IS NULL", (device,))
            return RevokeResult.REVOKED_UNKNOWN if created else RevokeResult.REVOKED

    def is_revoked(self, device: str) -> bool:
        with self._op():
            row = self._db.execute(
                "SELECT revoked_at FROM devices WHERE name = ?", (device,)
            ).fetchone()
        return row is not None and row[0] is not None

    def revoked_devices(self) -> list[str]:
        """Names of all revoked devices, sorted."""
        with self._op():
            rows = self._db.execute(
                "SELECT name FROM devices WHERE revoked_at IS NOT NULL ORDER BY name"
            ).fetchall()
        return [name for (name,) in rows]

    def revocations(self) -> dict[str, datetime]:
        """Every revoked device's name and when it was revoked (its notice signs that)."""
        with self._op():
            rows = self._db.execute(
                "SELECT name, revoked_at FROM devices WHERE revoked_at IS NOT NULL ORDER BY name"
            ).fetchall()
        return {name: datetime.fromtimestamp(at, dt.UTC) for name, at in rows}

    def device_user(self, device: str) -> str | None:
        """The directory user `device` is bound to (None: none, or no such device)."""
        with self._op():
            row = self._db.execute("SELECT user FROM devices WHERE name = ?", (device,)).fetchone()
        return None if row is None or row[0] is None else str(row[0])

    def users_with_devices(self) -> dict[str, list[str]]:
        """Each directory user holding devices not revoked -> those device names (sorted)."""
        with self._op():
            rows = self._db.execute(
                "SELECT user, name FROM devices WHERE user IS NOT NULL AND revoked_at IS NULL"
                " ORDER BY user, name"
            ).fetchall()
        held: dict[str, list[str]] = {}
        for user, name in rows:
            held.setdefault(str(user), []).append(str(name))
        return held

    def touch(self, device: str, now: datetime) -> bool:
        """Record that `device` was seen; writes at most every TOUCH_INTERVAL per device.

        Returns True if it wrote. Creates the device row if missing (a device issued
        offline with `relay pki issue` appears in `relay device list` once it connects).
        """
        _check_device(device)
        t = _ts(now)
        last = self._touched.get(device)
        if last is not None and 0 <= t - last < TOUCH_INTERVAL:
            return False
        with self._op(), self._write() as db:
            self._ensure_device(db, device)
            db.execute(
                "UPDATE devices SET last_seen = ? WHERE name = ? AND"
                " (last_seen IS NULL OR last_seen < ?)",
                (t, device, t),
            )
            if len(self._touched) >= 4096:
                self._touched.clear()
            self._touched[device] = t
        return True

    def get_device(self, name: str) -> DeviceRow | None:
        rows = self._devices("WHERE d.name = ?", (name,))
        return rows[0] if rows else None

    def list_devices(self) -> list[DeviceRow]:
        """All devices, sorted by name."""
        return self._devices("", ())

    def _devices(self, where: str, args: tuple[object, ...]) -> list[DeviceRow]:
        query = (
            "SELECT d.name, d.site, d.enrolled_at, d.revoked_at, d.last_seen, d.user,"
            " (SELECT c.serial FROM certificates c WHERE c.device = d.name"
            "  ORDER BY c.not_after DESC, c.issued_at DESC LIMIT 1),"
            " (SELECT MAX(c.not_after) FROM certificates c WHERE c.device = d.name),"
            " (SELECT COUNT(*) FROM certificates c WHERE c.device = d.name)"
            f" FROM devices d {where} ORDER BY d.name"
        )
        with self._op():
            rows = self._db.execute(query, args).fetchall()
        return [
            DeviceRow(
                name=name,
                site=site,
                enrolled_at=_dt(enrolled),
                revoked_at=_dt(revoked),
                last_seen=_dt(seen),
                serial=serial,
                not_after=_dt(not_after),
                certificates=count,
                user=user,
            )
            for name, site, enrolled, revoked, seen, user, serial, not_after, count in rows
        ]

    def data_version(self) -> int:
        """Changes whenever another connection (another process) commits: cheap polling."""
        with self._op():
            (version,) = self._db.execute("PRAGMA data_version").fetchone()
        return int(version)


def _held_by_another(row: tuple[object, object] | None, user: str | None) -> bool:
    """Whether a device (`row`: its revoked_at and user, None if unknown) is in use by
    someone other than `user`.

    Any device row not revoked stands for a certificate that may still work (enrolled,
    or issued offline and seen), and enrollment records the code's user on the device:
    a code for another user (or for none, against a device that has one, and the other
    way round) would rebind the name while the old certificate keeps working. The same
    user enrolling the PC again (a lost identity) is fine, and so is a name that never
    had a user, again without one (no directory).
    """
    return row is not None and row[1] != user


def _with_status(result: Redeemed, status: RedeemStatus) -> Redeemed:
    return Redeemed(
        status, result.token_id, result.device, result.site, result.expires_at, result.user
    )


class RevocationWatcher:
    """Notices devices revoked by anyone (the CLI is another process), for pushing.

    `poll()` is cheap when nothing changed (one PRAGMA); the agent calls it every half
    second or so and sends what it returns to every gateway as an incremental update.
    """

    def __init__(self, registry: DeviceRegistry) -> None:
        self.registry = registry
        self._version: int | None = None
        self._known: set[str] = set()

    def snapshot(self) -> list[str]:
        """All revoked names now; resets what poll() compares against."""
        self._version = self.registry.data_version()
        names = self.registry.revoked_devices()
        self._known = set(names)
        return names

    def poll(self) -> list[str]:
        """Names revoked since the last snapshot()/poll() (sorted; empty if none)."""
        version = self.registry.data_version()
        if version == self._version:
            return []
        self._version = version
        names = self.registry.revoked_devices()
        new = sorted(set(names) - self._known)
        self._known = set(names)
        return new

    def note_local_change(self) -> None:
        """Call after revoking through the same DeviceRegistry object: data_version only moves
        for other connections' commits, so force the next poll() to look."""
        self._version = None
