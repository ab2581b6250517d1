"""Ports in tests, without races: nothing here binds a port, releases it and lets another
process bind it later (on a busy machine anyone can take it in between).

- A relay role is configured with port 0 and reports the port it got in its JSON log
  (relay.ops.listening): `wait_listening` / `await_listening` read that line. A
  third-party program that does the same in its own words (Prometheus) is read with
  `wait_logged_port`.
- A port that must be known before its process runs, or stay the same across restarts
  (the gateway's, which agents and workstations dial), is `reserve`d for the whole test:
  a socket bound with SO_REUSEADDR that never listens. Linux then keeps that port from
  everyone else (bind(0) and outgoing connections skip it; a bind without SO_REUSEADDR
  fails), while a server that binds it explicitly with SO_REUSEADDR (ours, HAProxy,
  DCMTK) can listen on it. While no process listens there, connections are refused.
- A role running in the test's own process: `announced()` collects the same lines.
- `dead_port` is such a reservation that nobody listens on: "connection refused".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "HOST",
    "Announced",
    "Bound",
    "announced",
    "await_listening",
    "dead_port",
    "listening_events",
    "reserve",
    "wait_listening",
    "wait_logged_port",
]

HOST = "127.0.0.1"
WAIT = 30.0
POLL = 0.02  # seconds between two reads of a log that has not said it yet


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


def _find(log: Path, what: str, since: int, service: str | None) -> Bound | None:
    for entry in listening_events(log, since):
        if entry.get("what") == what and service in (None, entry.get("service")):
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
    service: str | None = None,
) -> Bound:
    """Where listener `what` of the role that writes `log` is bound, once it says so.

    `since`: a byte offset of the log (a restarted role appends to it); `service`: the
    forwarded service, for `what="forward"`. Fails fast if `alive()` turns false, and
    after `within` seconds.
    """
    deadline = time.monotonic() + within
    while (found := _find(log, what, since, service)) is None:
        if (error := _gone(log, what, alive)) is not None:
            raise error
        if time.monotonic() > deadline:
            raise AssertionError(f"{log}: no 'listening' line for {what} {service or ''}")
        time.sleep(POLL)
    return found


async def await_listening(
    log: Path,
    what: str,
    *,
    since: int = 0,
    alive: Callable[[], bool] | None = None,
    within: float = WAIT,
    service: str | None = None,
) -> Bound:
    """`wait_listening` for coroutines: the event loop keeps running meanwhile."""
    deadline = time.monotonic() + within
    while (found := _find(log, what, since, service)) is None:
        if (error := _gone(log, what, alive)) is not None:
            raise error
        if time.monotonic() > deadline:
            raise AssertionError(f"{log}: no 'listening' line for {what} {service or ''}")
        await asyncio.sleep(POLL)
    return found


def wait_logged_port(
    log: Path, pattern: str, *, alive: Callable[[], bool] | None = None, within: float = WAIT
) -> int:
    """The port in the first line of `log` that matches `pattern` (its group "port")."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + within
    while True:
        text = log.read_text(errors="replace") if log.exists() else ""
        if (found := regex.search(text)) is not None:
            return int(found.group("port"))
        if (error := _gone(log, pattern, alive)) is not None:
            raise error
        if time.monotonic() > deadline:
            raise AssertionError(f"{log}: no line matches {pattern!r}\n{text[-3000:]}")
        time.sleep(POLL)


class Announced(logging.Handler):
    """The `listening` lines logged in this process (see `announced`)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.events: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "event", None) == "listening":
            self.events.append(dict(record.__dict__))

    def bound(self, what: str, **match: str) -> Bound:
        """The last address announced for `what` (and `match`); KeyError if none yet."""
        for entry in reversed(self.events):
            if entry.get("what") == what and all(entry.get(k) == v for k, v in match.items()):
                return _parse(str(entry["address"]))
        raise KeyError(f"nothing announced for {what} {match}")


@contextlib.contextmanager
def announced() -> Iterator[Announced]:
    """Collect what roles running in this process announce (relay.ops.listening)."""
    handler = Announced()
    logger = logging.getLogger("relay.listening")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def reserve(host: str = HOST, make: Callable[[], socket.socket] | None = None) -> socket.socket:
    """A port of `host` kept for the caller (see above): close the socket to give it back.
    `make` creates the socket elsewhere (inside a network namespace)."""
    sock = make() if make is not None else socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
    except BaseException:
        sock.close()
        raise
    return sock


@contextlib.contextmanager
def dead_port(host: str = HOST) -> Iterator[int]:
    """A port where connections are refused for the whole block (reserved, never listened on)."""
    with reserve(host) as sock:
        yield int(sock.getsockname()[1])
