"""TCP forwarders between this process's loopback and a test network namespace.

Orthanc and storescp bind every address, so they run in a namespace of their own (see
tests/interop/README.md); pynetdicom inside this process cannot create its sockets there.
These forwarders bridge the two loopbacks, in either direction, with TCP_NODELAY.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

from tests.interop.harness.netns import NetNS


async def _splice(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while data := await r.read(1 << 16):
            w.write(data)
            await w.drain()
        if w.can_write_eof():
            w.write_eof()
    except (ConnectionError, OSError):
        w.close()


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class IntoNamespace:
    """Listen on 127.0.0.1 here; connect to 127.0.0.1:`port` inside `ns`."""

    def __init__(self, ns: NetNS, port: int) -> None:
        self.ns, self.port = ns, port
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.server.wait_closed(), 5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _nodelay(writer)
        sock = await asyncio.to_thread(self.ns.create_connection, "127.0.0.1", self.port, timeout=5)
        sock.setblocking(False)
        r2, w2 = await asyncio.open_connection(sock=sock)
        await asyncio.gather(_splice(reader, w2), _splice(r2, writer))
        writer.close()
        w2.close()


class OutOfNamespace:
    """Listen on 127.0.0.1:`listen_port` inside `ns`; connect to 127.0.0.1:`port` here."""

    def __init__(self, ns: NetNS, listen_port: int, port: int) -> None:
        self.ns, self.listen_port, self.port = ns, listen_port, port
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> int:
        sock = self.ns.listen(self.listen_port)
        sock.setblocking(False)
        self.server = await asyncio.start_server(self._handle, sock=sock)
        return self.listen_port

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.server.wait_closed(), 5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _nodelay(writer)
        r2, w2 = await asyncio.open_connection("127.0.0.1", self.port)
        _nodelay(w2)
        await asyncio.gather(_splice(reader, w2), _splice(r2, writer))
        writer.close()
        w2.close()
