"""A userspace WAN emulator: a TCP proxy that adds one-way delay and a rate limit.

This kernel has no netem, so benchmarks that need a long, thin link put this proxy in
the path. Each direction of each connection is a pipe: bytes read from one side are
stamped with the time they may leave, `delay` seconds after the rate limiter (a fluid
token bucket: `rate` bytes/s, no burst) lets them through, and are written to the other
side then. TCP_NODELAY is set on both sockets, so the proxy adds no Nagle delay of its own.

Buffers are bounded: at most `max_buffer` bytes wait in one direction. When the
delay x rate product (or, without a rate, delay x what the sender pushes) exceeds it,
the proxy stops reading, and TCP backpressure reaches the sender; throughput is then at
most max_buffer / delay. Half-close passes through (EOF is forwarded after the bytes
before it), and a reset or error on either side closes both.

Library:

    async with WanProxy(("127.0.0.1", 8443), delay=0.04, rate=12.5e6) as proxy:
        ... connect to 127.0.0.1:proxy.port ...

Command line:

    python -m tests.bench.wanproxy --target 127.0.0.1:8443 --listen 127.0.0.1:9443 \
        --delay 40ms --rate 100Mbit
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import signal
import socket
import sys
from collections import deque
from types import TracebackType
from typing import Final

READ_SIZE: Final = 64 * 1024
#: Largest piece the rate limiter schedules at once, so a big read does not arrive as one
#: late burst on a slow link.
QUANTUM: Final = 16 * 1024
DEFAULT_MAX_BUFFER: Final = 8 * 1024 * 1024
DEFAULT_MAX_CONNECTIONS: Final = 256
HOST: Final = "127.0.0.1"


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Pipe:
    """One direction of one connection: read, schedule, hold, write."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        delay: float,
        rate: float | None,
        max_buffer: int,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.delay = delay
        self.rate = rate
        self.max_buffer = max_buffer
        self.queue: deque[tuple[float, bytes]] = deque()
        self.queued = 0
        self.max_queued = 0  # high-water mark, for tests
        self.transferred = 0
        self._next_free = 0.0  # when the rate limiter is free again (loop time)
        self._has_data = asyncio.Event()
        self._has_room = asyncio.Event()
        self._has_room.set()
        self._eof = False

    def _schedule(self, data: bytes, now: float) -> None:
        for pos in range(0, len(data), QUANTUM):
            piece = data[pos : pos + QUANTUM]
            if self.rate is None:
                leave = now
            else:
                self._next_free = max(self._next_free, now) + len(piece) / self.rate
                leave = self._next_free
            self.queue.append((leave + self.delay, piece))
            self.queued += len(piece)
        self.max_queued = max(self.max_queued, self.queued)
        if self.queued >= self.max_buffer:
            self._has_room.clear()
        self._has_data.set()

    async def read_side(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._has_room.wait()
                data = await self.reader.read(min(READ_SIZE, self.max_buffer - self.queued))
                if not data:
                    break
                self._schedule(data, loop.time())
        finally:
            self._eof = True
            self._has_data.set()

    async def write_side(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.queue:
                if self._eof:
                    break
                self._has_data.clear()
                await self._has_data.wait()
                continue
            due, piece = self.queue[0]
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            self.queue.popleft()
            self.writer.write(piece)
            await self.writer.drain()
            self.queued -= len(piece)
            self.transferred += len(piece)
            if self.queued < self.max_buffer:
                self._has_room.set()
        if self.writer.can_write_eof():
            with contextlib.suppress(OSError):
                self.writer.write_eof()


class WanProxy:
    """Listens on `listen` (default: a free port on 127.0.0.1) and relays to `target`."""

    def __init__(
        self,
        target: tuple[str, int],
        *,
        delay: float = 0.0,
        rate: float | None = None,
        listen: tuple[str, int] = (HOST, 0),
        max_buffer: int = DEFAULT_MAX_BUFFER,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        if delay < 0:
            raise ValueError("delay must be >= 0")
        if rate is not None and rate <= 0:
            raise ValueError("rate must be > 0 bytes/s (or None for no limit)")
        if max_buffer < QUANTUM:
            raise ValueError(f"max_buffer must be at least {QUANTUM}")
        self.target = target
        self.delay = delay
        self.rate = rate
        self.listen = listen
        self.max_buffer = max_buffer
        self.max_connections = max_connections
        self.pipes: list[Pipe] = []  # of live connections, for tests and stats
        self.refused = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, *self.listen)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> WanProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._tasks) >= self.max_connections or task is None:
            self.refused += 1
            writer.transport.abort()
            return
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._tasks.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _nodelay(writer)
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(*self.target), 10.0
            )
        except (OSError, TimeoutError):
            writer.transport.abort()
            return
        _nodelay(up_writer)
        kw = {"delay": self.delay, "rate": self.rate, "max_buffer": self.max_buffer}
        pipes = [Pipe(reader, up_writer, **kw), Pipe(up_reader, writer, **kw)]  # type: ignore[arg-type]
        self.pipes += pipes
        tasks = [
            asyncio.ensure_future(coro) for p in pipes for coro in (p.read_side(), p.write_side())
        ]
        try:
            # Done when both write sides finished (both EOFs passed on), or anything failed.
            writers = [tasks[1], tasks[3]]
            pending = set(tasks)
            while not all(t.done() for t in writers):
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if any(t.exception() for t in done if not t.cancelled()):
                    break
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for w in (writer, up_writer):
                w.transport.abort()
            for p in pipes:
                self.pipes.remove(p)


_UNITS: Final = {
    "": 1.0,
    "b": 1.0,
    "kb": 1e3,
    "mb": 1e6,
    "gb": 1e9,
    "kib": 1024.0,
    "mib": 1024.0**2,
    "kbit": 1e3 / 8,
    "mbit": 1e6 / 8,
    "gbit": 1e9 / 8,
}


def parse_rate(text: str) -> float:
    """`12.5MB`, `100Mbit`, `1MiB`, or bytes/s as a plain number (per second)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*?)(?:/s|ps)?\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"bad rate {text!r}: use e.g. 100Mbit, 12.5MB, 1MiB")
    return float(match.group(1)) * _UNITS[match.group(2).lower()]


def parse_delay(text: str) -> float:
    """`40ms`, `0.04s` or `0.04` (seconds)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*(ms|s|us)?\s*", text)
    if not match:
        raise ValueError(f"bad delay {text!r}: use e.g. 40ms or 0.04")
    scale = {"ms": 1e-3, "us": 1e-6, "s": 1.0, None: 1.0}[match.group(2)]
    return float(match.group(1)) * scale


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected host:port, got {text!r}")
    return host.strip("[]"), int(port)


async def _main(args: argparse.Namespace) -> None:
    proxy = WanProxy(
        args.target,
        delay=args.delay,
        rate=args.rate,
        listen=args.listen,
        max_buffer=args.max_buffer,
        max_connections=args.max_connections,
    )
    await proxy.start()
    print(
        f"wanproxy {args.listen[0]}:{proxy.port} -> {args.target[0]}:{args.target[1]}", flush=True
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if args.seconds:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.seconds)
        else:
            await stop.wait()
    finally:
        await proxy.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.wanproxy", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--target", type=_address, required=True, help="host:port to relay to")
    parser.add_argument(
        "--listen", type=_address, default=(HOST, 0), help="host:port (default 127.0.0.1, any port)"
    )
    parser.add_argument(
        "--delay", type=parse_delay, default=0.0, help="one-way delay per direction, e.g. 40ms"
    )
    parser.add_argument("--rate", type=parse_rate, default=None, help="per direction, e.g. 100Mbit")
    parser.add_argument(
        "--max-buffer", type=int, default=DEFAULT_MAX_BUFFER, help="bytes held per direction"
    )
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS)
    parser.add_argument(
        "--seconds", type=float, default=0.0, help="exit after this long (0: run until SIGTERM)"
    )
    args = parser.parse_args(argv)
    asyncio.run(_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
