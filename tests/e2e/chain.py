"""Three real processes from the CLI (`relay gateway|agent|workstation`) on loopback.

The test process plays the hospital's TCP services (behind the agent) and the user's
client (in front of the workstation's forwarded ports). Every role listens on port 0 and
the harness reads the ports from its log (tests.ports); the gateway's port, which the
others dial and which must survive its restarts, is reserved for the whole test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tests.ports import Bound, await_listening, reserve, wait_listening

ROOT = Path(__file__).resolve().parents[2]
RELAY = [sys.executable, "-m", "relay.cli"]
HOST = "127.0.0.1"
WAIT = 30.0


def forward_hosts(services: list[str]) -> dict[str, str]:
    """A loopback address per forwarded service: each listens on port 0 there (two
    forwards on one host with port 0 would be the same config key)."""
    return {name: f"127.0.0.{i + 1}" for i, name in enumerate(services)}


def relay_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RELAY, *args], capture_output=True, text=True, timeout=60, check=False, cwd=cwd or ROOT
    )


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


@dataclass
class Proc:
    """A child process logging to `log`."""

    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    cwd: Path = ROOT
    env: Mapping[str, str] | None = None
    since: int = 0  # the log's size when this incarnation started
    _bound: dict[tuple[int, str, str | None], Bound] = field(default_factory=dict, repr=False)

    def start(self) -> None:
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.since = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=None if self.env is None else dict(self.env),
                start_new_session=True,
            )

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def listening(self, what: str, service: str | None = None) -> Bound:
        """Where this incarnation's listener `what` is bound (waits for its log line)."""
        key = (self.since, what, service)
        if key not in self._bound:
            self._bound[key] = wait_listening(
                self.log, what, since=self.since, alive=lambda: self.running, service=service
            )
        return self._bound[key]

    async def alistening(
        self, what: str, service: str | None = None, within: float = WAIT
    ) -> Bound:
        """`listening` for coroutines."""
        return await await_listening(
            self.log, what, since=self.since, alive=lambda: self.running, within=within,
            service=service,
        )  # fmt: skip

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def send_signal(self, sig: int) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.popen is None:
            return None
        self.send_signal(sig)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait(5)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Chain:
    """PKI, configs and processes for one site `main` (and a device of site `siteb`, whose
    CA the gateway also trusts, but whose agent never comes)."""

    tmp: Path
    services: dict[str, tuple[int, bool]]  # name -> (port, compress)
    gateway_socket: socket.socket = field(default_factory=reserve)
    procs: dict[str, Proc] = field(default_factory=dict)

    @property
    def gateway_port(self) -> int:
        return int(self.gateway_socket.getsockname()[1])

    def setup(self) -> None:
        pki = self.tmp / "pki"
        for args in (
            ("pki", "init", "--dir", str(pki), "--trust-domain", "hospital.test",
             "--site", "main", "--gateway-name", f"localhost,{HOST}"),
            ("pki", "issue", "--dir", str(pki), "--site", "main", "--device", "ws1",
             "--out", str(self.tmp / "ws1")),
            ("pki", "init", "--dir", str(self.tmp / "pki-b"), "--trust-domain",
             "hospital.test", "--site", "siteb", "--gateway-name", HOST),
            ("pki", "issue", "--dir", str(self.tmp / "pki-b"), "--site", "siteb",
             "--device", "wsb", "--out", str(self.tmp / "wsb")),
        ):  # fmt: skip
            done = relay_cli(*args)
            assert done.returncode == 0, done.stderr
        # The gateway trusts both site CAs; wsb checks the gateway against main's CA (and
        # keeps its own issuer's, which its start-up check of its certificate wants).
        main_ca, b_ca = (pki / "ca.crt").read_bytes(), (self.tmp / "pki-b" / "ca.crt").read_bytes()
        (self.tmp / "bundle.crt").write_bytes(main_ca + b_ca)
        (self.tmp / "wsb" / "ca.crt").write_bytes(main_ca + b_ca)
        limits = "limits: {keepalive_interval: 1s, keepalive_timeout: 3s}\n"
        (self.tmp / "gateway.yaml").write_text(
            f"listen: {HOST}:{self.gateway_port}\n"  # reserved
            f"metrics_listen: {HOST}:0\n"
            "tls: {cert: pki/gateway.crt, key: pki/gateway.key, ca: bundle.crt}\n"
            "drain_grace: 2s\n" + limits
        )
        services = "".join(
            f"  {name}: {{address: '{HOST}:{port}', compress: {str(compress).lower()}}}\n"
            for name, (port, compress) in self.services.items()
        )
        (self.tmp / "agent.yaml").write_text(
            "site: main\n"
            f"gateways: ['{HOST}:{self.gateway_port}']\n"
            "tls: {cert: pki/agent.crt, key: pki/agent.key, ca: pki/ca.crt}\n"
            "state_dir: state/\n"
            f"metrics_listen: {HOST}:0\n"
            "reconnect: {initial: 0.1s, max: 1s}\n"
            "drain_grace: 2s\n"
            "services:\n" + services + limits
        )
        hosts = forward_hosts(list(self.services))
        forward = ", ".join(f'"{hosts[name]}:0": {name}' for name in self.services)
        for ws in ("ws1", "wsb"):
            (self.tmp / f"{ws}.yaml").write_text(
                f"gateway: {HOST}:{self.gateway_port}\n"
                f"identity_dir: {ws}/\n"
                f"metrics_listen: {HOST}:0\n"
                "reconnect: {initial: 0.1s, max: 1s}\n"
                "drain_grace: 2s\n"
                f"forward: {{{forward}}}\n" + limits
            )
        for role, conf in (
            ("gateway", "gateway"),
            ("agent", "agent"),
            ("ws1", "workstation"),
            ("wsb", "workstation"),
        ):
            self.procs[role] = Proc(
                role,
                [*RELAY, conf, "--config", str(self.tmp / f"{role}.yaml")],
                self.tmp / f"{role}.log",
            )

    def forward(self, service: str, ws: str = "ws1") -> Bound:
        """Where workstation `ws` forwards `service` (once it has said so)."""
        return self.procs[ws].listening("forward", service=service)

    def metrics_port(self, role: str) -> int:
        return self.procs[role].listening("metrics").port

    def start(self, *roles: str) -> None:
        for role in roles or ("gateway", "agent", "ws1"):
            self.procs[role].start()

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.stop()
        self.gateway_socket.close()

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{p.output()[-4000:]}" for n, p in self.procs.items())


@contextlib.contextmanager
def running_chain(tmp: Path, services: dict[str, tuple[int, bool]]) -> Iterator[Chain]:
    chain = Chain(tmp, services)
    chain.setup()
    try:
        yield chain
    finally:
        chain.stop_all()


async def open_forward(
    chain: Chain, service: str, ws: str = "ws1", within: float = WAIT
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to a forwarded port, once the workstation has said where it listens."""
    address = await chain.procs[ws].alistening("forward", service=service, within=within)
    reader, writer = await asyncio.open_connection(*address)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


async def echo_once(chain: Chain, service: str, payload: bytes, ws: str = "ws1") -> bytes:
    reader, writer = await open_forward(chain, service, ws)
    try:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        return await reader.read(-1)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def until_echo_works(chain: Chain, service: str, within: float = WAIT) -> None:
    """The chain is up when a forwarded echo round trip succeeds."""
    deadline = time.monotonic() + within
    probe = os.urandom(64)
    while True:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, TimeoutError):
            if await asyncio.wait_for(echo_once(chain, service, probe), 5.0) == probe:
                return
        if time.monotonic() > deadline:
            raise AssertionError("chain never came up\n" + chain.logs())
        await asyncio.sleep(0.2)
