"""Ports in tests, without races: nothing here binds a port, releases it and lets another
process bind it later (on a busy machine anyone can take it in between).

- A relay role is configured with port 0 and reports the port it got in its JSON log
  (relay.ops.listening): `wait_listening` / `await_listening` read that line.
- A port that must be known before its process runs, or survive a restart of it (the
  gateway's, which agents and workstations dial), is `reserve`d here, kept for the whole
  test, and handed to each incarnation of the process as systemd socket activation does
  (`handover`): the port is never released.
- `dead_port` is a port where nothing listens and nothing else can start listening while
  the test runs: a bound socket that never listens (connections to it are refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "HOST",
    "Bound",
    "await_listening",
    "dead_port",
    "handover",
    "listening_events",
    "reserve",
    "wait_listening",
]

HOST = "127.0.0.1"
WAIT = 30.0
POLL = 0.02  # seconds between two reads of a log that has not said it yet

_FIRST_FD = 3  # SD_LISTEN_FDS_START
_PARKING_FD = 200  # the wrapper moves fds here first, so that no move clobbers another


class Bound(NamedTuple):
    host: str
    port: int


def _parse(address: str) -> Bound:
    host, _, port = address.rpartition(":")
    return Bound(host.strip("[]"), int(port))


def listening_events(log: Path, since: int = 0) -> list[dict[str, Any]]:
    """The `listening` events in a role's JSON log from byte offset `since` on."""
    try:
        with log.open("rb") as f:
            f.seek(since)
            data = f.read()
    except FileNotFoundError:
        return []
    events = []
    for line in data.splitlines():
        if b'"listening"' not in line:
            continue
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("event") == "listening":
                events.append(entry)
    return events


def _find(log: Path, what: str, since: int, match: Mapping[str, str]) -> Bound | None:
    for entry in listening_events(log, since):
        if entry.get("what") == what and all(entry.get(k) == v for k, v in match.items()):
            return _parse(str(entry["address"]))
    return None


def _gone(log: Path, what: str, alive: Callable[[], bool] | None) -> AssertionError | None:
    if alive is not None and not alive():
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        return AssertionError(f"{log.name}: exited before listening ({what})\n{tail}")
    return None


def wait_listening(
    log: Path,
    what: str,
    *,
    since: int = 0,
    alive: Callable[[], bool] | None = None,
    within: float = WAIT,
    **match: str,
) -> Bound:
    """Where listener `what` of the role that writes `log` is bound, once it says so.

    `since`: a byte offset of the log (a restarted role appends to it); `match`: other
    fields of the line (`service="echo"` for a forward). Fails fast if `alive()` turns
    false, and after `within` seconds.
    """
    deadline = time.monotonic() + within
    while (found := _find(log, what, since, match)) is None:
        if (error := _gone(log, what, alive)) is not None:
            raise error
        if time.monotonic() > deadline:
            raise AssertionError(f"{log}: no 'listening' line for {what} {match}")
        time.sleep(POLL)
    return found


async def await_listening(
    log: Path,
    what: str,
    *,
    since: int = 0,
    alive: Callable[[], bool] | None = None,
    within: float = WAIT,
    **match: str,
) -> Bound:
    """`wait_listening` for coroutines: the event loop keeps running meanwhile."""
    deadline = time.monotonic() + within
    while (found := _find(log, what, since, match)) is None:
        if (error := _gone(log, what, alive)) is not None:
            raise error
        if time.monotonic() > deadline:
            raise AssertionError(f"{log}: no 'listening' line for {what} {match}")
        await asyncio.sleep(POLL)
    return found


def reserve(host: str = HOST, make: Callable[[], socket.socket] | None = None) -> socket.socket:
    """A TCP socket bound to a free port of `host`, not listening yet: connections to it
    are refused until a process it is handed to listens on it. `make` creates the socket
    elsewhere (inside a network namespace)."""
    sock = make() if make is not None else socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, 0))
    except BaseException:
        sock.close()
        raise
    return sock


@contextlib.contextmanager
def dead_port(host: str = HOST) -> Iterator[int]:
    """A port where connections are refused for the whole block: it stays bound, and
    never listens."""
    with reserve(host) as sock:
        yield int(sock.getsockname()[1])


def handover(
    argv: Sequence[str], sockets: Mapping[str, socket.socket], env: Mapping[str, str] | None = None
) -> tuple[list[str], dict[str, str], tuple[int, ...]]:
    """(argv, env, pass_fds) for Popen: `argv` started with `sockets` as systemd socket
    activation passes them (fds from 3 on, LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID).

    A bash wrapper moves the fds into place and sets LISTEN_PID to its own pid, which the
    program keeps (bash execs it; so does `ip netns exec`).
    """
    environ = dict(os.environ if env is None else env)
    if not sockets:
        return list(argv), environ, ()
    fds = [sock.fileno() for sock in sockets.values()]
    park = " ".join(f"{_PARKING_FD + i}<&{fd}" for i, fd in enumerate(fds))
    place = " ".join(
        f"{_FIRST_FD + i}<&{_PARKING_FD + i} {_PARKING_FD + i}<&-" for i in range(len(fds))
    )
    targets = range(_FIRST_FD, _FIRST_FD + len(fds))
    close = " ".join(f"{fd}<&-" for fd in fds if fd not in targets)
    script = f'exec {park}; exec {place} {close}; export LISTEN_PID=$$; exec "$@"'
    environ["LISTEN_FDS"] = str(len(fds))
    environ["LISTEN_FDNAMES"] = ":".join(sockets)
    return ["bash", "-c", script, "relay-handover", *argv], environ, tuple(fds)
