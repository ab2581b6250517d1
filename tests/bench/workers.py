"""Load generators, sinks and baseline servers, each run as its own process.

`python -m tests.bench.workers ROLE 'JSON-ARGS'`. A worker prints JSON events on stdout
(`ready` once it is set up, replies to commands) and reads one command a line on stdin:
`stats` (counters and the time they were read, CLOCK_MONOTONIC, which all processes
share) or `stop`. It exits by itself when stdin closes or after `max_seconds`, so nothing
outlives a benchmark. Workers that speak the relay protocol run the way the product's
roles do (relay.ops.runtime.run_loop: uvloop and its malloc tuning); the baseline TLS server
runs under plain uvloop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Final, cast

import uvloop

from relay import wire
from relay.net import tls
from relay.net.aio import Link, Stream
from relay.ops.runtime import run_loop
from relay.proto import Connection, LinkSettings
from relay.trust.revocation import KIND_REVOKE, encode_revocations
from tests.bench.procs import HOST, raise_nofile

CHUNK: Final = 64 * 1024  # what senders hand to the transport/stream per call
SEND_BUFFER: Final = 1024 * 1024
CONNECT_TIMEOUT: Final = 30.0
_print_lock = threading.Lock()


def emit(event: str, **fields: Any) -> None:
    with _print_lock:
        sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
        sys.stdout.flush()


class Counters:
    """Plain counters, read by the command thread (int reads are atomic under the GIL)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.ok = 0
        self.errors = 0
        self.open = 0
        self.last_error = ""

    def snapshot(self) -> dict[str, Any]:
        return {
            "bytes": self.bytes,
            "ok": self.ok,
            "errors": self.errors,
            "open": self.open,
            "last_error": self.last_error,
            "t": time.monotonic(),
        }


def serve_commands(counters: Counters, max_seconds: float) -> None:
    """Answer stdin commands from a thread; exit on `stop`, EOF or the time limit."""
    timer = threading.Timer(max_seconds, os._exit, (3,))
    timer.daemon = True
    timer.start()

    def loop() -> None:
        for line in sys.stdin:
            command = line.strip()
            if command == "stats":
                emit("stats", **counters.snapshot())
            elif command == "stop":
                break
        with _print_lock:
            sys.stdout.flush()
        os._exit(0)

    threading.Thread(target=loop, name="commands", daemon=True).start()


def _path(value: str) -> Path:
    return Path(value)


def settings(args: dict[str, Any]) -> LinkSettings:
    """Link settings of a worker: defaults, or a larger `max_frame` if given."""
    return LinkSettings(max_frame=int(args.get("max_frame", LinkSettings().max_frame)))


def client_ctx(args: dict[str, Any], role: str = "device") -> ssl.SSLContext:
    alpn = wire.ALPN_AGENT if role == "agent" else wire.ALPN_DEVICE
    cert = args.get(f"{role}_cert")
    key = args.get(f"{role}_key")
    return tls.client_context(
        _path(cert) if cert else None, _path(key) if key else None, _path(args["ca"]), alpn
    )


def server_ctx(args: dict[str, Any]) -> ssl.SSLContext:
    return tls.server_context(
        _path(args["server_cert"]), _path(args["server_key"]), _path(args["ca"])
    )


# --- bulk throughput --------------------------------------------------------------------


class DiscardListener:
    """Counts and immediately acknowledges stream data (a sink as cheap as it gets)."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters

    def on_data(self, stream: Stream, data: bytes) -> None:
        self.counters.bytes += len(data)
        stream.acknowledge(len(data))

    def on_end(self, stream: Stream) -> None:
        pass

    def on_credit(self, stream: Stream) -> None:
        pass

    def on_reset(self, stream: Stream, code: int) -> None:
        self.counters.last_error = f"stream reset {code}"


async def link_sink(args: dict[str, Any], counters: Counters) -> None:
    """An agent-shaped sink: dials the gateway with the agent cert, discards every stream."""
    loop = asyncio.get_running_loop()
    listener = DiscardListener(counters)

    def on_stream(stream: Stream) -> None:
        stream.listener = listener

    _, link = await asyncio.wait_for(
        loop.create_connection(
            lambda: Link(client=True, settings=settings(args), on_stream=on_stream),
            HOST,
            args["port"],
            ssl=client_ctx(args, "agent"),
            server_hostname=HOST,
        ),
        CONNECT_TIMEOUT,
    )
    # Like an agent: the site's revocation snapshot (here: nothing revoked) comes first;
    # the gateway routes the site's streams to this link only after it.
    for body in encode_revocations((), full=True):
        link.send_control(KIND_REVOKE, body)
    emit("ready")
    await link.wait_closed()


async def link_sink_server(args: dict[str, Any], counters: Counters) -> None:
    """The same sink as a TLS server (behind HAProxy, which dials it)."""
    loop = asyncio.get_running_loop()
    listener = DiscardListener(counters)

    def on_stream(stream: Stream) -> None:
        stream.listener = listener

    server = await loop.create_server(
        lambda: Link(client=False, settings=settings(args), on_stream=on_stream),
        HOST,
        0,
        ssl=server_ctx(args),
    )
    emit("ready", port=server.sockets[0].getsockname()[1])
    await asyncio.Future()


async def link_sender(args: dict[str, Any], counters: Counters) -> None:
    """A device-shaped load generator: one stream, written as fast as credit allows."""
    loop = asyncio.get_running_loop()
    _, link = await asyncio.wait_for(
        loop.create_connection(
            lambda: Link(client=True, settings=settings(args)),
            HOST,
            args["port"],
            ssl=client_ctx(args, "device"),
            server_hostname=HOST,
        ),
        CONNECT_TIMEOUT,
    )
    ssl_object = link.transport.get_extra_info("ssl_object") if link.transport else None
    emit("ready", cipher=ssl_object.cipher()[0] if ssl_object else "")
    # A device opens sealed sessions only; to the gateway a session is opaque bytes, which
    # is what this measures (the sink discards them; no TLS inside).
    stream = link.open_stream({"target": "session"})
    data = os.urandom(SEND_BUFFER)
    chunks = [data[i : i + CHUNK] for i in range(0, SEND_BUFFER, CHUNK)]
    while True:
        for chunk in chunks:
            await stream.write(chunk)
            counters.bytes += len(chunk)


def tls_sender(args: dict[str, Any], counters: Counters) -> None:
    """Plain TLS (blocking socket) load generator, for HAProxy."""
    ctx = client_ctx(args, "device")
    raw = socket.create_connection((HOST, args["port"]), timeout=CONNECT_TIMEOUT)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock = ctx.wrap_socket(raw, server_hostname=HOST)
    sock.settimeout(None)
    cipher = sock.cipher()
    emit("ready", cipher=cipher[0] if cipher else "")
    data = os.urandom(SEND_BUFFER)
    while True:
        sock.sendall(data)
        counters.bytes += len(data)


def tls_sink(args: dict[str, Any], counters: Counters) -> None:
    """Plain TLS (blocking socket) sink, behind HAProxy: reads and discards.

    Connections are served one after another: the port probes of a chain of proxies in
    front (stunnel, HAProxy) reach it as short connections before the sender's.
    """
    ctx = server_ctx(args)
    listener = socket.create_server((HOST, 0))
    emit("ready", port=listener.getsockname()[1])
    listener.settimeout(CONNECT_TIMEOUT)
    buf = bytearray(SEND_BUFFER)
    while True:
        raw, _ = listener.accept()
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.settimeout(CONNECT_TIMEOUT)
        with contextlib.suppress(OSError), raw:
            sock = ctx.wrap_socket(raw, server_side=True)
            sock.settimeout(None)
            while n := sock.recv_into(buf):
                counters.bytes += n


# --- idle links and handshakes ----------------------------------------------------------


class Idle(asyncio.Protocol):
    """A TLS connection that only sits there."""

    def __init__(self, counters: Counters, greeting: bytes = b"") -> None:
        self.counters = counters
        self.greeting = greeting

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.counters.open += 1
        self.counters.ok += 1
        if self.greeting:
            cast(asyncio.Transport, transport).write(self.greeting)

    def connection_lost(self, exc: Exception | None) -> None:
        self.counters.open -= 1


async def idle_links(args: dict[str, Any], counters: Counters) -> None:
    """Open `count` device links (mode link: relay Links; mode tls: bare TLS) and hold them."""
    loop = asyncio.get_running_loop()
    ctx = client_ctx(args, "device")
    count, mode = int(args["count"]), args["mode"]
    gate = asyncio.Semaphore(int(args.get("concurrency", 64)))
    held: list[asyncio.BaseTransport] = []

    def factory() -> asyncio.Protocol:
        if mode == "link":
            return Link(client=True, settings=settings(args))
        return Idle(counters)

    async def one() -> None:
        async with gate:
            try:
                transport, _ = await asyncio.wait_for(
                    loop.create_connection(
                        factory, HOST, args["port"], ssl=ctx, server_hostname=HOST
                    ),
                    CONNECT_TIMEOUT,
                )
            except (OSError, TimeoutError) as exc:
                counters.errors += 1
                counters.last_error = repr(exc)
                return
            held.append(transport)
            if mode == "link":
                counters.ok += 1

    await asyncio.gather(*(one() for _ in range(count)))
    emit("ready", opened=len(held), errors=counters.errors, last_error=counters.last_error)
    await asyncio.Future()


async def dicom_load(args: dict[str, Any], counters: Counters) -> None:
    """The load benchmark's devices: see tests/bench/loadgen.py (DICOM code loads only here)."""
    from tests.bench import loadgen

    ctx = client_ctx(args, "device")
    links = await loadgen.open_links(
        args, lambda: Link(client=True, settings=settings(args)), ctx, int(args["links"])
    )
    counters.open = len(links)
    emit("ready", opened=len(links))
    await loadgen.run_steps(links, args, emit)
    await asyncio.Future()


class Handshake(asyncio.Protocol):
    """Send the hello, wait for the server's first bytes (it accepted us), then close."""

    def __init__(self, hello: bytes, done: asyncio.Future[None]) -> None:
        self.hello = hello
        self.done = done
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tr = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        self.transport = tr
        if self.hello:
            tr.write(self.hello)

    def data_received(self, data: bytes) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionResetError("closed before any data"))


def _given(protocol: Handshake) -> Callable[[], Handshake]:
    return lambda: protocol


async def handshake_client(args: dict[str, Any], counters: Counters) -> None:
    """Open and close links as fast as possible with `concurrency` in flight."""
    loop = asyncio.get_running_loop()
    ctx = client_ctx(args, "device")
    hello = bytes.fromhex(args.get("hello", ""))

    async def slot() -> None:
        while True:
            done: asyncio.Future[None] = loop.create_future()
            transport: asyncio.BaseTransport | None = None
            protocol = Handshake(hello, done)
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    transport, _ = await loop.create_connection(
                        _given(protocol),
                        HOST,
                        args["port"],
                        ssl=ctx,
                        server_hostname=HOST,
                    )
                    await done
                counters.ok += 1
            except (OSError, TimeoutError) as exc:
                counters.errors += 1
                counters.last_error = repr(exc)[:200]
                await asyncio.sleep(0.01)
            finally:
                if transport is not None:
                    transport.close()

    emit("ready")
    await asyncio.gather(*(slot() for _ in range(int(args.get("concurrency", 16)))))


async def tls_server(args: dict[str, Any], counters: Counters) -> None:
    """The baseline: a minimal uvloop TLS server with relay.net.tls.server_context.

    mode `idle` holds connections; mode `hello` greets each one with the gateway's own
    first bytes (a SETTINGS frame) once the handshake is done, like a link that starts.
    """
    loop = asyncio.get_running_loop()
    greeting = Connection(client=False, now=0.0).data_to_send() if args["mode"] == "hello" else b""
    server = await loop.create_server(
        lambda: Idle(counters, greeting),
        HOST,
        0,
        ssl=server_ctx(args),
        backlog=1024,
        ssl_handshake_timeout=CONNECT_TIMEOUT,
    )
    emit("ready", port=server.sockets[0].getsockname()[1])
    await asyncio.Future()


AsyncRole = Callable[[dict[str, Any], Counters], Coroutine[Any, Any, None]]
ASYNC_ROLES: Final[dict[str, AsyncRole]] = {
    "link-sink": link_sink,
    "link-sink-server": link_sink_server,
    "link-sender": link_sender,
    "idle-links": idle_links,
    "dicom-load": dicom_load,
    "handshake-client": handshake_client,
    "tls-server": tls_server,
}
BLOCKING_ROLES: Final[dict[str, Callable[[dict[str, Any], Counters], None]]] = {
    "tls-sender": tls_sender,
    "tls-sink": tls_sink,
}


def client_hello_bytes() -> str:
    """What a device sends first on a new link (its SETTINGS frame), hex."""
    return Connection(client=True, now=0.0).data_to_send().hex()


def main(argv: list[str]) -> int:
    role, args = argv[0], json.loads(argv[1])
    raise_nofile()
    counters = Counters()
    serve_commands(counters, float(args.get("max_seconds", 120)))
    try:
        if role in BLOCKING_ROLES:
            BLOCKING_ROLES[role](args, counters)
        elif role == "tls-server":
            uvloop.run(ASYNC_ROLES[role](args, counters))  # the bare baseline
        else:
            run_loop(ASYNC_ROLES[role](args, counters))  # as the product's roles run
    except Exception as exc:
        emit("error", message=f"{role}: {exc!r}")
        raise
    with contextlib.suppress(OSError):
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
