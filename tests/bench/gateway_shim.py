"""`relay gateway` with one known bug worked around, for benchmarking until it is fixed.

Under uvloop, `loop.connect_accepted_socket(factory, sock, ssl=ctx)` returns uvloop's
internal SSLProtocol as the protocol, not the one `factory` made (the stdlib loop returns
the application protocol). `relay.net.tls.accept_tls` passes that return value on, so the
real gateway process (which runs under uvloop) fails every link with
"'uvloop.loop.SSLProtocol' object has no attribute 'peer'". The in-process gateway tests
use the default loop and do not see it.

`accept_tls_fixed` keeps the protocol that the factory created. The benchmark uses this
shim only when `accept_tls_is_broken()` says so, and says so in its results.

    python -m tests.bench.gateway_shim --config FILE      (same as: relay gateway --config FILE)
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import uvloop

from relay.net import tls

_P = TypeVar("_P", bound=asyncio.BaseProtocol)
_original_accept_tls = tls.accept_tls


async def accept_tls_fixed(
    sock: socket.socket,
    ctx: ssl.SSLContext,
    protocol_factory: Callable[[], _P],
    *,
    handshake_timeout: float,
) -> tuple[asyncio.Transport, _P]:
    made: list[_P] = []

    def factory() -> _P:
        made.append(protocol_factory())
        return made[-1]

    transport, _ = await _original_accept_tls(
        sock, ctx, factory, handshake_timeout=handshake_timeout
    )
    return transport, made[0]


def accept_tls_is_broken(cert: Path, key: Path) -> bool:
    """Whether relay.net.tls.accept_tls, under uvloop, returns a protocol other than its own."""

    async def probe() -> bool:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client_sock = socket.create_connection(listener.getsockname(), timeout=5)
            server_sock, _ = listener.accept()
        client_sock.setblocking(False)
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(str(cert), str(key))
        client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client_ctx.check_hostname = False
        client_ctx.verify_mode = ssl.CERT_NONE
        made: list[asyncio.Protocol] = []

        def factory() -> asyncio.Protocol:
            made.append(asyncio.Protocol())
            return made[-1]

        accepting = asyncio.ensure_future(
            _original_accept_tls(server_sock, server_ctx, factory, handshake_timeout=5.0)
        )
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(sock=client_sock, ssl=client_ctx, server_hostname="x"), 5.0
        )
        transport, protocol = await asyncio.wait_for(accepting, 5.0)
        writer.close()
        transport.abort()
        return protocol is not made[0]

    result: bool = uvloop.run(probe())
    return result


def main(argv: list[str]) -> int:
    import gateway.server
    from relay.cli import main as relay_main

    patched: Any = accept_tls_fixed
    tls.accept_tls = patched
    gateway.server.accept_tls = patched  # type: ignore[attr-defined]
    return relay_main(["gateway", *argv])


if __name__ == "__main__":
    if sys.argv[1:2] == ["--probe"]:
        with tempfile.TemporaryDirectory() as tmp:
            from tests.bench.targets import make_pki

            bench_pki = make_pki(Path(tmp) / "pki")
            print("broken" if accept_tls_is_broken(*bench_pki.pair("gateway")) else "ok")
        sys.exit(0)
    sys.exit(main(sys.argv[1:]))
