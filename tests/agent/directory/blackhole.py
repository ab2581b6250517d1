"""A directory that never answers: a TCP listener on 127.0.0.1 that accepts connections
and reads what comes, but never says a word (a hung domain controller, a firewall that
lets the handshake through). Every LDAP operation against it waits out its timeout."""

from __future__ import annotations

import asyncio
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
