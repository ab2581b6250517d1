"""Processes and clients for the issue-4 end-to-end tests (enrollment, renewal, revocation).

A `Site` is one hospital site on loopback, every process started from the CLI as a user
would: a PKI from `relay pki init`, gateways (`relay gateway`), one agent linked to all
of them (`relay agent`, with `pki:`), workstations started on identities written by
`relay enroll`, and an echo service (a thread of the test process) behind the agent.

Run as a script, this module is a crafted enrollment client: `relay enroll`'s own code
path (relay.trust.enroll.run_enroll: stderr and exit status included) with one piece swapped
for a misbehaving one, since the real CLI cannot be made to send a bad request:

    python enroll_chain.py wrong_identity|oversized|malformed_csr CODE OUTDIR
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client.parser import text_string_to_metric_families

from relay.agent.audit import AUDIT_FILE, read_events
from relay.ops.config import Address
from relay.trust.codes import EnrollmentCode, parse_code

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests.*` when run as a script

from tests.e2e.chain import HOST, RELAY, ROOT, Proc, relay_cli
from tests.ports import reserve

T = TypeVar("T")

TRUST_DOMAIN = "hospital.test"
SITE = "main"
ECHO = "echo"
RATE_LIMITED = "too many attempts from this address"
NO_ROUTE = "has no link to the agent"
WAIT = 30.0
LIMITS = "limits: {keepalive_interval: 1s, keepalive_timeout: 3s}\n"
FAST = "reconnect: {initial: 0.1s, max: 1s}\n"


# --- waiting --------------------------------------------------------------------------


def wait_for(
    probe: Callable[[], T | None], what: str, within: float = WAIT, every: float = 0.05
) -> T:
    """Poll `probe` until it returns something other than None/False; fail after `within`."""
    deadline = time.monotonic() + within
    while True:
        with contextlib.suppress(OSError):
            value = probe()
            if value is not None and value is not False:
                return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        time.sleep(every)


# --- metrics and health ---------------------------------------------------------------


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=5) as answer:
            return int(answer.status), answer.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def metric(port: int, name: str, **labels: str) -> float:
    """The sum of the samples of `name` (a counter's `_total` included) whose labels
    contain `labels`; 0 if there are none."""
    _, text = http_get(port, "/metrics")
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (name, f"{name}_total") and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                total += sample.value
    return total


# --- the echo service behind the agent ------------------------------------------------


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with contextlib.suppress(OSError):
            while data := sock.recv(1 << 16):
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__((HOST, 0), _EchoHandler)
        self.port: int = self.server_address[1]
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _SyslogHandler(socketserver.BaseRequestHandler):
    server: SyslogCollector

    def handle(self) -> None:
        with (
            contextlib.suppress(OSError),
            self.server.context.wrap_socket(self.request, server_side=True) as tls,
        ):
            buffer = b""
            while data := tls.recv(1 << 16):
                buffer += data
                while b" " in buffer:  # RFC 5425 octet counting: LEN SP MSG
                    size, rest = buffer.split(b" ", 1)
                    if len(rest) < int(size):
                        break
                    self.server.messages.append(rest[: int(size)])
                    buffer = rest[int(size) :]


class SyslogCollector(socketserver.ThreadingTCPServer):
    """A syslog-over-TLS collector (RFC 5425) with the certificate it is given."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, cert: Path, key: Path) -> None:
        super().__init__((HOST, 0), _SyslogHandler)
        self.port: int = self.server_address[1]
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.messages: list[bytes] = []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def events(self) -> list[dict[str, Any]]:
        """The JSON audit events carried (after the RFC 5424 header and the BOM)."""
        out = []
        for message in list(self.messages):
            _, _, body = message.partition(b"\xef\xbb\xbf")
            out.append(json.loads(body))
        return out


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def echo_once(port: int, payload: bytes, timeout: float = 10.0) -> bytes:
    """One round trip through a forwarded port: send, half-close, read to EOF."""
    with connect(port, timeout) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while data := sock.recv(1 << 16):
            chunks.append(data)
        return b"".join(chunks)


def echo_works(port: int, timeout: float = 5.0) -> bool:
    probe = os.urandom(256)
    try:
        return echo_once(port, probe, timeout) == probe
    except OSError:
        return False


class Conversation(threading.Thread):
    """A long-lived connection through a forward: writes a chunk, reads its echo, again,
    until stopped or until the connection fails (`failed_at`, monotonic time)."""

    def __init__(self, port: int, chunk: int = 4096, pause: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.sock = connect(port)
        self.chunk = chunk
        self.pause = pause
        self.stop = threading.Event()
        self.transferred = 0  # bytes echoed back intact
        self.failed_at: float | None = None
        self.error: str | None = None

    def run(self) -> None:
        try:
            with self.sock:
                while not self.stop.is_set():
                    payload = os.urandom(self.chunk)
                    self.sock.sendall(payload)
                    got = b""
                    while len(got) < len(payload):
                        data = self.sock.recv(len(payload) - len(got))
                        if not data:
                            raise ConnectionError("EOF")
                        got += data
                    if got != payload:
                        raise AssertionError("the echo differs from what was sent")
                    self.transferred += len(got)
                    time.sleep(self.pause)
        except (OSError, ConnectionError, AssertionError) as exc:
            self.failed_at = time.monotonic()
            self.error = f"{type(exc).__name__}: {exc}"


# --- enrollment codes -----------------------------------------------------------------


def retarget(code: str, port: int) -> str:
    """The same code (same secret) pointing at another gateway port."""
    c = parse_code(code)
    return EnrollmentCode(
        Address(HOST, port), c.ca_fingerprint, c.site, c.device, c.token_id, c.secret
    ).encode()


def forge(code: str) -> str:
    """A well-formed code (valid checksum) whose secret is not the one issued."""
    c = parse_code(code)
    secret = bytes([c.secret[0] ^ 0xFF]) + c.secret[1:]
    return EnrollmentCode(
        c.gateway, c.ca_fingerprint, c.site, c.device, c.token_id, secret
    ).encode()


def token_id(code: str) -> str:
    return parse_code(code).token_id


# --- a site ---------------------------------------------------------------------------


@dataclass
class Gateway:
    """A gateway's TLS port is reserved for the whole test (tests restart gateways;
    agents and enrollment codes name the port)."""

    name: str
    socket: socket.socket = field(default_factory=reserve)

    @property
    def port(self) -> int:
        return int(self.socket.getsockname()[1])


@dataclass
class Site:
    """One site on loopback; `tmp` holds its PKI, configs, state and logs."""

    tmp: Path
    echo_port: int
    gateway_names: tuple[str, ...] = ("ga", "gb")
    pki_dir: Path = field(init=False)
    gateways: dict[str, Gateway] = field(default_factory=dict)
    procs: dict[str, Proc] = field(default_factory=dict)
    syslog_port: int | None = None  # a collector for the agent's audit copy
    collector: SyslogCollector | None = None

    def __post_init__(self) -> None:
        self.pki_dir = self.tmp / "pki"

    @property
    def agent_config(self) -> Path:
        return self.tmp / "agent.yaml"

    @property
    def state_dir(self) -> Path:
        return self.tmp / "state"

    def setup(self) -> None:
        done = relay_cli(
            "pki", "init", "--dir", str(self.pki_dir), "--trust-domain", TRUST_DOMAIN,
            "--site", SITE, "--gateway-name", f"localhost,{HOST}",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        for name in self.gateway_names:
            gw = self.gateways[name] = Gateway(name)
            (self.tmp / f"{name}.yaml").write_text(
                f"listen: {HOST}:{gw.port}\n"  # reserved
                f"metrics_listen: {HOST}:0\n"
                "tls: {cert: pki/gateway.crt, key: pki/gateway.key, ca: pki/ca.crt}\n"
                "drain_grace: 1s\n" + LIMITS
            )
            self.procs[name] = self._proc(name, "gateway", self.tmp / f"{name}.yaml")
        self.write_agent_config()
        self.procs["agent"] = self._proc("agent", "agent", self.agent_config)

    def write_agent_config(self, device_lifetime: str | None = None) -> None:
        gateways = ", ".join(f"'{HOST}:{gw.port}'" for gw in self.gateways.values())
        lifetime = f", device_lifetime: {device_lifetime}" if device_lifetime else ""
        audit = "audit: {max_size: 1MiB, keep: 3"
        if self.syslog_port is not None:
            audit += f", syslog: {{address: '{HOST}:{self.syslog_port}', ca: pki/ca.crt}}"
        self.agent_config.write_text(
            f"site: {SITE}\n"
            f"gateways: [{gateways}]\n"
            "tls: {cert: pki/agent.crt, key: pki/agent.key, ca: pki/ca.crt}\n"
            f"pki: {{ca_cert: pki/ca.crt, ca_key: pki/ca.key{lifetime}}}\n"
            "state_dir: state/\n"
            f"metrics_listen: {HOST}:0\n"
            "drain_grace: 1s\n"
            f"services: {{{ECHO}: '{HOST}:{self.echo_port}'}}\n"
            f"{audit}}}\n" + FAST + LIMITS
        )

    def _proc(self, name: str, role: str, config: Path) -> Proc:
        return Proc(name, [*RELAY, role, "--config", str(config)], self.tmp / f"{name}.log")

    # -- processes

    def start(self, *names: str) -> None:
        for name in names:
            self.procs[name].start()

    def stop(self, name: str, sig: int = signal.SIGTERM) -> int | None:
        return self.procs[name].stop(sig)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.stop()
        for gw in self.gateways.values():
            gw.socket.close()

    def metrics_port(self, name: str) -> int:
        """The metrics port that process `name` reported (since its last start)."""
        return self.procs[name].listening("metrics").port

    def logs(self, *names: str, tail: int = 3000) -> str:
        chosen = names or tuple(self.procs)
        return "\n".join(f"--- {n}\n{self.procs[n].output()[-tail:]}" for n in chosen)

    def routed(self, gateway: str) -> bool:
        """The gateway routes this site: it has an agent link that sent its snapshot."""
        status, body = http_get(self.metrics_port(gateway), "/readyz")
        sites = body.rsplit(":", 1)[-1].split(",")  # "listening; agent links for sites: a,b"
        return status == 200 and SITE in (name.strip() for name in sites)

    def wait_routed(self, *gateways: str) -> None:
        for name in gateways or tuple(self.gateways):
            wait_for(functools.partial(self.routed, name), f"{name} to route site {SITE}")

    def gateway_metric(self, gateway: str, name: str, **labels: str) -> float:
        return metric(self.metrics_port(gateway), name, **labels)

    # -- workstations

    def add_workstation(self, name: str, identity_dir: Path, gateway: str) -> Proc:
        config = self.tmp / f"{name}.yaml"
        config.write_text(
            f"gateway: {HOST}:{self.gateways[gateway].port}\n"
            f"identity_dir: {identity_dir}\n"
            f"metrics_listen: {HOST}:0\n"
            "drain_grace: 1s\n"
            f'forward: {{"{HOST}:0": {ECHO}}}\n' + FAST + LIMITS
        )
        proc = self.procs[name] = self._proc(name, "workstation", config)
        return proc

    def forward_port(self, ws: str) -> int:
        """Where workstation `ws` (as last started) forwards the echo service."""
        return self.procs[ws].listening("forward", service=ECHO).port

    def ws_metrics(self, ws: str) -> int:
        return self.metrics_port(ws)

    def wait_echo(self, ws: str, within: float = WAIT) -> None:
        port = self.forward_port(ws)
        try:
            wait_for(lambda: echo_works(port), f"an echo through {ws}", within, every=0.2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from None

    # -- the CLI

    def token(self, device: str, *extra: str, gateway: str = "ga") -> str:
        """`relay token create`; the code alone on stdout."""
        done = relay_cli(
            "token", "create", "--config", str(self.agent_config), "--device", device,
            "--gateway", f"{HOST}:{self.gateways[gateway].port}", *extra,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        code = done.stdout.strip()
        assert code.startswith("DMZR1-") and "\n" not in code, done.stdout
        return code

    def device_list(self) -> list[dict[str, Any]]:
        done = relay_cli("device", "list", "--json", "--config", str(self.agent_config))
        assert done.returncode == 0, done.stderr
        rows: list[dict[str, Any]] = json.loads(done.stdout)
        return rows

    def device(self, name: str) -> dict[str, Any]:
        rows = [row for row in self.device_list() if row["name"] == name]
        assert len(rows) == 1, rows
        return rows[0]

    def audit(self) -> list[dict[str, Any]]:
        return read_events(self.state_dir / AUDIT_FILE)


def enroll_cli(code: str, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return relay_cli("enroll", code, "--dir", str(out), *args)


def enroll_admitted(
    code: str, out: Path, *args: str, within: float = 40.0, argv: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`relay enroll` (or `argv`), again while the gateway's per-address rate limit turns
    it away (such an attempt never reaches the agent) or the route is not up yet."""
    deadline = time.monotonic() + within
    while True:
        if argv is None:
            done = enroll_cli(code, out, *args)
        else:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=60, check=False, cwd=ROOT
            )
        if RATE_LIMITED not in done.stderr and NO_ROUTE not in done.stderr:
            return done
        if time.monotonic() > deadline:
            raise AssertionError(f"enrollment never admitted: {done.stderr}")
        time.sleep(1.0)


def crafted_argv(mode: str, code: str, out: Path) -> list[str]:
    return [sys.executable, str(Path(__file__)), mode, code, str(out)]


def serial_of(identity_dir: Path) -> str | None:
    from relay.trust import pki

    try:
        return format(pki.load_cert(identity_dir / "device.crt").serial_number, "x")
    except (pki.PkiError, OSError):
        return None


@contextlib.contextmanager
def running_site(
    tmp: Path, echo: EchoServer, gateway_names: tuple[str, ...] = ("ga", "gb")
) -> Iterator[Site]:
    site = Site(tmp, echo.port, gateway_names)
    site.setup()
    try:
        yield site
    finally:
        site.stop_all()


# --- the crafted client ---------------------------------------------------------------


def _crafted(mode: str, code: str, out: str) -> int:
    """relay enroll with one piece replaced; see the module docstring."""
    import relay.trust.enroll
    from relay.net.jsonframes import write_json
    from relay.trust import pki
    from relay.trust.identity import Identity

    make_csr = pki.make_csr
    patch_pki, patch_enroll = vars(pki), vars(relay.trust.enroll)
    if mode == "wrong_identity":

        def other_csr(key: Any, identity: Identity) -> Any:
            assert identity.trust_domain and identity.site
            return make_csr(key, Identity.device(identity.trust_domain, identity.site, "admin"))

        patch_pki["make_csr"] = other_csr
    elif mode == "malformed_csr":

        class Garbage:
            def public_bytes(self, encoding: Any) -> bytes:
                return b"-----BEGIN CERTIFICATE REQUEST-----\nnot a CSR\n" + (
                    b"-----END CERTIFICATE REQUEST-----\n"
                )

        patch_pki["make_csr"] = lambda key, identity: Garbage()
    elif mode == "oversized":

        async def padded(stream: Any, message: dict[str, object]) -> None:
            if "csr_pem" in message:
                message = {**message, "padding": "x" * 20_000}
            await write_json(stream, message, limit=1 << 20)  # past our own guard

        patch_enroll["write_json"] = padded
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    return relay.trust.enroll.run_enroll(code, Path(out), timeout=20.0)


if __name__ == "__main__":
    sys.exit(_crafted(*sys.argv[1:4]))
