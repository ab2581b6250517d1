"""A directory that never answers: a TCP listener on 127.0.0.1 that accepts connections
and reads what comes, but never says a word (a hung domain controller, a firewall that
lets the handshake through). Every LDAP operation against it waits out its timeout.
And `Trickle`: one that answers a byte at a time, never finishing, under any timeout."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace

from relay.agent.directory import DirectorySettings
from tests.pki_helpers import HOST


class BlackHole:
    """`connections`: how many were accepted so far (each LDAP operation opens one)."""

    def __init__(self) -> None:
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def start(self) -> BlackHole:
        self._server = await asyncio.start_server(self._hold, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        while await reader.read(4096):
            pass  # swallowed: no answer ever

    def settings(self, base: DirectorySettings, *, timeout: float) -> DirectorySettings:
        """`base` pointed at this listener (StartTLS: the StartTLS request never gets its
        answer, so each operation takes `timeout`)."""
        return replace(base, host=HOST, port=self.port, use_ssl=False, start_tls=True,
                       timeout=timeout)  # fmt: skip

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class Trickle:
    """A directory that answers, slowly for ever: to the first request of a connection
    it sends the start of an LDAP message 1 MiB long, then one byte every `every`
    seconds (below the client's timeout, which bounds each read and so never fires).
    `open`: connections the client has not closed yet; `idle` is set while none is."""

    def __init__(self, every: float = 0.2) -> None:
        self.every = every
        self.connections = 0
        self.open = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0
        self.idle = asyncio.Event()
        self.idle.set()

    async def start(self) -> Trickle:
        self._server = await asyncio.start_server(self._drip, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _drip(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.idle.clear()
        self._writers.add(writer)
        try:
            if await reader.read(4096):
                writer.write(b"\x30\x84\x00\x10\x00\x00")  # SEQUENCE of 2^20 bytes
                while not reader.at_eof():
                    writer.write(b"\x04")
                    await writer.drain()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.every):
                            await reader.read(4096)  # b"" once the client closed
        except ConnectionError:
            pass
        finally:
            self.open -= 1
            if not self.open:
                self.idle.set()
            self._writers.discard(writer)
            writer.close()

    def settings(self, base: DirectorySettings, *, timeout: float) -> DirectorySettings:
        """`base` pointed at this listener (its StartTLS request gets the trickle)."""
        return replace(base, host=HOST, port=self.port, use_ssl=False, start_tls=True,
                       timeout=timeout)  # fmt: skip

    async def close(self) -> None:
        for writer in list(self._writers):
            writer.close()  # its drip ends at the next write or read
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
