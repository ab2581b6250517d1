"""Topologies for the operations tests: real `relay` processes in any number and shape.

`Ops` writes a site PKI and the configs of as many gateways, agents and workstations as a
test asks for (127.0.0.x only), and starts them from the CLI. Every role listens on port 0
and says where in its log (tests.ports); a gateway whose port must be known before it
runs gets a port reserved for the whole test (tests.ports.reserve). The test
process plays everything around them: the hospital's TCP services (`serving`), the
user's client in front of the forwarded ports, a TLS probe that records which client
certificate a dial presents (`CertProbe`), a switchable TCP proxy (`SwitchProxy`), and
HAProxy in front of several gateways (`haproxy_node`). Every wait is bounded; every
process is stopped by its PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from relay.net import tls
from relay.trust import pki
from tests.e2e.chain import HOST, RELAY, ROOT, Proc, forward_hosts
from tests.ports import Bound, reserve

__all__ = [
    "DRAIN_GRACE",
    "HOST",
    "SITE",
    "WAIT",
    "CertProbe",
    "Node",
    "Ops",
    "SwitchProxy",
    "Upload",
    "echo_once",
    "file_snapshot",
    "haproxy_node",
    "http_get",
    "open_forward",
    "peer_serial",
    "scrape",
    "serial_of",
    "serving",
    "status_of",
    "until_echo_works",
    "value",
    "wait_for",
    "written_files",
]

WAIT = 30.0  # upper bound of every wait; nothing asserts on these
DRAIN_GRACE = 2.0  # tests of the drain set their own
TRUST_DOMAIN = "hospital.test"
SITE = "main"
BLOCK = os.urandom(1 << 20)
LIMITS = "limits: {keepalive_interval: 1s, keepalive_timeout: 3s}\n"
HAPROXY_MODEL = ROOT / "deploy" / "haproxy" / "haproxy.cfg"

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


# --------------------------------------------------------------------------- processes


@dataclass
class Node(Proc):
    """One process (a role, or HAProxy) with its own working directory; its ports are
    the ones its current incarnation reported (waiting for them if need be)."""

    role: str = ""
    config: Path | None = None
    services: tuple[str, ...] = ()  # workstations: the services forwarded
    reserved: socket.socket | None = None  # the port it listens on, when known in advance

    @property
    def metrics_port(self) -> int:
        return self.listening("metrics").port

    @property
    def listen_port(self) -> int:
        """A gateway's TLS port (HAProxy's front): reserved, or the one it reported."""
        if self.reserved is not None:
            return int(self.reserved.getsockname()[1])
        return self.listening("gateway").port

    @property
    def forwards(self) -> dict[str, Bound]:
        """A workstation's forwards: service -> where it listens."""
        return {svc: self.listening("forward", service=svc) for svc in self.services}

    def wait_exit(self, timeout: float) -> int:
        """The exit status, within `timeout` (TimeoutExpired otherwise)."""
        assert self.popen is not None
        return self.popen.wait(timeout)


class Ops:
    """A site `main` with a PKI in `tmp/pki`, and the nodes a test adds to it."""

    def __init__(self, tmp: Path, services: Mapping[str, tuple[int, bool]]) -> None:
        self.tmp = tmp
        self.services = dict(services)  # name -> (port, compress)
        self.pki = tmp / "pki"
        pki.init_pki(self.pki, TRUST_DOMAIN, SITE, ["localhost", HOST])
        self.nodes: dict[str, Node] = {}

    # -- identities

    def device(self, name: str) -> Path:
        """The identity directory of device `name` (issued on first use)."""
        out = self.tmp / f"id-{name}"
        if not (out / "device.crt").exists():
            pki.issue_device(self.pki, SITE, name, out)
        return out

    # -- nodes

    def _node(self, name: str, role: str, config_text: str, **kw: object) -> Node:
        assert name not in self.nodes, name
        config = self.tmp / f"{name}.yaml"
        config.write_text(config_text)
        node = Node(
            name,
            [*RELAY, role, "--config", str(config)],
            self.tmp / f"{name}.log",
            role=role,
            config=config,
            **kw,  # type: ignore[arg-type]
        )
        self.nodes[name] = node
        return node

    def gateway(
        self,
        name: str = "gw",
        *,
        drain_grace: float = DRAIN_GRACE,
        log_level: str = "info",
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        reserved: bool = False,
    ) -> Node:
        """A gateway on port 0; with `reserved`, on a port reserved now (known before
        it runs, the same after a restart)."""
        sock = reserve() if reserved else None
        text = (
            f"listen: {HOST}:{0 if sock is None else sock.getsockname()[1]}\n"
            f"metrics_listen: {HOST}:0\n"
            f"tls: {{cert: {self.pki}/gateway.crt, key: {self.pki}/gateway.key, "
            f"ca: {self.pki}/ca.crt}}\n"
            f"drain_grace: {drain_grace}s\n"
            f"log_level: {log_level}\n" + LIMITS
        )
        return self._node(
            name,
            "gateway",
            text,
            cwd=cwd or ROOT,
            env=env,
            reserved=sock,
        )

    def agent(
        self,
        name: str,
        gateways: Sequence[int],
        *,
        services: Sequence[str] | None = None,
        drain_grace: float = DRAIN_GRACE,
    ) -> Node:
        return self._node(name, "agent", self.agent_config(name, gateways, services, drain_grace))

    def agent_config(
        self,
        name: str,
        gateways: Sequence[int],
        services: Sequence[str] | None = None,
        drain_grace: float = DRAIN_GRACE,
        metrics: str = f"{HOST}:0",
    ) -> str:
        """The text of an agent's config (tests rewrite it for reloads)."""
        chosen = self.services if services is None else {s: self.services[s] for s in services}
        lines = "".join(
            f"  {svc}: {{address: '{HOST}:{port}', compress: {str(compress).lower()}}}\n"
            for svc, (port, compress) in chosen.items()
        )
        return (
            f"site: {SITE}\n"
            f"gateways: [{', '.join(f'{HOST}:{p}' for p in gateways)}]\n"
            f"tls: {{cert: {self.pki}/agent.crt, key: {self.pki}/agent.key, "
            f"ca: {self.pki}/ca.crt}}\n"
            f"state_dir: {self.tmp}/{name}-state/\n"
            f"metrics_listen: {metrics}\n"
            "reconnect: {initial: 0.1s, max: 1s}\n"
            f"drain_grace: {drain_grace}s\n"
            "services:\n" + lines + LIMITS
        )

    def workstation(
        self,
        name: str,
        gateway: int,
        *,
        device: str | None = None,
        identity_dir: Path | None = None,
        drain_grace: float = DRAIN_GRACE,
    ) -> Node:
        """A workstation with a forward for every service (the agent decides which work)."""
        identity = identity_dir or self.device(device or name)
        hosts = forward_hosts(list(self.services))
        forward = ", ".join(f'"{hosts[svc]}:0": {svc}' for svc in self.services)
        text = (
            f"gateway: {HOST}:{gateway}\n"
            f"identity_dir: {identity}/\n"
            f"metrics_listen: {HOST}:0\n"
            "reconnect: {initial: 0.1s, max: 1s}\n"
            f"drain_grace: {drain_grace}s\n"
            f"forward: {{{forward}}}\n" + LIMITS
        )
        return self._node(name, "workstation", text, services=tuple(self.services))

    def add(self, node: Node) -> Node:
        """A node that is not a relay role (HAProxy), stopped with the others."""
        self.nodes[node.name] = node
        return node

    # -- running

    def start(self, *nodes: Node) -> None:
        for node in nodes:
            node.start()

    def stop_all(self) -> None:
        """SIGTERM every node at once, then wait for each (SIGKILL after 15 s), by PID."""
        for node in self.nodes.values():
            node.send_signal(signal.SIGTERM)
        for node in self.nodes.values():
            node.stop(timeout=15.0)
        for node in self.nodes.values():
            if node.reserved is not None:
                node.reserved.close()

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {n.name}\n{n.output()[-tail:]}" for n in self.nodes.values())


def haproxy_node(tmp: Path, backends: Sequence[Node]) -> Node:
    """HAProxy as in deploy/haproxy/haproxy.cfg (TCP mode, TLS passed through, /readyz
    checks), without chroot, user switch, syslog or socket. Its front port is reserved
    here (`.listen_port`). The backends must be running: their ports are the ones they
    reported."""
    text = HAPROXY_MODEL.read_text()
    front = reserve()
    gw1, gw2 = backends
    mapping = {
        "bind 127.0.0.1:8443": f"bind {HOST}:{front.getsockname()[1]}",
        "127.0.0.1:18443 check port 19101": f"{HOST}:{gw1.listen_port} check port "
        f"{gw1.metrics_port}",
        "127.0.0.1:28443 check port 29101": f"{HOST}:{gw2.listen_port} check port "
        f"{gw2.metrics_port}",
    }
    for old, new in mapping.items():
        assert old in text, f"{HAPROXY_MODEL} changed: {old!r} not found"
        text = text.replace(old, new)
    lines = []
    for line in text.splitlines():
        words = line.split()
        if (
            line.startswith("    ")
            and words
            and words[0] in ("chroot", "user", "group", "stats", "log")
        ):
            continue
        lines.append(line)
    config = tmp / "haproxy.cfg"
    config.write_text("\n".join(lines) + "\n")
    return Node(
        "haproxy", ["haproxy", "-db", "-f", str(config)], tmp / "haproxy.log", cwd=tmp,
        reserved=front,
    )  # fmt: skip


# --------------------------------------------------------------------------- waiting


async def wait_for(
    what: str,
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    within: float = WAIT,
    interval: float = 0.1,
    logs: Callable[[], str] | None = None,
) -> None:
    """Poll `check` until it is true; AssertionError naming `what` after `within` s."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n" + (logs() if logs else ""))
        await asyncio.sleep(interval)


# --------------------------------------------------------------------------- HTTP, metrics


async def http_get(port: int, path: str, timeout: float = 10.0) -> tuple[int, str]:  # noqa: ASYNC109
    """(status, body) of GET `path` on the admin listener at `port`."""

    async def get() -> bytes:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: {HOST}\r\n\r\n".encode())
            return await reader.read(-1)
        finally:
            writer.close()

    raw = await asyncio.wait_for(get(), timeout)
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body.decode(errors="replace")


async def status_of(port: int, path: str) -> int | None:
    """The HTTP status, or None while nothing answers."""
    try:
        return (await http_get(port, path, timeout=5.0))[0]
    except (OSError, TimeoutError, IndexError, ValueError):
        return None


async def scrape(node: Node) -> str:
    status, body = await http_get(node.metrics_port, "/metrics")
    assert status == 200, (node.name, status)
    return body


def value(text: str, name: str, **labels: str) -> float:
    """The value of sample `name` (e.g. relay_streams_total) with exactly these labels
    among its labels (0 if absent): the sum over the samples that match."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


# --------------------------------------------------------------------------- services


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    writer.close()


async def sink_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Hashes everything until EOF, then answers "<bytes> <sha256>"."""
    h = hashlib.sha256()
    count = 0
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(1 << 20):
            h.update(data)
            count += len(data)
        writer.write(f"{count} {h.hexdigest()}".encode())
        await writer.drain()
    writer.close()


SERVICES: dict[str, tuple[Handler, bool]] = {
    "echo": (echo_handler, False),
    "zecho": (echo_handler, True),
    "sink": (sink_handler, False),
}


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[dict[str, tuple[int, bool]]]:
    """The hospital's TCP services in this process: name -> (port, compress)."""
    open_conns: set[asyncio.StreamWriter] = set()

    def tracked(handler: Handler) -> Handler:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            open_conns.add(writer)
            try:
                await handler(reader, writer)
            finally:
                open_conns.discard(writer)

        return serve

    servers = {
        name: (await asyncio.start_server(tracked(handler), HOST, 0), compress)
        for name, (handler, compress) in SERVICES.items()
    }
    try:
        yield {n: (s.sockets[0].getsockname()[1], c) for n, (s, c) in servers.items()}
    finally:
        for server, _ in servers.values():
            server.close()
        for writer in list(open_conns):  # handlers end on their own, none is cancelled
            writer.transport.abort()
        with contextlib.suppress(AssertionError):
            await wait_for("service connections to end", lambda: not open_conns, within=5)


# --------------------------------------------------------------------------- clients


async def open_forward(
    ws: Node, service: str, within: float = WAIT
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to a workstation's forwarded port, retrying while it comes up."""
    deadline = time.monotonic() + within
    while True:
        try:
            address = await ws.alistening("forward", service=service)
            reader, writer = await asyncio.open_connection(*address)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
            continue
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return reader, writer


async def echo_once(ws: Node, service: str, payload: bytes) -> bytes:
    """Everything that comes back; b"" when the stream is refused (the workstation then
    closes or resets the local connection)."""
    reader, writer = await open_forward(ws, service)
    try:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        return await reader.read(-1)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def until_echo_works(
    ws: Node, service: str = "echo", within: float = WAIT, logs: Callable[[], str] | None = None
) -> None:
    """The chain is up when a forwarded echo round trip succeeds."""
    probe = os.urandom(64)

    async def works() -> bool:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, TimeoutError):
            return await asyncio.wait_for(echo_once(ws, service, probe), 5.0) == probe
        return False

    await wait_for(f"an echo through {ws.name}", works, within, interval=0.2, logs=logs)


def block(i: int) -> bytes:
    """Deterministic, distinct 1 MiB blocks."""
    return i.to_bytes(8, "big") + BLOCK[8:]


@dataclass
class Upload:
    """`total` bytes to a sink service at about `rate` bytes/s; `sent` shows progress."""

    ws: Node
    service: str
    total: int
    rate: float
    sent: int = 0
    digest: str = ""

    async def run(self) -> str:
        """Sends everything, half-closes, returns the sink's answer "<bytes> <sha256>"."""
        reader, writer = await open_forward(self.ws, self.service)
        h = hashlib.sha256()
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            for i in range(self.total // len(BLOCK)):
                data = block(i)
                writer.write(data)
                h.update(data)
                await writer.drain()
                self.sent += len(data)
                ahead = self.sent / self.rate - (loop.time() - start)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            self.digest = h.hexdigest()
            writer.write_eof()
            return (await asyncio.wait_for(reader.read(-1), WAIT)).decode()
        finally:
            writer.close()


# --------------------------------------------------------------------------- TLS


def serial_of(cert_path: Path) -> int:
    return pki.load_cert(cert_path).serial_number


async def peer_serial(port: int, identity_dir: Path) -> int:
    """A fresh TLS connection to a gateway with a device certificate: the serial of the
    certificate the gateway presents."""
    ctx = tls.client_context(
        identity_dir / "device.crt", identity_dir / "device.key", identity_dir / "ca.crt"
    )
    _, writer = await asyncio.wait_for(
        asyncio.open_connection(HOST, port, ssl=ctx, server_hostname=HOST), 10
    )
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der).serial_number
    finally:
        writer.close()


class CertProbe:
    """A TLS server with the gateway's certificate that records the serial of each
    client certificate presented to it, then closes (a dialer sees a refusal)."""

    def __init__(self, site_pki: Path) -> None:
        self.ctx = tls.server_context(
            site_pki / "gateway.crt", site_pki / "gateway.key", site_pki / "ca.crt"
        )
        self.serials: list[int] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, HOST, 0, ssl=self.ctx, ssl_handshake_timeout=10
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if der:
            self.serials.append(x509.load_der_x509_certificate(der).serial_number)
        writer.transport.abort()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


class SwitchProxy:
    """A TCP proxy whose target can change; `cut()` drops every connection through it."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(HOST, self.target)
        except OSError:
            writer.transport.abort()
            return
        for w in (writer, up_writer):
            w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._writers.add(w)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(1 << 16):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._writers.discard(writer)
            self._writers.discard(up_writer)

    def cut(self) -> None:
        for w in list(self._writers):
            w.transport.abort()

    def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()


# --------------------------------------------------------------------------- files


def file_snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file under `directory`: relative path -> (size, mtime ns)."""
    out = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            st = path.stat()
            out[str(path.relative_to(directory))] = (st.st_size, st.st_mtime_ns)
    return out


def written_files(pid: int) -> list[str]:
    """Regular files process `pid` has open for writing (from /proc/PID/fd and fdinfo)."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
            flags = int(
                next(
                    line.split()[1]
                    for line in Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().splitlines()
                    if line.startswith("flags:")
                ),
                8,
            )
        except (OSError, StopIteration):
            continue  # closed meanwhile
        if target.startswith("/") and os.path.isfile(target) and flags & (os.O_WRONLY | os.O_RDWR):
            found.append(target)
    return found
