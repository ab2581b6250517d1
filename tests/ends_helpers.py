"""Helpers for tests of the two end processes: an in-process gateway, configs, TCP services.

Everything runs on 127.0.0.1 with real TLS and certificates from relay.trust.pki.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from gateway.config import GatewayConfig
from gateway.server import GatewayServer
from gateway.service import run_gateway
from relay.agent.config import AgentConfig, ServiceConfig
from relay.dicom.pacs_target import PacsTarget
from relay.ops import privatefiles
from relay.ops.config import Address, Backoff, LinkSettings, TlsFiles
from relay.workstation.config import IDENTITY_FILES, WorkstationConfig
from relay.workstation.service import Workstation
from tests.pki_helpers import HOST, SitePki

WAIT = 10.0
FAST = Backoff(initial=0.02, maximum=0.2)  # reconnect quickly in tests
LIMITS = LinkSettings(keepalive_interval=2.0, keepalive_timeout=6.0)

TcpHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class GatewayHandle:
    server: GatewayServer
    stop: asyncio.Event
    task: asyncio.Task[None]

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    async def shutdown(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, WAIT)


async def start_gateway(pki: SitePki, tmp: Path, port: int = 0) -> GatewayHandle:
    config = GatewayConfig(
        path=tmp / "gateway.yaml",
        listen=Address(HOST, port),
        metrics_listen=None,
        tls=TlsFiles(pki.gateway.cert, pki.gateway.key, pki.ca),
        limits=LIMITS,
        drain_grace=0.5,
        handshake_timeout=5.0,
    )
    stop = asyncio.Event()
    started: asyncio.Future[GatewayServer] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        run_gateway(config, stop=stop, started=started.set_result, handle_signals=False)
    )
    server = await asyncio.wait_for(started, WAIT)
    return GatewayHandle(server, stop, task)


@contextlib.asynccontextmanager
async def running_gateway(pki: SitePki, tmp: Path, port: int = 0) -> AsyncIterator[GatewayHandle]:
    handle = await start_gateway(pki, tmp, port)
    try:
        yield handle
    finally:
        if not handle.task.done():
            await handle.shutdown()


def agent_config(
    pki: SitePki,
    tmp: Path,
    gateway_ports: list[int],
    services: dict[str, tuple[int, bool]],
    *,
    pacs: PacsTarget | None = None,
    drain_grace: float = 2.0,
    resolve_interval: float = 30.0,
    gateway_host: str = HOST,
) -> AgentConfig:
    return AgentConfig(
        path=tmp / "agent.yaml",
        site=pki.site,
        gateways=tuple(Address(gateway_host, p) for p in gateway_ports),
        tls=TlsFiles(pki.agent.cert, pki.agent.key, pki.ca),
        pki=None,
        state_dir=tmp / "state",
        metrics_listen=None,
        pacs=pacs,
        services=MappingProxyType(
            {
                name: ServiceConfig(name, Address(HOST, port), compress)
                for name, (port, compress) in services.items()
            }
        ),
        limits=LIMITS,
        reconnect=FAST,
        resolve_interval=resolve_interval,
        drain_grace=drain_grace,
    )


def device_identity_dir(pki: SitePki, tmp: Path, name: str = "ws1") -> Path:
    """OUTDIR/device.crt device.key ca.crt, as `relay pki issue` writes them."""
    pair = pki.device(name)
    directory = tmp / f"identity-{name}"
    directory.mkdir(parents=True, exist_ok=True)
    cert, key, ca = (directory / n for n in IDENTITY_FILES)
    cert.write_bytes(pair.cert.read_bytes())
    key.write_bytes(pair.key.read_bytes())
    privatefiles.protect(key)
    ca.write_bytes(pki.ca.read_bytes())
    return directory


def write_readable_by_others(path: Path, data: bytes = b"secret") -> None:
    """Create `path` the way a careless copy would: other users of the PC may read it
    (mode 0644; on Windows, read for BUILTIN\\Users inherited from its directory)."""
    if sys.platform == "win32":
        grant = "*S-1-5-32-545:(OI)(CI)R"
        subprocess.run(["icacls", str(path.parent), "/grant", grant], check=True)
        path.write_bytes(data)
        return
    old = os.umask(0o022)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    finally:
        os.umask(old)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def workstation_config(
    identity_dir: Path,
    tmp: Path,
    gateway_port: int,
    forward: Mapping[Address, str] | None = None,
    *,
    drain_grace: float = 2.0,
) -> WorkstationConfig:
    return WorkstationConfig(
        path=tmp / "workstation.yaml",
        gateway=Address(HOST, gateway_port),
        identity_dir=identity_dir,
        metrics_listen=None,
        dicom=None,
        forward=MappingProxyType(dict(forward or {})),
        limits=LIMITS,
        reconnect=FAST,
        drain_grace=drain_grace,
    )


def forward_zero(*services: str) -> dict[Address, str]:
    """`forward:` entries on port 0, one loopback address per service (two entries on
    one host and port 0 would be one key); `forwarded()` says where each listens."""
    return {Address(f"127.0.0.{i + 1}", 0): service for i, service in enumerate(services)}


def forwarded(ws: Workstation, service: str) -> Address:
    """Where a started workstation forwards `service` (the port it got)."""
    forwarder = ws.forwarder
    (address,) = (
        bound for asked, bound in forwarder.bound.items() if forwarder.forwards[asked] == service
    )
    return address


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo until EOF, then half-close back (a TCP service that honours half-close)."""
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    writer.close()


@dataclass
class TcpService:
    server: asyncio.Server
    connections: int = 0
    handler_tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def port(self) -> int:
        port: int = self.server.sockets[0].getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def tcp_service(handler: TcpHandler = echo_handler) -> AsyncIterator[TcpService]:
    service: TcpService

    async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        service.connections += 1
        await handler(reader, writer)

    server = await asyncio.start_server(wrapped, HOST, 0)
    service = TcpService(server)
    try:
        yield service
    finally:
        server.close()


async def wait_until(predicate: Callable[[], bool], within: float = WAIT) -> None:
    """Poll a condition (bounded): for states that have no event to wait on."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 - polling is the point here
            await asyncio.sleep(0.01)


async def tcp_exchange(target: int | Address, payload: bytes, *, half_close: bool = True) -> bytes:
    """Connect (to a port of HOST, or an address), send, half-close, read until EOF."""
    address = target if isinstance(target, Address) else Address(HOST, target)
    reader, writer = await asyncio.open_connection(address.host, address.port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        writer.write(payload)
        await writer.drain()
        if half_close:
            writer.write_eof()
        return await reader.read()
    finally:
        writer.close()
