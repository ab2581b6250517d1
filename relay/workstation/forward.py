"""Local TCP ports forwarded to the agent's services (`forward:` in the workstation config).

Each accepted connection becomes one stream ``{"target": "tcp:<service>", "codec":
"zstd"}`` spliced with the socket (relay.net.tcpsplice). We always offer zstd; the agent
compresses its direction if the service is configured so, and we compress ours once an
earlier stream to the same service came back compressed (the per-service cache below,
learned from the agent's marker byte, see relay.net.compression).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from relay.net.compression import CodecStats, CodecStream
from relay.net.tcpsplice import SpliceStats, abort_socket, splice, tune_socket
from relay.ops.config import Address
from relay.ops.listening import announce
from relay.ops.tasks import drain_tasks
from relay.wire import CODEC_ZSTD, HEADER_CODEC, HEADER_TARGET, tcp_target
from relay.workstation.tunnel import Tunnel, TunnelUnavailable

__all__ = ["MAX_CONNECTIONS", "ForwardListenError", "ForwardStats", "Forwarder"]

log = logging.getLogger(__name__)

MAX_CONNECTIONS: Final = 256  # forwarded connections at once, all ports together
OPEN_TIMEOUT: Final = 10.0  # how long a new connection waits for a routed stream


class ForwardListenError(OSError):
    """A forwarded address cannot be listened on (taken, not local); names the address."""

    def __init__(self, address: Address, cause: OSError) -> None:
        super().__init__(cause.errno, f"cannot listen on {address}: {cause.strerror or cause}")
        self.address = address


@dataclass
class ForwardStats:
    """Counters for the metrics layer; keys are service names from the config."""

    connections: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)  # no stream could be opened
    refused: int = 0  # over MAX_CONNECTIONS
    outcomes: Counter[str] = field(default_factory=Counter)
    bytes_up: int = 0  # local client -> service
    bytes_down: int = 0  # service -> local client
    codec: CodecStats = field(default_factory=CodecStats)


class Forwarder:
    """One loopback listener per `forward:` entry; `start()`, `drain()`, `close()`."""

    def __init__(
        self,
        tunnel: Tunnel,
        forwards: Mapping[Address, str],
        *,
        compression_level: int = 3,
        open_timeout: float = OPEN_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.tunnel = tunnel
        self.forwards = dict(forwards)
        self.compression_level = compression_level
        self.open_timeout = open_timeout
        self.max_connections = max_connections
        self.compresses: dict[str, bool] = {}  # learned per service from the agent's marker
        self.stats = ForwardStats()
        self.bound: dict[Address, Address] = {}  # configured -> actual (port 0 resolved)
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def active(self) -> int:
        return len(self._tasks)

    async def start(self) -> None:
        """Listen on every forwarded address (fails if one is taken: config error)."""
        try:
            for address, service in self.forwards.items():
                try:
                    server = await asyncio.start_server(
                        functools.partial(self._accepted, service=service),
                        address.host,
                        address.port,
                    )
                except OSError as exc:
                    raise ForwardListenError(address, exc) from None
                self._servers.append(server)
                self.bound[address] = announce(
                    "forward", server.sockets[0].getsockname(), service=service
                )
        except BaseException:
            await self.stop_accepting()
            raise

    async def stop_accepting(self) -> None:
        for server in self._servers:
            server.close()
        self._servers.clear()

    async def _accepted(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, service: str
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._tasks) >= self.max_connections:
            self.stats.refused += 1
            log.warning("too many forwarded connections", extra={"service": service})
            abort_socket(writer)
            return
        self._tasks.add(task)
        try:
            await self._forward(reader, writer, service)
        finally:
            self._tasks.discard(task)

    async def _forward(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, service: str
    ) -> None:
        tune_socket(writer)
        self.stats.connections[service] += 1
        headers = {HEADER_TARGET: tcp_target(service), HEADER_CODEC: CODEC_ZSTD}
        try:
            stream = await self.tunnel.open_stream(headers, timeout=self.open_timeout)
        except TunnelUnavailable as exc:
            self.stats.failed[service] += 1
            log.warning(
                "no stream for a forwarded connection",
                extra={"service": service, "error": str(exc)},
            )
            abort_socket(writer)
            return
        except BaseException:
            abort_socket(writer)
            raise

        def learn(compressed: bool) -> None:
            self.compresses[service] = compressed

        codec = CodecStream(
            stream,
            self.compresses.get(service, False),
            self.compression_level,
            on_peer_marker=learn,
            stats=self.stats.codec,
        )
        stats = SpliceStats()
        try:
            result = await splice(codec, reader, writer, stats=stats)
        finally:
            stream.release()
            self.stats.bytes_up += stats.tcp_to_stream
            self.stats.bytes_down += stats.stream_to_tcp
        self.stats.outcomes[result.value] += 1
        log.info(
            "forwarded connection closed",
            extra={
                "service": service,
                "outcome": result.value,
                "code": stats.reset_code if stats.reset_code is not None else "",
                "bytes_up": stats.tcp_to_stream,
                "bytes_down": stats.stream_to_tcp,
                "attempts": stream.attempts,
            },
        )

    async def drain(self, grace: float) -> int:
        """Stop accepting; let open connections finish within `grace`; cancel the rest."""
        await self.stop_accepting()
        return await drain_tasks(self._tasks, grace, "forwarded connections")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.drain(0.0)
