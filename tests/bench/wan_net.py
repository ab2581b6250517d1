"""The WAN benchmark's emulated link: profiles, delay/rate proxy processes, and a raw check.

The link is tests/bench/wanproxy.py (one-way delay = RTT / 2 per direction, and a fluid
token bucket per direction of each connection) run as its own process. This kernel has no
netem; a `tc tbf` rate limit on a veth pair would need addresses other than 127.0.0.1, so
the proxy alone carries the emulation, and `check_link` measures what it achieves: the
round trip of a one-byte ping and the rate of a raw TCP transfer through it, in the
direction the benchmark's data flows (server to client).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Final

from tests.bench.procs import HOST, BenchError, Process, ProcessGroup

MBIT: Final = 1e6 / 8  # bytes/s in one Mbit/s
START_TIMEOUT: Final = 20.0
_CHUNK: Final = 1 << 20
_PINGS: Final = 5


@dataclass(frozen=True)
class Profile:
    """An emulated WAN: `rate` bytes/s each way and `rtt` seconds of round trip.

    `rate` None means no emulation at all (no proxy): the reference of what the
    processes manage on plain loopback, where only CPU limits them.
    """

    name: str  # short, for process names: "100M-40ms"
    rate: float | None
    rtt: float

    @property
    def emulated(self) -> bool:
        return self.rate is not None

    @property
    def label(self) -> str:
        if self.rate is None:
            return "none (loopback, no proxy)"
        mbit = self.rate / MBIT
        speed = f"{mbit / 1000:g} Gbit/s" if mbit >= 1000 else f"{mbit:g} Mbit/s"
        return f"{speed}, {self.rtt * 1000:g} ms RTT"


PROFILES: Final = (
    Profile("100M-40ms", 100 * MBIT, 0.040),
    Profile("20M-80ms", 20 * MBIT, 0.080),
    Profile("1G-5ms", 1000 * MBIT, 0.005),
)
LOOPBACK: Final = Profile("loopback", None, 0.0)


def start_proxy(
    group: ProcessGroup, name: str, target_port: int, profile: Profile, env: dict[str, str]
) -> tuple[Process, int]:
    """`python -m tests.bench.wanproxy` from port 0 (it prints the port it got) to
    HOST:target_port; (proc, port)."""
    if profile.rate is None:
        raise ValueError(f"profile {profile.name} has no link to emulate")
    argv = [
        sys.executable, "-m", "tests.bench.wanproxy",
        "--target", f"{HOST}:{target_port}", "--listen", f"{HOST}:0",
        "--delay", f"{profile.rtt / 2}", "--rate", f"{profile.rate}",
    ]  # fmt: skip
    proc = group.process(name, argv, env=env)
    port = proc.logged_port(r"wanproxy [\d.]+:(?P<port>\d+) ->", START_TIMEOUT)
    return proc, port


@dataclass(frozen=True)
class LinkCheck:
    """What a raw TCP connection through the proxy achieved."""

    rtt: float  # best of a few one-byte round trips, seconds
    rate: float  # bytes/s of a bulk transfer, first read to last
    nbytes: int


class _Source:
    """A one-connection TCP server: echoes b"p"; on b"g"+u64 N sends N bytes."""

    def __init__(self) -> None:
        self.sock = socket.create_server((HOST, 0))
        self.sock.settimeout(START_TIMEOUT)
        self.port: int = self.sock.getsockname()[1]
        self.error: BaseException | None = None
        self.closed = False
        self._thread = threading.Thread(target=self._serve, name="link-source", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        """One connection at a time, until close()."""
        block = bytes(_CHUNK)
        try:
            while True:
                conn, _ = self.sock.accept()
                with conn:
                    conn.settimeout(120.0)
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    while command := conn.recv(1):
                        if command == b"p":
                            conn.sendall(b"p")
                            continue
                        (left,) = struct.unpack("!Q", _recv_exact(conn, 8))
                        while left > 0:
                            n = min(left, _CHUNK)
                            conn.sendall(block[:n])
                            left -= n
        except (OSError, BenchError) as exc:
            if not self.closed:
                self.error = exc

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.sock.close()
        self._thread.join(5)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        got = conn.recv(n - len(data))
        if not got:
            raise BenchError("link check: connection closed early")
        data += got
    return data


def check_link(
    group: ProcessGroup, profile: Profile, env: dict[str, str], seconds: float = 2.0
) -> LinkCheck:
    """RTT and achieved rate of a raw TCP connection through a proxy with `profile`.

    Transfers about `seconds` worth of bytes at the nominal rate (at most 256 MB).
    """
    if profile.rate is None:
        raise ValueError(f"profile {profile.name} has no link to check")
    source = _Source()
    proxy: Process | None = None
    try:
        proxy, port = start_proxy(group, f"proxy-check-{profile.name}", source.port, profile, env)
        nbytes = int(min(profile.rate * seconds, 256e6))
        with socket.create_connection((HOST, port), timeout=60.0) as conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rtts = []
            for _ in range(_PINGS):
                started = time.monotonic()
                conn.sendall(b"p")
                _recv_exact(conn, 1)
                rtts.append(time.monotonic() - started)
            conn.sendall(b"g" + struct.pack("!Q", nbytes))
            buf = bytearray(_CHUNK)
            got, first_size, first_at = 0, 0, 0.0
            while got < nbytes:
                n = conn.recv_into(buf)
                if not n:
                    raise BenchError(f"link check: closed after {got} of {nbytes} bytes")
                if not got:
                    first_size, first_at = n, time.monotonic()
                got += n
            elapsed = time.monotonic() - first_at
        if source.error is not None:
            raise BenchError(f"link check source failed: {source.error}")
        return LinkCheck(min(rtts), (nbytes - first_size) / max(elapsed, 1e-9), nbytes)
    except OSError as exc:
        raise BenchError(f"link check through the proxy failed: {exc}") from None
    finally:
        source.close()
        if proxy is not None:
            with contextlib.suppress(Exception):
                proxy.stop()
