"""Local TCP ports forwarded to the agent's services (`forward:` in the workstation config).

Each accepted connection becomes one stream ``{"target": "tcp:<service>", "codec":
"zstd"}`` spliced with the socket (relay.net.tcpsplice). We always offer zstd; the agent
compresses its direction if the service is configured so, and we compress ours once an
earlier stream to the same service came back compressed (the per-service cache below,
learned from the agent's marker byte, see relay.net.compression).

Bounds, so that one local program cannot hurt another: at most MAX_CONNECTIONS at once in
all and a share of them per forward (`share`), so one program's kept-alive connections to
one service do not make every other forward refuse; a connection whose program takes
nothing for STALL_TIMEOUT while data waits for it is reset, and one idle both ways for
IDLE_TIMEOUT is closed. Each connection's unread data holds little of the session's link
window (relay.workstation.session.FORWARD_LINK_CREDIT), so stalled ones, before their
timeout, do not stop the session's other streams; and all of it together is bounded by
the session's ForwardBudget (relay.workstation.forwardbudget, 16 MiB: the longest unread
connection is reset beyond it), not 1 MiB a connection (256 MiB at worst).
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
from relay.workstation.localpeer import AccountGate
from relay.workstation.tunnel import Tunnel, TunnelUnavailable

__all__ = ["MAX_CONNECTIONS", "ForwardListenError", "ForwardStats", "Forwarder"]

log = logging.getLogger(__name__)

MAX_CONNECTIONS: Final = 256  # forwarded connections at once, all ports together
MIN_SHARE: Final = 16  # each forward may hold max(MIN_SHARE, MAX_CONNECTIONS // forwards)
OPEN_TIMEOUT: Final = 10.0  # how long a new connection waits for a routed stream
STALL_TIMEOUT: Final = 60.0
"""A connection whose local program takes none of the bytes waiting for it for this long
is reset: it would hold its stream's window (1 MiB at the workstation) and its slot for
as long as the program lives. Long enough for a program that pauses (a paused download)."""
IDLE_TIMEOUT: Final = 300.0
"""A connection with no byte either way for this long is closed (a FIN to the program, the
stream reset towards the service): kept-alive connections a program forgot would
otherwise hold their forward's share for good."""


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
    refused: int = 0  # over MAX_CONNECTIONS, or over the forward's share
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
        stall_timeout: float = STALL_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
        accounts: AccountGate | None = None,
    ) -> None:
        """`accounts`: who on this PC may connect (`local_access`); None: anyone."""
        self.tunnel = tunnel
        self.accounts = accounts or AccountGate()
        self.forwards = dict(forwards)
        self.compression_level = compression_level
        self.open_timeout = open_timeout
        self.max_connections = max_connections
        # Connections one forward may hold at once: a fair part of the whole, never less
        # than MIN_SHARE (a browser alone opens 6 per host), never more than the whole.
        self.share = min(max_connections, max(MIN_SHARE, max_connections // max(1, len(forwards))))
        self.stall_timeout = stall_timeout
        self.idle_timeout = idle_timeout
        self._per_forward: Counter[Address] = Counter()
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
                        functools.partial(self._accepted, service=service, address=address),
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
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        service: str,
        address: Address,
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        full = len(self._tasks) >= self.max_connections
        if full or self._per_forward[address] >= self.share:
            self.stats.refused += 1
            log.warning(
                "too many forwarded connections",
                extra={"service": service, "limit": "all" if full else "forward"},
            )
            abort_socket(writer)
            return
        self._tasks.add(task)
        self._per_forward[address] += 1
        try:
            if not self.accounts.anyone and not await self._admitted(writer):
                abort_socket(writer)
                return
            await self._forward(reader, writer, service)
        finally:
            self._tasks.discard(task)
            self._per_forward[address] -= 1

    async def _admitted(self, writer: asyncio.StreamWriter) -> bool:
        """Whether the program at the far end runs as our account (checked in a thread:
        the lookup reads the system's socket table)."""
        peer, local = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
        if not peer or not local:
            return False
        return await asyncio.to_thread(self.accounts.admit, "forward", peer[:2], local[:2])

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
            result = await splice(
                codec,
                reader,
                writer,
                stats=stats,
                stall_timeout=self.stall_timeout,
                idle_timeout=self.idle_timeout,
            )
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
