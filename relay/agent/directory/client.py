"""The directory client: ldap3 (pure Python, so also on a Windows agent) in worker
threads, at most `max_connections` at a time, each operation on its own TLS connection
(ldaps:// or StartTLS, the server's certificate checked against `ca` and its name).

The periodic re-check (`lookup`, `check`) takes at most `max_connections - 1` of them,
so a person waiting (an IT login, an enrollment: `authenticate`, `is_admin`) always
finds one free, whatever the re-check is doing. A slot is held until its worker thread
is done, also when the caller stopped waiting (cancelled, timed out): the operation runs
out its own timeout in the thread, and the next one must not queue behind it unseen.

Every network operation is bounded by `timeout` (connect and each answer). Anything
that keeps the directory from answering is DirectoryUnavailable, and so is a user bind
answered with anything but success or invalidCredentials (49): busy (51), unavailable
(52), unwillingToPerform (53), other (80)... say nothing about the password. A directory
that answers something we cannot trust (the user or group twice, a group that does not
exist) is DirectoryError. The re-check changes nothing on either.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import re
import secrets
import socket
import ssl
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import ldap3
from ldap3.core.exceptions import LDAPException

from relay.agent.directory.filters import check_username, match_filter, user_filter
from relay.agent.directory.settings import DirectorySettings

__all__ = [
    "MAX_PASSWORD",
    "Directory",
    "DirectoryError",
    "DirectoryUnavailable",
    "DirectoryUser",
    "Refusal",
    "RefusalReason",
    "UserStatus",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Longest password we pass on to the directory (bytes of UTF-8).
MAX_PASSWORD: Final = 1024
_NO_SUCH_OBJECT: Final = 32
_SIZE_LIMIT_EXCEEDED: Final = 4
#: The RDN of the throwaway DN an unknown user's login binds as (`_bind_as_nobody`),
#: followed by random hex: a name no directory entry has, so no account counts the bind.
_NOBODY_RDN: Final = "cn=relay-no-such-user-"
#: Entries a search asks for: two tell "more than one" from "one".
_SIZE_LIMIT: Final = 2
_INVALID_CREDENTIALS: Final = 49
#: The sub-code in Active Directory's diagnostic message for a refused bind (49).
_AD_DATA: Final = re.compile(r"\bdata ([0-9a-fA-F]{3,8})\b")
#: What those sub-codes mean, for the audit trail (Microsoft's "LDAP error 49" list).
_AD_DATA_MEANINGS: Final = {
    "525": "user not found",
    "52e": "invalid credentials",
    "530": "not permitted to log on at this time",
    "531": "not permitted to log on at this workstation",
    "532": "password expired",
    "533": "account disabled",
    "568": "too many security identifiers",
    "701": "account expired",
    "773": "password must be reset",
    "775": "account locked",
}


class DirectoryError(Exception):
    """The directory answered, but not something to act on; str() is one line."""


class DirectoryUnavailable(DirectoryError):
    """The directory could not be reached, refused our service bind, or timed out."""


class RefusalReason(enum.Enum):
    """Why authenticate() said no. `message` is the line for the user (it never tells
    an unknown user from a wrong password)."""

    WRONG_PASSWORD = ("wrong_password", "wrong password")
    UNKNOWN_USER = ("unknown_user", "wrong password")
    DISABLED = ("disabled", "account disabled")
    NOT_IN_GROUP = ("not_in_group", "not in group")
    UNAVAILABLE = ("unavailable", "directory unavailable")

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Refusal:
    """authenticate() said no: `reason` for the user, `detail` for the audit trail."""

    reason: RefusalReason
    detail: str

    @property
    def message(self) -> str:
        return self.reason.message


@dataclass(frozen=True)
class DirectoryUser:
    """A user whose password the directory accepted just now."""

    name: str
    dn: str
    in_group: bool  # may hold devices
    is_admin: bool  # member of admin_group


class UserStatus(enum.Enum):
    """A user's standing at the re-check; anything but ACTIVE loses their devices."""

    ACTIVE = "active"
    DISABLED = "disabled"
    DELETED = "deleted"
    NOT_IN_GROUP = "not_in_group"


class _Operation:
    """The connections one operation (one `_run` job) opened, so that a caller who stops
    waiting (a login past its 15 s, a re-check past its deadline, a task cancelled) can
    cut them: ldap3's timeouts bound each read, not the whole, so a directory that
    trickles a byte now and then held the worker thread, and its slot, for ever.

    Cutting is a shutdown() of each socket (portable; the file descriptor stays the
    thread's to close): the thread's read returns at once, its operation fails
    (DirectoryUnavailable) and the slot is free. A connection opened after the cut is
    refused before it sends anything. `opened` registers before connecting and `check`
    looks after: a cut between the two is seen by one of them.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connections: list[ldap3.Connection] = []
        self.cut = False

    def opened(self, conn: ldap3.Connection) -> None:
        with self._lock:
            self.check()
            self._connections.append(conn)

    def check(self) -> None:
        if self.cut:
            raise DirectoryUnavailable("the directory operation was given up (too slow)")

    def cut_all(self) -> None:
        """From the event loop: end the operation's reads now."""
        with self._lock:
            self.cut = True
            connections = list(self._connections)
        for conn in connections:
            sock = conn.socket
            if sock is not None:
                with contextlib.suppress(OSError):
                    # socket.socket's own shutdown also on a TLS socket: SSLSocket's
                    # would change its TLS state under the reading thread.
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)


#: The operation of the job a worker thread runs (set by `Directory._run`).
_current = threading.local()


def _in_operation(operation: _Operation, job: Callable[[], T]) -> T:
    _current.operation = operation
    try:
        return job()
    finally:
        _current.operation = None


def _release(held: list[asyncio.Semaphore]) -> None:
    for slots in held:
        slots.release()


def _close(conn: ldap3.Connection) -> None:
    """Unbind and close; a connection that broke half-way may fail to, harmlessly."""
    with contextlib.suppress(LDAPException, OSError):
        conn.unbind()


def _one_line(text: object, limit: int = 200) -> str:
    return " ".join(str(text).split())[:limit]


def _bind_refusal(dn: str, result: dict[str, Any]) -> Refusal:
    """What a user bind that failed means. Only invalidCredentials (49) is the
    directory's no; Active Directory also answers 49 for a disabled, expired or locked
    account (with "data 533", "data 701", "data 775"... in the diagnostic message), a
    refusal as well, the data code kept for the audit trail. Any other code (51 busy,
    52 unavailable, 53 unwillingToPerform, 80 other...) says nothing about the password:
    DirectoryUnavailable, so that an outage is never counted as a wrong password (the IT
    pages' login limit, an enrollment code's tries)."""
    code = result.get("result")
    if code == _INVALID_CREDENTIALS:
        return Refusal(RefusalReason.WRONG_PASSWORD, f"bind as {dn} refused{_ad_data(result)}")
    description = _one_line(result.get("description") or "no result", 60)
    raise DirectoryUnavailable(
        f"the directory answered the bind as {dn} with {description} ({code}), not a verdict "
        "on the password"
    )


def _ad_data(result: dict[str, Any]) -> str:
    """Active Directory's reason for a 49 (", data 775: account locked"), or ""."""
    found = _AD_DATA.search(str(result.get("message") or ""))
    if found is None:
        return ""
    data = found.group(1).lower()
    return f", data {data}: {_AD_DATA_MEANINGS.get(data, 'unknown reason')}"


class Directory:
    """One configured directory. Thread-safe; each call opens and closes its connections."""

    def __init__(self, settings: DirectorySettings) -> None:
        self.settings = settings
        self._slots = asyncio.Semaphore(settings.max_connections)
        # What the re-check may hold of them: one fewer (none fewer with only one).
        self._background = asyncio.Semaphore(self.background_slots)
        # Its own threads: a slow directory never takes the default executor's threads
        # (the registry's SQLite calls use those).
        self._threads = ThreadPoolExecutor(settings.max_connections, "directory")
        # ldap3 packs its socket timeouts as whole seconds (struct 'LL').
        self._seconds = max(1, math.ceil(settings.timeout))
        self._tls = ldap3.Tls(
            validate=ssl.CERT_REQUIRED,
            ca_certs_file=str(settings.ca) if settings.ca is not None else None,
            sni=settings.host,
        )

    def _new_server(self) -> ldap3.Server:
        """A Server for one connection. Not one shared: ldap3 marks an address that
        failed as unavailable and refuses it ("invalid server address") for the next
        seconds, so a directory back from an outage looked down a while longer (and the
        shared object was changed from several threads)."""
        s = self.settings
        return ldap3.Server(
            s.host,
            port=s.port,
            use_ssl=s.use_ssl,
            tls=self._tls if s.encrypted else None,
            get_info=ldap3.NONE,
            connect_timeout=self._seconds,
        )

    @property
    def background_slots(self) -> int:
        """How many operations the re-check may have under way at once."""
        return max(1, self.settings.max_connections - 1)

    # -- public, async

    async def authenticate(
        self, user: str, password: str, *, admin: bool = False
    ) -> DirectoryUser | Refusal:
        """Bind as `user` with `password`, then check the device group (`admin`: the
        admin group). Never raises for what the user typed or the directory's state."""
        try:
            name = check_username(user)
        except ValueError as exc:
            return Refusal(RefusalReason.UNKNOWN_USER, str(exc))
        if not password:
            # An empty password would be an "unauthenticated bind" (RFC 4513 5.1.2),
            # which many servers answer with success.
            return Refusal(RefusalReason.WRONG_PASSWORD, "empty password")
        if len(password.encode("utf-8", "surrogatepass")) > MAX_PASSWORD:
            return Refusal(RefusalReason.WRONG_PASSWORD, "password too long")
        if admin and self.settings.admin_group is None:
            return Refusal(RefusalReason.NOT_IN_GROUP, "no directory.admin_group configured")
        try:
            return await self._run(lambda: self._authenticate(name, password, admin))
        except DirectoryError as exc:
            return Refusal(RefusalReason.UNAVAILABLE, _one_line(exc))

    async def lookup(self, user: str) -> UserStatus:
        """`user`'s standing now. Raises DirectoryUnavailable / DirectoryError."""
        try:
            name = check_username(user)
        except ValueError:
            return UserStatus.DELETED  # no such name can exist in the directory
        return await self._run(lambda: self._lookup(name), background=True)

    async def is_admin(self, user: str) -> bool:
        """Whether `user` exists, is not disabled and is in admin_group now."""
        if self.settings.admin_group is None:
            return False
        try:
            name = check_username(user)
        except ValueError:
            return False
        return await self._run(lambda: self._is_admin(name))

    async def check(self) -> None:
        """The service bind alone (for readiness). Raises DirectoryUnavailable."""
        await self._run(self._check, background=True)

    async def _run(self, job: Callable[[], T], *, background: bool = False) -> T:
        """`job` in a worker thread once a slot is free (`background`: one the re-check
        may take). The semaphores bound threads and connections; ldap3's connect and
        receive timeouts bound each read, and a caller that stops waiting (cancelled:
        a timeout around this call) cuts the job's connections (`_Operation`), so a
        directory that trickles bytes holds the slot no longer than the caller waits."""
        held: list[asyncio.Semaphore] = []
        operation = _Operation()
        try:
            for slots in (self._background, self._slots) if background else (self._slots,):
                await slots.acquire()
                held.append(slots)
            done = self._threads.submit(_in_operation, operation, job)
        except BaseException:
            for slots in held:
                slots.release()
            raise
        loop = asyncio.get_running_loop()

        def free(_: object) -> None:
            # In the worker thread (or here, if cancelled before it started).
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing waits
                loop.call_soon_threadsafe(_release, held)

        done.add_done_callback(free)
        try:
            return await asyncio.wrap_future(done)
        except asyncio.CancelledError:
            operation.cut_all()  # the thread ends now, not when the directory is done
            raise

    def close(self) -> None:
        """Stop the worker threads (an operation under way ends within its timeout)."""
        self._threads.shutdown(wait=False, cancel_futures=True)

    # -- blocking, in a worker thread

    def _connect(self, dn: str, password: str) -> ldap3.Connection:
        """An open, bound connection; DirectoryUnavailable if the server cannot be used
        for any reason but the credentials (then the result code is left on it)."""
        conn = ldap3.Connection(
            self._new_server(),
            user=dn,
            password=password,
            authentication=ldap3.SIMPLE,
            auto_bind=ldap3.AUTO_BIND_NONE,
            receive_timeout=self._seconds,
            raise_exceptions=False,
            read_only=True,
            check_names=True,
            # Never follow a referral: it would send our credentials to another server.
            auto_referrals=False,
        )
        operation: _Operation | None = getattr(_current, "operation", None)
        try:
            if operation is not None:
                operation.opened(conn)
            conn.open()
            if operation is not None:
                operation.check()
            if self.settings.start_tls and not conn.start_tls():
                raise DirectoryUnavailable("StartTLS refused by the directory")
            conn.bind()
        except (LDAPException, OSError) as exc:
            _close(conn)
            why = _one_line(exc)
            if "doesn't match any name" in str(exc):  # ldap3's words; it prints the cert
                why = f"its TLS certificate is not valid for the name {self.settings.host}"
            raise DirectoryUnavailable(
                f"cannot use the directory at {self.settings.url}: {why}"
            ) from None
        except DirectoryUnavailable:
            _close(conn)
            raise
        return conn

    def _service(self) -> ldap3.Connection:
        conn = self._connect(self.settings.bind_dn, self.settings.bind_password)
        if not conn.bound:
            result = conn.result or {}
            _close(conn)
            raise DirectoryUnavailable(
                f"the directory refused the service bind ({result.get('description', '?')})"
            )
        return conn

    def _check(self) -> None:
        _close(self._service())

    def _search(
        self, conn: ldap3.Connection, base: str, query: str, scope: Any, attributes: list[str]
    ) -> list[dict[str, Any]] | None:
        """Entries found, or None when `base` does not exist. DirectoryUnavailable on
        anything else but success."""
        try:
            conn.search(
                base, query, search_scope=scope, attributes=attributes, size_limit=_SIZE_LIMIT
            )
        except LDAPException as exc:
            raise DirectoryUnavailable(f"directory search failed: {_one_line(exc)}") from None
        code = (conn.result or {}).get("result")
        if code == _NO_SUCH_OBJECT:
            return None
        if code not in (0, _SIZE_LIMIT_EXCEEDED):  # we asked for 2 entries at most
            description = (conn.result or {}).get("description", code)
            raise DirectoryUnavailable(f"directory search failed ({description})")
        entries = [e for e in conn.response or [] if e.get("type") == "searchResEntry"]
        if code == _SIZE_LIMIT_EXCEEDED and len(entries) < _SIZE_LIMIT:
            # The server's own limit cut the answer shorter than ours: "no user" (a
            # deleted user for the re-check, whose devices it revokes) or "one user"
            # would be a guess.
            raise DirectoryError(
                f"the directory cut its answer short at {len(entries)} entries "
                "(its own size limit): not an answer to act on"
            )
        return entries

    def _find_user(self, conn: ldap3.Connection, name: str) -> str | None:
        """The user's DN, None if there is none. Two entries: DirectoryError."""
        query = user_filter(self.settings.user_filter, name)
        found = self._search(conn, self.settings.user_base, query, ldap3.SUBTREE, ["1.1"])
        if found is None:
            raise DirectoryError(f"directory.user_base {self.settings.user_base} does not exist")
        if len(found) > 1:
            raise DirectoryError(f"the directory has more than one entry for {name!r}")
        return str(found[0]["dn"]) if found else None

    def _member(self, conn: ldap3.Connection, group: str, dn: str) -> bool:
        query = match_filter(self.settings.member_attribute, dn)
        found = self._search(conn, group, query, ldap3.BASE, ["1.1"])
        if found is None:
            raise DirectoryError(f"the group {group} does not exist in the directory")
        return bool(found)

    def _disabled(self, conn: ldap3.Connection, dn: str) -> bool:
        if self.settings.disabled_filter is None:
            return False
        found = self._search(conn, dn, self.settings.disabled_filter, ldap3.BASE, ["1.1"])
        return bool(found)

    def _authenticate(self, name: str, password: str, admin: bool) -> DirectoryUser | Refusal:
        conn = self._service()
        try:
            dn = self._find_user(conn, name)
            if dn is None:
                self._bind_as_nobody(conn)
                return Refusal(RefusalReason.UNKNOWN_USER, f"no user {name!r} in the directory")
            user_conn = self._connect(dn, password)
            bound = user_conn.bound
            result = user_conn.result or {}
            _close(user_conn)
            if not bound:
                if self._disabled(conn, dn):  # a locked account's bind fails too
                    return Refusal(RefusalReason.DISABLED, f"{dn} matches the disabled filter")
                return _bind_refusal(dn, result)
            if self._disabled(conn, dn):
                return Refusal(RefusalReason.DISABLED, f"{dn} matches the disabled filter")
            in_group = self._member(conn, self.settings.group, dn)
            admin_group = self.settings.admin_group
            is_admin = admin_group is not None and self._member(conn, admin_group, dn)
            if not (is_admin if admin else in_group):
                wanted = admin_group if admin else self.settings.group
                return Refusal(RefusalReason.NOT_IN_GROUP, f"{dn} is not a member of {wanted}")
            return DirectoryUser(name, dn, in_group, is_admin)
        finally:
            _close(conn)

    def _bind_as_nobody(self, conn: ldap3.Connection) -> None:
        """The work a wrong password costs (a connection, a bind, the disabled check),
        for a name the directory does not have: without it that refusal came a TLS
        handshake and a bind sooner (half the time), so a login's time told which
        names exist. The bind is as a DN no entry has, with a random password (no
        account's failure count or lockout sees it, the typed password is not sent
        twice); its answer is not looked at."""
        dn = f"{_NOBODY_RDN}{secrets.token_hex(8)},{self.settings.user_base}"
        _close(self._connect(dn, secrets.token_urlsafe(16)))
        self._disabled(conn, dn)

    def _lookup(self, name: str) -> UserStatus:
        conn = self._service()
        try:
            dn = self._find_user(conn, name)
            if dn is None:
                return UserStatus.DELETED
            if self._disabled(conn, dn):
                return UserStatus.DISABLED
            if not self._member(conn, self.settings.group, dn):
                return UserStatus.NOT_IN_GROUP
            return UserStatus.ACTIVE
        finally:
            _close(conn)

    def _is_admin(self, name: str) -> bool:
        assert self.settings.admin_group is not None
        conn = self._service()
        try:
            dn = self._find_user(conn, name)
            if dn is None or self._disabled(conn, dn):
                return False
            return self._member(conn, self.settings.admin_group, dn)
        finally:
            _close(conn)
