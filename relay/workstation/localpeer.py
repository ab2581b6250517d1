"""Whose program is on the other end of a loopback connection (`local_access: same-user`).

The workstation's listeners (the DICOM node, DICOMweb and the viewer, port forwards)
bind loopback only, but loopback does not say which account connects: on a PC shared by
several accounts at once (a terminal server, fast user switching) every account could
read the hospital's studies through this device's identity. With `same-user` each new
connection is admitted only if the socket at its far end belongs to the account the
workstation runs as; the platform tells that:

- Linux: the `uid` column of /proc/net/tcp and /proc/net/tcp6, the account that made the
  peer's socket: one read, no process is looked at.
- Windows: psutil (GetExtendedTcpTable) gives the process that owns the peer's socket,
  and its account name is compared with ours; a process whose account cannot be read
  (another user's, without rights to it) is another account.
- macOS: another account's sockets are not listed to us without root, so the peer's
  socket is looked for among the processes of our own account (psutil); not found: not
  ours.

A connection whose far end cannot be found (it closed meanwhile), or whose lookup fails,
is refused. The lookup blocks (measured on Linux: 2-5 ms for /proc; psutil's table 25-35
ms, its per-process scan 200-320 ms), so callers on the event loop run it in a thread.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from relay.ops.loglimit import LogLimiter

__all__ = [
    "ACCESS_CHOICES",
    "DEFAULT_ACCESS",
    "REFUSAL",
    "AccountGate",
    "LocalAccess",
    "ProcTcpEntry",
    "is_supported",
    "parse_proc_tcp",
    "same_user",
]

log = logging.getLogger(__name__)

LocalAccess = Literal["any", "same-user"]
ACCESS_CHOICES: Final[tuple[LocalAccess, ...]] = ("any", "same-user")
DEFAULT_ACCESS: Final[LocalAccess] = "any"

#: The refusal, as the workstation's log line and the HTTP answer's text say it.
REFUSAL: Final = "another account on this PC (local_access: same-user)"

_PROC_TABLES: Final = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
#: Lines of a /proc/net table read at most (a busy server has tens of thousands).
MAX_PROC_LINES: Final = 1_000_000

Endpoint = tuple[str, int]
IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def is_supported(platform: str = sys.platform) -> bool:
    """Whether this platform can tell the account at the far end (Linux, Windows, macOS)."""
    return platform.startswith("linux") or platform in ("win32", "darwin")


def _ip(text: str) -> IP:
    """The address, an IPv4-mapped IPv6 one as IPv4 (a dual-stack client's socket)."""
    addr = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _same(endpoint: Endpoint, ip: IP, port: int) -> bool:
    return endpoint[1] == port and _ip(endpoint[0]) == ip


# -- Linux ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcTcpEntry:
    """One socket of /proc/net/tcp{,6}: its two ends and the account that made it."""

    local: tuple[IP, int]
    remote: tuple[IP, int]
    uid: int


def _proc_address(text: str) -> tuple[IP, int]:
    """'0100007F:1F90' (the address as 32-bit words in host order, the port in hex)."""
    hex_addr, hex_port = text.split(":")
    raw = bytes.fromhex(hex_addr)
    if len(raw) not in (4, 16):
        raise ValueError(f"address of {len(raw)} bytes")
    if sys.byteorder == "little":  # each 32-bit word is printed as a host-order integer
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    addr: IP = ipaddress.IPv4Address(raw) if len(raw) == 4 else ipaddress.IPv6Address(raw)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr, int(hex_port, 16)


def parse_proc_tcp(lines: Iterable[str]) -> Iterator[ProcTcpEntry]:
    """The sockets of a /proc/net/tcp or tcp6 text (its header line and any line that
    does not parse are skipped)."""
    for line in lines:
        fields = line.split()
        if len(fields) < 8 or not fields[0].endswith(":"):
            continue
        try:
            yield ProcTcpEntry(_proc_address(fields[1]), _proc_address(fields[2]), int(fields[7]))
        except ValueError:
            continue


def _uid_of_peer_linux(peer: Endpoint, local: Endpoint) -> int | None:
    """The uid that made the socket at `peer` whose far end is `local`, or None."""
    peer_ip, local_ip = _ip(peer[0]), _ip(local[0])
    for table in _PROC_TABLES:
        try:
            with table.open(encoding="ascii", errors="replace") as f:
                for entry in parse_proc_tcp(itertools.islice(f, MAX_PROC_LINES)):
                    if entry.local == (peer_ip, peer[1]) and entry.remote == (local_ip, local[1]):
                        return entry.uid
        except FileNotFoundError:  # no IPv6 in this kernel
            continue
    return None


# -- Windows and macOS (psutil) ---------------------------------------------------------


def _owner_pid_by_table(peer: Endpoint, local: Endpoint) -> int | None:
    """The process owning the socket at `peer` whose far end is `local` (Windows: the
    system's TCP table lists every socket with its process)."""
    import psutil  # Windows and macOS only: loaded on first use

    peer_ip, local_ip = _ip(peer[0]), _ip(local[0])
    for conn in psutil.net_connections(kind="tcp"):
        if not conn.laddr or not conn.raddr or conn.pid is None:
            continue
        if _same(conn.laddr, peer_ip, peer[1]) and _same(conn.raddr, local_ip, local[1]):
            return int(conn.pid)
    return None


def _same_user_by_table(peer: Endpoint, local: Endpoint) -> bool:
    import psutil

    pid = _owner_pid_by_table(peer, local)
    if pid is None:
        return False
    try:
        return bool(psutil.Process(pid).username() == psutil.Process().username())
    except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
        return False  # an account we may not read is not ours


def _same_user_by_own_processes(peer: Endpoint, local: Endpoint) -> bool:
    """macOS: only our own processes' sockets are listed to us, so look among them."""
    import psutil

    peer_ip, local_ip = _ip(peer[0]), _ip(local[0])
    me = psutil.Process()
    ours = me.uids().effective
    for proc in psutil.process_iter():
        try:
            if proc.uids().effective != ours:
                continue
            for conn in proc.net_connections(kind="tcp"):
                if not conn.laddr or not conn.raddr:
                    continue
                if _same(conn.laddr, peer_ip, peer[1]) and _same(conn.raddr, local_ip, local[1]):
                    return True
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return False


def same_user(peer: Endpoint, local: Endpoint, *, platform: str = sys.platform) -> bool:
    """Whether the socket at `peer` (connected to our `local`) belongs to our account.
    Blocking."""
    if platform.startswith("linux"):
        return _uid_of_peer_linux(peer, local) == os.geteuid()  # type: ignore[attr-defined,unused-ignore]
    if platform == "win32":
        return _same_user_by_table(peer, local)
    if platform == "darwin":
        return _same_user_by_own_processes(peer, local)
    raise NotImplementedError(f"local_access: same-user is not available on {platform}")


# -- what the listeners call ------------------------------------------------------------


class AccountGate:
    """The workstation's admission by account, shared by its listeners: `admit(listener,
    peer, local)` (blocking) says yes or no and logs refusals, limited per listener (a
    local program retrying in a loop must not fill the log). `access` may change at a
    reload; it applies to connections opened after it. `admit` runs in worker threads,
    several at once (the lookups block): the count and the log limiter are updated under
    a lock (unlocked, refusals were lost from both); the lookup runs outside it."""

    def __init__(
        self,
        access: LocalAccess = DEFAULT_ACCESS,
        check: Callable[[Endpoint, Endpoint], bool] = same_user,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.access = access
        self._check = check
        self._clock = clock
        self._lines = LogLimiter()
        self._counting = threading.Lock()  # guards `refused` and `_lines`
        self.refused: Counter[str] = Counter()  # by listener

    @property
    def anyone(self) -> bool:
        """No check to make (`local_access: any`): callers skip the thread hop."""
        return self.access == "any"

    def admit(self, listener: str, peer: Endpoint, local: Endpoint) -> bool:
        if self.anyone:
            return True
        try:
            ok = self._check(peer, local)
        except Exception as exc:  # a lookup that fails admits no one
            ok = False
            reason = f"its account could not be checked ({type(exc).__name__}: {exc})"
        else:
            reason = REFUSAL
        if not ok:
            with self._counting:
                self.refused[listener] += 1
                held = self._lines.allow(listener, self._clock())
            if held is not None:
                more = f" ({held} more not logged)" if held else ""
                log.warning("%s: refused a connection from %s:%d: %s%s",
                            listener, peer[0], peer[1], reason, more)  # fmt: skip
        return ok

    def refused_total(self) -> int:
        """Refusals over every listener, read under the lock: a scrape on the loop sums
        while lookup threads may add a listener's first count (iterating `refused`
        unlocked could raise "dictionary changed size during iteration")."""
        with self._counting:
            return sum(self.refused.values())
