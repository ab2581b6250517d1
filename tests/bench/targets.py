"""What the benchmarks run against: a throw-away PKI, a real `relay gateway` process and
HAProxy, each configured in a temporary directory."""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from relay.trust import pki
from tests.bench.gateway_shim import accept_tls_is_broken
from tests.bench.procs import (
    HOST,
    VENV_BIN,
    BenchError,
    Process,
    ProcessGroup,
    scrape,
    wait_port,
)

TRUST_DOMAIN: Final = "bench.test"
SITE: Final = "main"
START_TIMEOUT: Final = 20.0


@dataclass(frozen=True)
class BenchPki:
    """init_pki's files plus one device certificate (dev.crt/dev.key) and PEM bundles."""

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.crt"

    def pair(self, role: str) -> tuple[Path, Path]:
        return self.directory / f"{role}.crt", self.directory / f"{role}.key"

    @property
    def gateway_pem(self) -> Path:
        """Certificate and key in one file, as HAProxy's `crt` wants them."""
        return self.directory / "gateway.pem"


def make_pki(directory: Path) -> BenchPki:
    pki.init_pki(directory, TRUST_DOMAIN, SITE, ["127.0.0.1", "localhost"])
    pki.issue_device(directory, SITE, "bench", directory / "device")
    for suffix in ("crt", "key"):
        shutil.copy(directory / "device" / f"device.{suffix}", directory / f"device.{suffix}")
    out = BenchPki(directory)
    cert, key = out.pair("gateway")
    out.gateway_pem.write_bytes(cert.read_bytes() + key.read_bytes())
    out.gateway_pem.chmod(0o600)
    return out


@dataclass
class Gateway:
    proc: Process
    port: int
    metrics_port: int

    def routes(self, site: str = SITE) -> bool:
        """Whether the gateway routes `site` (an agent link that sent its snapshot), per
        /readyz ("... agent links for sites: a,b")."""
        url = f"http://{HOST}:{self.metrics_port}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                body = resp.read(65536).decode(errors="replace")
        except OSError:
            return False
        return site in body.rpartition("sites:")[2].strip().split(",")

    def links(self, role: str = "device") -> float:
        return scrape(self.metrics_port).get(f'relay_links{{role="{role}",site="{SITE}"}}', 0.0)


#: The gateway's `all_sources:` for benchmarks: lifted (they measure the gateway, not that
#: bound; the handshake benchmark sets it where it measures the bound itself).
ALL_SOURCES_LIFTED: Final = (
    "{handshakes: 1000000, handshake_rate: 1000000, handshake_burst: 1000000}"
)


def start_gateway(
    group: ProcessGroup,
    bench_pki: BenchPki,
    workdir: Path,
    *,
    max_links: int = 10000,
    env: dict[str, str] | None = None,
    extra_config: str = "",
    all_sources: str = ALL_SOURCES_LIFTED,
) -> Gateway:
    """`relay gateway --config FILE` as a real process; returns once /readyz answers.
    `all_sources`: its YAML value; lifted unless a benchmark measures that bound itself
    (the handshake benchmark measures how many the gateway can do)."""
    cert, key = bench_pki.pair("gateway")
    config = workdir / "gateway.yaml"
    config.write_text(
        f"listen: {HOST}:0\n"  # it says which ports it got
        f"metrics_listen: {HOST}:0\n"
        f"tls: {{cert: {cert}, key: {key}, ca: {bench_pki.ca}}}\n"
        "drain_grace: 1s\n"
        "handshake_timeout: 30s\n"
        f"max_links: {max_links}\n"
        # Every benchmark link presents the one bench device certificate from 127.0.0.1:
        # lift the per-device and per-source caps (and the source's handshake rate) a real
        # fleet (a certificate per device, PCs at many addresses) never notices.
        f"per_device: {{links: {min(max_links, 10_000)}, streams: 65535}}\n"
        f"per_source: {{handshakes: {max_links}, handshake_rate: 1000000, "
        "handshake_burst: 1000000}\n"
        f"all_sources: {all_sources}\n"
        "log_level: warning\n" + extra_config
    )
    proc = group.process("gateway", [*gateway_command(bench_pki), "--config", str(config)], env=env)
    port = proc.listening("gateway", START_TIMEOUT)
    metrics_port = proc.listening("metrics", START_TIMEOUT)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{metrics_port}/readyz", timeout=2):
                break
        except OSError as exc:
            if time.monotonic() > deadline or proc.popen.poll() is not None:
                raise BenchError(f"gateway not ready: {exc}: {proc.log_tail()}") from None
            time.sleep(0.05)
    return Gateway(proc, port, metrics_port)


@functools.cache
def _shim_needed(cert: Path, key: Path) -> bool:
    return accept_tls_is_broken(cert, key)


def gateway_needs_shim(bench_pki: BenchPki) -> bool:
    """Whether the uvloop accept_tls bug (see gateway_shim) is still in relay.net.tls."""
    return _shim_needed(*bench_pki.pair("gateway"))


def gateway_command(bench_pki: BenchPki) -> list[str]:
    """`relay gateway`, or the shim that works around the accept_tls bug while it exists."""
    if gateway_needs_shim(bench_pki):
        return [sys.executable, "-m", "tests.bench.gateway_shim"]
    return [str(VENV_BIN / "relay"), "gateway"]


SHIM_NOTE: Final = (
    "**The gateway ran through tests/bench/gateway_shim.py**: `relay gateway` under uvloop "
    "fails every link because `relay.net.tls.accept_tls` returns uvloop's internal SSLProtocol "
    "instead of the `Link` (uvloop's `connect_accepted_socket(ssl=...)` returns its own "
    "protocol). The shim replaces only `accept_tls` with a version that keeps the factory's "
    "protocol; everything else is the gateway's own code. The benchmark probes for the bug "
    "and uses plain `relay gateway` once it is fixed."
)


def haproxy_version() -> str:
    try:
        out = subprocess.run(
            ["haproxy", "-v"], check=False, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    first = out.stdout.splitlines()[0] if out.stdout else ""
    return " ".join(first.split()[:3])


def start_haproxy(
    group: ProcessGroup, workdir: Path, name: str, frontend: str, backend: str
) -> tuple[Process, int]:
    """HAProxy (1 thread, foreground) with the given frontend/backend bodies.

    `frontend` may use {port}; the listening port is returned.
    """
    if shutil.which("haproxy") is None:
        raise BenchError("haproxy is not installed (Debian package haproxy)")
    port = group.reserve()  # HAProxy binds it with SO_REUSEADDR; kept for the run
    config = workdir / f"{name}.cfg"
    config.write_text(
        "global\n"
        "  nbthread 1\n"
        "  maxconn 8000\n"
        "defaults\n"
        "  timeout connect 10s\n"
        "  timeout client 60s\n"
        "  timeout server 60s\n"
        f"frontend fe\n{frontend.format(port=port)}\n"
        f"backend be\n{backend}\n"
    )
    check = subprocess.run(
        ["haproxy", "-c", "-q", "-f", str(config)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    if check.returncode != 0:
        raise BenchError(f"{config}: haproxy -c failed: {check.stdout}{check.stderr}")
    proc = group.process(name, ["haproxy", "-db", "-f", str(config)])
    wait_port(port, START_TIMEOUT, proc)
    return proc, port
