"""Who may hold a connection to one of our HTTP listeners, and how long it may take to say
what it wants: one admission step for every aiohttp listener (each role's metrics/health
endpoint, the agent's IT pages, the workstation's DICOMweb).

aiohttp bounds the size of a request head, not the time it takes to arrive, and takes
every connection it is offered: a slowloris (a header byte every few seconds, or a TLS
handshake never finished) holds sockets without bound. So an `Admission` accepts the
connections itself (`loop.sock_accept`, as the gateway does) and:
1. counts each from accept to close, a TLS handshake under way included: past
   `max_connections` a new one is closed at once, or answered `busy` (a canned 503)
   first, and counted (`over_cap`); no byte of it is read;
2. may `vet` the far end before a byte is read (the workstation's `local_access`): its
   answer, if any, is written and the connection closed;
3. gives each connection `head_timeout` seconds from accept to the end of its first
   request head, TLS handshake and vetting included; past it the connection is aborted
   and counted (`timed_out`). aiohttp's `keepalive_timeout`, set to the same value,
   bounds every later head and the idle time between requests.
4. where the listener's bodies are small (forms, JSON commands: `body_timeout` set), gives
   each request `body_timeout` seconds from its head to the end of its body; past it the
   connection is aborted and counted (`timed_out`). aiohttp reads a body only when the
   handler asks, with no deadline: a complete head and then a body byte every few
   seconds held a connection, and its handler, for as long as the client liked. Large
   bodies (DICOMweb uploads) are paced by their handler instead; a body no handler reads
   is aiohttp's (read and dropped for at most its `lingering_time`, then the close).
TLS goes through `loop.connect_accepted_socket(ssl=...)`, so the TLS protocol owns the
socket before its first read (a plain transport then `start_tls` loses the ClientHello
under uvloop, whose transports start reading right after `connection_made`: a
`pause_reading()` there holds nothing). For the same reason vetting happens before any
transport exists. Works on every loop: uvloop, the stdlib's, Windows' Proactor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from relay.ops.config import Address

__all__ = ["Admission", "AdmissionMetrics", "ConnectionLimits", "Vet"]

log = logging.getLogger(__name__)

#: After an accept that failed (EMFILE and friends): wait this long rather than spin.
ACCEPT_BACKOFF: Final = 0.1
#: Each listener's backlog of connections the kernel holds before we accept them.
BACKLOG: Final = 128

#: The far end (host, port) and our end; the answer to write before closing, or None: in.
Vet = Callable[[tuple[str, int], tuple[str, int]], Awaitable[bytes | None]]


@dataclass(frozen=True)
class ConnectionLimits:
    """`max_connections` open at once (accepted, not yet closed); `head_timeout` seconds
    from accept (or the end of the last response) to the end of a request head;
    `body_timeout` seconds from a head to the end of its body (None: no deadline, for
    listeners whose handlers pace their own large bodies); `busy`: what a connection over
    the cap is told before it is closed (None: nothing)."""

    max_connections: int
    head_timeout: float
    busy: bytes | None = None
    body_timeout: float | None = None

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {self.max_connections}")
        if not self.head_timeout > 0:
            raise ValueError(f"head_timeout must be positive, got {self.head_timeout}")
        if self.body_timeout is not None and not self.body_timeout > 0:
            raise ValueError(f"body_timeout must be positive, got {self.body_timeout}")


#: What a refused connection may already have sent, read and dropped before the close.
REFUSED_DRAIN: Final = 64 * 1024


def _refuse(conn: socket.socket, answer: bytes | None) -> None:
    """A raw answer (at most one send, never waited on), then the socket closed. What the
    client already sent is read and dropped first: closing over unread bytes resets the
    connection, and a reset can destroy the answer before the client reads it."""
    with contextlib.suppress(OSError):
        if answer:
            conn.setblocking(False)
            conn.send(answer)
            conn.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):
                conn.recv(REFUSED_DRAIN)
    with contextlib.suppress(OSError):
        conn.close()


class _Slot:
    """One accepted connection's place under the cap, given back exactly once."""

    __slots__ = ("_admission", "head", "held")

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self.held = True
        admission._open += 1
        # Set when the first request head is in, or the connection is gone.
        self.head: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def release(self) -> None:
        if self.held:
            self.held = False
            self._admission._open -= 1
        if not self.head.done():
            self.head.set_result(None)


class Admission:
    """One aiohttp application served under `limits` (see the module's docstring).

    `start()` listens, `stop()` closes; `runner` is the aiohttp runner (its server's
    `connections` are the connections past admission). Extra keyword arguments go to
    aiohttp's AppRunner (handler_cancellation, header size limits...)."""

    def __init__(
        self,
        app: web.Application,
        limits: ConnectionLimits,
        *,
        ssl_context: ssl.SSLContext | None = None,
        vet: Vet | None = None,
        **runner_args: Any,
    ) -> None:
        self.limits = limits
        self.ssl_context = ssl_context
        self.vet = vet
        self.runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            keepalive_timeout=limits.head_timeout,
            **runner_args,
        )
        self.over_cap = 0  # connections refused over max_connections
        # connections aborted for a first head not in within head_timeout, or a body not
        # in within body_timeout
        self.timed_out = 0
        self._open = 0
        self._slots: dict[RequestHandler, _Slot] = {}
        self._entering: set[asyncio.Task[None]] = set()
        self._listeners: list[_Listener] = []

    @property
    def open(self) -> int:
        """Connections accepted and not closed yet (what the cap counts)."""
        return self._open

    @property
    def addresses(self) -> list[Address]:
        return [
            Address(str(s.getsockname()[0]), int(s.getsockname()[1]))
            for listener in self._listeners
            for s in listener.sockets
        ]

    async def start(self, host: str, port: int) -> list[Address]:
        """Listen on every address `host` resolves to; the addresses bound (port 0: the
        kernel's choice). An OSError (port taken...) leaves nothing running."""
        await self.runner.setup()
        server = self.runner.server
        assert server is not None
        made = server.request_factory
        lost = server.connection_lost

        def request_factory(message: Any, payload: Any, protocol: Any, *args: Any) -> Any:
            slot = self._slots.get(protocol)
            if slot is not None and not slot.head.done():
                slot.head.set_result(None)
            if self.limits.body_timeout is not None and not payload.is_eof():
                self._watch_body(protocol, payload, self.limits.body_timeout)
            return made(message, payload, protocol, *args)

        def connection_lost(handler: RequestHandler, exc: BaseException | None = None) -> None:
            slot = self._slots.pop(handler, None)
            if slot is not None:
                slot.release()
            lost(handler, exc)

        server.request_factory = request_factory
        server.connection_lost = connection_lost  # type: ignore[method-assign]
        site = _Site(self, host, port)
        try:
            await site.start()
        except BaseException:
            await self.runner.cleanup()
            raise
        return self.addresses

    async def stop(self) -> None:
        """Stop listening, end the connections still on their way in, then aiohttp's
        cleanup (which closes the rest)."""
        for listener in self._listeners:
            listener.close()
        for task in list(self._entering):
            task.cancel()
        waits: list[Awaitable[Any]] = [listener.wait_closed() for listener in self._listeners]
        await asyncio.gather(*waits, *self._entering, return_exceptions=True)
        await self.runner.cleanup()

    def _watch_body(self, handler: RequestHandler, payload: Any, timeout: float) -> None:
        """Abort `handler`'s connection unless `payload` (aiohttp's StreamReader) has all of
        its body within `timeout` seconds; the timer goes once it has."""

        def late() -> None:
            transport = handler.transport
            if payload.is_eof() or transport is None or transport.is_closing():
                return
            self.timed_out += 1
            log.info("request body not received in time: connection closed",
                     extra={"timeout": timeout, "received": payload.total_bytes})  # fmt: skip
            transport.abort()

        timer = asyncio.get_running_loop().call_later(timeout, late)
        payload.on_eof(timer.cancel)

    # -- the way in

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                log.warning("accept failed", extra={"error": type(exc).__name__})
                await asyncio.sleep(ACCEPT_BACKOFF)
                continue
            if self._open >= self.limits.max_connections:
                self.over_cap += 1
                _refuse(conn, self.limits.busy)
                continue
            slot = _Slot(self)
            task = loop.create_task(self._enter(conn, slot))
            self._entering.add(task)
            task.add_done_callback(self._entering.discard)

    async def _enter(self, conn: socket.socket, slot: _Slot) -> None:
        """One connection from accept to its first request head, within head_timeout."""
        transport: asyncio.Transport | None = None
        handed = False  # to asyncio, which closes it from then on (uvloop detaches it)
        try:
            async with asyncio.timeout(self.limits.head_timeout):
                if self.vet is not None:
                    answer = await self.vet(conn.getpeername()[:2], conn.getsockname()[:2])
                    if answer is not None:
                        _refuse(conn, answer)
                        return
                handed = True
                transport = await self._attach(conn, slot)
                await slot.head
        except TimeoutError:
            self.timed_out += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a handshake that failed, a peer gone: nothing to serve
            log.debug("connection not admitted", extra={"error": type(exc).__name__})
        finally:
            if not slot.head.done():  # timed out, cancelled or failed: it goes now
                if transport is not None:
                    transport.abort()
                elif not handed:
                    _refuse(conn, None)
            if transport is None:
                slot.release()  # never reached aiohttp, whose connection_lost gives it back

    async def _attach(self, conn: socket.socket, slot: _Slot) -> asyncio.Transport:
        """Hand the socket to a new aiohttp handler (TLS first where configured)."""
        loop = asyncio.get_running_loop()
        server = self.runner.server
        assert server is not None
        handler = server()
        self._slots[handler] = slot
        conn.setblocking(False)
        ctx = self.ssl_context
        try:
            if ctx is None:
                transport, _ = await loop.connect_accepted_socket(lambda: handler, conn)
            else:
                transport, _ = await loop.connect_accepted_socket(
                    lambda: handler,
                    conn,
                    ssl=ctx,
                    # a backstop only: the head_timeout around it acts first
                    ssl_handshake_timeout=2 * self.limits.head_timeout,
                )
                if transport.get_extra_info("ssl_object") is None:  # lost while completing
                    transport.abort()
                    raise ConnectionResetError("connection lost during the TLS handshake")
        except BaseException:
            self._slots.pop(handler, None)
            raise
        return transport


class _Listener(asyncio.AbstractServer):
    """The listening sockets of one site and their accept loops: what aiohttp's runner
    keeps as a site's server (it reads `sockets`, calls `close()`)."""

    def __init__(self, admission: Admission, sockets: list[socket.socket]) -> None:
        self.sockets = sockets
        self._loop = asyncio.get_running_loop()
        self._tasks = [self._loop.create_task(admission._accept(s)) for s in sockets]
        for sock, task in zip(sockets, self._tasks, strict=True):
            # closed once its accept is cancelled, so the loop never polls a closed fd
            task.add_done_callback(lambda _, sock=sock: sock.close())  # type: ignore[misc]

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return any(not t.done() for t in self._tasks)

    async def start_serving(self) -> None:
        """Serving from construction on."""

    async def serve_forever(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)


class _Site(web.BaseSite):
    """An aiohttp site whose connections go through an Admission."""

    __slots__ = ("_admission", "_host", "_port")

    def __init__(self, admission: Admission, host: str, port: int) -> None:
        super().__init__(admission.runner)
        self._admission = admission
        self._host = host
        self._port = port

    @property
    def name(self) -> str:
        scheme = "https" if self._admission.ssl_context else "http"
        return f"{scheme}://{Address(self._host, self._port)}"

    async def start(self) -> None:
        await super().start()
        sockets = await _bind(self._host, self._port)
        listener = _Listener(self._admission, sockets)
        self._admission._listeners.append(listener)
        self._server = listener


async def _bind(host: str, port: int) -> list[socket.socket]:
    """A listening socket per address `host` resolves to, as asyncio's create_server binds
    them (SO_REUSEADDR on POSIX, IPv6 sockets IPv6 only), but SO_EXCLUSIVEADDRUSE where
    the OS has it (Windows, where a socket with SO_REUSEADDR may bind a port in use and
    take some of its connections: relay.dicom.exclusive)."""
    exclusive: int | None = getattr(socket, "SO_EXCLUSIVEADDRUSE", None)
    infos = await asyncio.get_running_loop().getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            if exclusive is not None:  # Windows: no other socket may bind this port
                sock.setsockopt(socket.SOL_SOCKET, exclusive, 1)
            else:  # POSIX: a restart binds over TIME_WAIT; a second listener is refused
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class AdmissionMetrics(Collector):
    """`relay_<surface>_connections_open`, `..._over_limit_total`, `..._timed_out_total`."""

    def __init__(self, surface: str, admission: Admission) -> None:
        self.surface = surface
        self.admission = admission

    def collect(self) -> Iterator[Metric]:
        prefix, a = f"relay_{self.surface}_connections", self.admission
        yield GaugeMetricFamily(f"{prefix}_open", "connections open", value=a.open)
        yield CounterMetricFamily(f"{prefix}_over_limit", "connections refused over the cap",
                                  value=a.over_cap)  # fmt: skip
        yield CounterMetricFamily(f"{prefix}_timed_out", "connections aborted: no request "
                                  "head, or no whole small body, within its deadline",
                                  value=a.timed_out)  # fmt: skip
