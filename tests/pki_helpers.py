"""Test helpers: throw-away PKIs and real TLS handshakes over 127.0.0.1.

The server side performs its handshake the way the gateway does: accept plain TCP with
a plain asyncio protocol, then `loop.start_tls(..., server_side=True)`. That matters for
TLS 1.3, where the client may finish before the server rejects the client certificate:
tests assert on the exception raised by the server's handshake.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from relay.net import tls
from relay.trust import pki
from relay.trust.identity import Identity

try:
    import uvloop
except ImportError:  # the portable lane (tests/portable), as on Windows
    uvloop = None  # type: ignore[assignment]

LoopKind = Literal["asyncio", "uvloop"]
LOOP_KINDS: tuple[LoopKind, ...] = ("asyncio", "uvloop") if uvloop is not None else ("asyncio",)
HOST = "127.0.0.1"
WAIT = 10.0  # generous upper bound on every wait; never an assertion on time

T = TypeVar("T")


def run(kind: LoopKind, coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on a fresh event loop of the given kind."""
    factory: Callable[[], asyncio.AbstractEventLoop] = (
        uvloop.new_event_loop if kind == "uvloop" else asyncio.new_event_loop
    )
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


@dataclass
class Pair:
    cert: Path
    key: Path


@dataclass
class SitePki:
    """A site PKI in a directory (via init_pki), plus helpers to issue more leaves."""

    directory: Path
    trust_domain: str
    site: str
    ca_key: Any = field(repr=False)
    ca_cert: Any = field(repr=False)

    @property
    def ca(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def gateway(self) -> Pair:
        return Pair(self.directory / "gateway.crt", self.directory / "gateway.key")

    @property
    def agent(self) -> Pair:
        return Pair(self.directory / "agent.crt", self.directory / "agent.key")

    def issue(
        self,
        stem: str,
        identity: Identity,
        lifetime: timedelta = timedelta(days=1),
        not_before: datetime | None = None,
    ) -> Pair:
        key = pki.generate_key()
        cert = pki.issue_certificate(
            self.ca_key,
            self.ca_cert,
            key.public_key(),
            identity,
            lifetime,
            not_before=not_before,
        )
        pair = Pair(self.directory / f"{stem}.crt", self.directory / f"{stem}.key")
        pki.write_key(pair.key, key)
        pki.write_cert(pair.cert, cert)
        return pair

    def device(self, name: str = "ws1", **kwargs: Any) -> Pair:
        return self.issue(name, Identity.device(self.trust_domain, self.site, name), **kwargs)


def make_pki(
    directory: Path,
    trust_domain: str = "hospital.test",
    site: str = "main",
    gateway_names: tuple[str, ...] = ("localhost", HOST),
) -> SitePki:
    pki.init_pki(directory, trust_domain, site, list(gateway_names))
    ca_key, ca_cert = pki.load_ca(directory)
    return SitePki(directory, trust_domain, site, ca_key, ca_cert)


@dataclass
class Outcome:
    """Both sides of one handshake attempt."""

    server_error: BaseException | None = None
    server_alpn: str | None = None
    server_peer_der: bytes | None = None
    server_ssl_object: Any = None
    client_error: BaseException | None = None
    client_alpn: str | None = None


class _Plain(asyncio.Protocol):
    """A do-nothing protocol for the plain TCP accept (the gateway's first step)."""

    def __init__(self, accepted: asyncio.Queue[asyncio.BaseTransport]) -> None:
        self.accepted = accepted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Stop reading before start_tls: otherwise the ClientHello can be consumed by
        # this protocol's data_received and the handshake then waits forever.
        cast(asyncio.Transport, transport).pause_reading()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.accepted.put_nowait(transport)
        self.transport = transport


ClientFn = Callable[[int], Awaitable[str | None]]
ServerMode = Literal["accept_tls", "start_tls"]


def _record_success(outcome: Outcome, transport: asyncio.BaseTransport) -> None:
    obj = transport.get_extra_info("ssl_object")
    outcome.server_ssl_object = obj
    outcome.server_alpn = obj.selected_alpn_protocol()
    outcome.server_peer_der = obj.getpeercert(binary_form=True)
    transport.close()


async def _serve_accept_tls(
    listener: socket.socket, ctx: ssl.SSLContext, hs_timeout: float, outcome: Outcome
) -> None:
    """The recommended gateway path: accept, then relay.net.tls.accept_tls."""
    loop = asyncio.get_running_loop()
    sock, _ = await asyncio.wait_for(loop.sock_accept(listener), WAIT)
    try:
        transport, _proto = await tls.accept_tls(
            sock, ctx, asyncio.Protocol, handshake_timeout=hs_timeout
        )
    except BaseException as exc:  # recorded for the test to classify
        outcome.server_error = exc
        return
    _record_success(outcome, transport)


async def _serve_start_tls(
    listener: socket.socket, ctx: ssl.SSLContext, hs_timeout: float, outcome: Outcome
) -> None:
    """Plain transport then loop.start_tls (works on the stdlib loop only, see accept_tls)."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Queue[asyncio.BaseTransport] = asyncio.Queue(maxsize=1)
    protocol = _Plain(accepted)
    sock, _ = await asyncio.wait_for(loop.sock_accept(listener), WAIT)
    transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock)
    try:
        tls_transport = await loop.start_tls(
            transport, protocol, ctx, server_side=True, ssl_handshake_timeout=hs_timeout
        )
    except BaseException as exc:
        outcome.server_error = exc
        transport.close()
        return
    assert tls_transport is not None
    _record_success(outcome, tls_transport)


async def handshake(
    server_ctx: ssl.SSLContext,
    client: ClientFn,
    handshake_timeout: float = WAIT,
    mode: ServerMode = "accept_tls",
) -> Outcome:
    """Accept one connection on 127.0.0.1, TLS-handshake it server-side, run `client(port)`.

    `client` connects to 127.0.0.1:port and returns the ALPN it negotiated (or raises).
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, 0))
    listener.listen(4)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    outcome = Outcome()
    serve = _serve_accept_tls if mode == "accept_tls" else _serve_start_tls

    async def dial() -> None:
        try:
            outcome.client_alpn = await asyncio.wait_for(client(port), WAIT)
        except BaseException as exc:
            outcome.client_error = exc

    try:
        await asyncio.wait_for(
            asyncio.gather(serve(listener, server_ctx, handshake_timeout, outcome), dial()),
            WAIT * 2,
        )
    finally:
        listener.close()
    return outcome


def tls_client(ctx: ssl.SSLContext, server_hostname: str = HOST) -> ClientFn:
    """A client that opens a TLS connection and returns the negotiated ALPN."""

    async def client(port: int) -> str | None:
        _, writer = await asyncio.open_connection(
            HOST, port, ssl=ctx, server_hostname=server_hostname, ssl_handshake_timeout=WAIT
        )
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        alpn: str | None = writer.get_extra_info("ssl_object").selected_alpn_protocol()
        writer.close()
        return alpn

    return client


def raw_client(payload: bytes, hold: bool = False) -> ClientFn:
    """A plain TCP client that sends `payload` and closes (or holds the socket open)."""

    async def client(port: int) -> str | None:
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if payload:
            writer.write(payload)
            await writer.drain()
        if hold:
            await reader.read()  # until the server gives up on the handshake
        writer.close()
        return None

    return client
