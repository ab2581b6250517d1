"""Throw-away network namespaces that contain only ``lo``.

Orthanc and DCMTK's SCPs bind every address; inside a namespace of our own, "every
address" is loopback, so nothing they open is reachable from outside. Names are
``dmzr-<pid>-<n>``: the pid of the test process that owns the namespace, so that a
later run can tell a namespace left by a crashed run (owner gone) from one of a run
that is still going (another engineer's session on the same machine).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import itertools
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from socket import socket as Socket
from types import TracebackType
from typing import Any, Self, TypeVar

from .tools import HarnessError, require_root, tool_env, unavailable

PREFIX = "dmzr-"
NETNS_DIR = Path("/run/netns")
IP_TIMEOUT = 10.0  # seconds for one `ip` command
_CLONE_NEWNET = 0x40000000

_T = TypeVar("_T")
_counter = itertools.count()
_live: dict[str, NetNS] = {}


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT, check=False
    )
    if check and proc.returncode != 0:
        raise HarnessError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_pid(name: str) -> int | None:
    parts = name.split("-")
    if len(parts) == 3 and name.startswith(PREFIX) and parts[1].isdigit():
        return int(parts[1])
    return None


def list_namespaces() -> list[str]:
    """Names of all network namespaces that carry our prefix."""
    out = _ip("netns", "list").stdout
    names = (line.split()[0] for line in out.splitlines() if line.strip())
    return [name for name in names if name.startswith(PREFIX)]


def _kill_members(name: str, grace: float = 5.0) -> None:
    """Stop every process still inside namespace ``name`` (all of them are ours)."""
    pids = [int(p) for p in _ip("netns", "pids", name, check=False).stdout.split()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            pids = [pid for pid in pids if _pid_alive(pid) and not _is_zombie(pid)]
            if not pids:
                return
            time.sleep(0.05)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _delete(name: str) -> None:
    _kill_members(name)
    _ip("netns", "del", name, check=False)


def sweep_stale() -> list[str]:
    """Delete namespaces left by test runs whose process is gone; returns their names."""
    removed = []
    for name in list_namespaces():
        owner = _owner_pid(name)
        if owner is None:
            continue
        ours_but_unknown = owner == os.getpid() and name not in _live
        if ours_but_unknown or not _pid_alive(owner):
            _delete(name)
            removed.append(name)
    return removed


@functools.cache
def _sweep_once() -> None:
    """Sweep once per test process, before its first namespace."""
    sweep_stale()


@atexit.register
def _close_all() -> None:
    for ns in list(_live.values()):
        ns.close()


class NetNS:
    """A network namespace with only ``lo`` (up), deleted on ``close()``.

    Use as a context manager. ``exec_argv``/``popen``/``run`` start programs inside it
    (with TCP_NODELAY=1 in their environment); ``socket``/``create_connection`` give
    sockets of this test process that live inside it (for in-process clients and
    servers, e.g. ``asyncio.start_server(sock=...)``).
    """

    def __init__(self) -> None:
        self.name = f"{PREFIX}{os.getpid()}-{next(_counter)}"
        self._created = False

    # -- lifecycle -----------------------------------------------------------------

    def create(self) -> Self:
        """Create the namespace and bring ``lo`` up (skips, or fails in CI, without root)."""
        require_root()
        _sweep_once()
        proc = _ip("netns", "add", self.name, check=False)
        if proc.returncode != 0:
            unavailable(f"cannot create network namespace: {proc.stderr.strip()}")
        self._created = True
        _live[self.name] = self
        try:
            _ip("-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop whatever still runs inside, then delete the namespace. Idempotent."""
        if not self._created:
            return
        self._created = False
        _live.pop(self.name, None)
        _delete(self.name)

    def __enter__(self) -> Self:
        return self.create()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"NetNS({self.name!r})"

    # -- programs ------------------------------------------------------------------

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that it runs inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def popen(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, **kwargs: Any
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` inside the namespace; ``env`` adds to ours plus TCP_NODELAY=1.

        ``ip netns exec`` execs the program, so the Popen pid is the program's pid.
        """
        return subprocess.Popen(self.exec_argv(argv), env=tool_env(env), **kwargs)

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
        check: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the namespace to completion, capturing text output.

        Raises ``subprocess.TimeoutExpired`` (after killing it) past ``timeout`` seconds.
        """
        return subprocess.run(
            self.exec_argv(argv),
            env=tool_env(env),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    # -- in-process sockets ----------------------------------------------------------

    def join_current_thread(self) -> None:
        """Move the calling thread (only it) into this namespace, for good.

        setns(CLONE_NEWNET) is per-thread; threads the caller starts afterwards inherit
        the namespace. Meant for threads made by ``start_thread``/``call_inside``.
        """
        path = NETNS_DIR / self.name
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(fd, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns({path}): {os.strerror(err)}")
        finally:
            os.close(fd)

    def start_thread(
        self, target: Callable[[], object], *, name: str | None = None
    ) -> threading.Thread:
        """Start a daemon thread that runs ``target`` inside this namespace.

        For in-process components (an asyncio loop, a pynetdicom AE) that must open
        their own sockets next to Orthanc; threads they start stay inside too.
        """

        def run() -> None:
            self.join_current_thread()
            target()

        thread = threading.Thread(target=run, name=name or f"netns-{self.name}", daemon=True)
        thread.start()
        return thread

    def call_inside(self, fn: Callable[[], _T], *, timeout: float = 10.0) -> _T:
        """Run ``fn`` on a short-lived thread inside this namespace; return its result.

        A socket created there stays in this namespace for its whole life, whichever
        thread uses it later.
        """
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                self.join_current_thread()
                box["value"] = fn()
            except BaseException as exc:
                box["error"] = exc

        thread = threading.Thread(target=target, name=f"netns-{self.name}", daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            raise HarnessError(f"call inside {self.name} did not finish within {timeout} s")
        if "error" in box:
            raise box["error"]
        return box["value"]  # type: ignore[no-any-return]

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> Socket:
        """A new socket inside this namespace (TCP_NODELAY set for TCP)."""
        sock = self.call_inside(lambda: socket.socket(family, type))
        if type == socket.SOCK_STREAM and family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def create_connection(self, host: str, port: int, *, timeout: float) -> Socket:
        """A TCP connection from inside this namespace to ``host:port`` (loopback)."""
        sock = self.socket()
        try:
            sock.settimeout(timeout)
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return sock

    def listen(self, port: int = 0, host: str = "127.0.0.1", backlog: int = 64) -> Socket:
        """A listening TCP socket inside this namespace (``port=0``: any free port)."""
        sock = self.socket()
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        return sock


__all__ = ["NETNS_DIR", "PREFIX", "NetNS", "list_namespaces", "sweep_stale"]
