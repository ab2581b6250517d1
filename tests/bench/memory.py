"""Benchmark 2: resident memory per idle device link, against a minimal uvloop TLS server.

The gateway (a real process) and the baseline server each get a short warm-up (a few
links opened and closed, so that lazily loaded code and caches are in), then their
VmRSS is read before and after `links` idle links are opened from a separate client
process, and once more after the client has gone. All links use one device
certificate: the gateway keeps a set of links per device, so reusing it is fine, and
issuing thousands of certificates would only slow the benchmark down.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from tests.bench.procs import BenchError, Process, ProcessGroup, Worker, other_load
from tests.bench.report import Section, machine_line
from tests.bench.targets import SHIM_NOTE, BenchPki, gateway_needs_shim, start_gateway
from tests.bench.throughput import worker_args

WARM_LINKS: Final = 20
SETTLE: Final = 2.0
KB: Final = 1000
MB: Final = 1e6


@dataclass
class Result:
    name: str
    links: int
    before: int
    after: int
    closed: int
    other_load: float

    @property
    def per_link(self) -> float:
        return (self.after - self.before) / self.links


def _wait(what: str, ready: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.1)


def _measure(
    group: ProcessGroup,
    name: str,
    *,
    server: Process,
    port: int,
    count_open: Callable[[], float],
    mode: str,
    links: int,
    args: dict[str, Any],
) -> Result:
    warm = group.worker(
        f"{name}-warm", "idle-links", port=port, count=WARM_LINKS, mode=mode, **args
    )
    warm.expect("ready", 60)
    _wait("warm-up links", lambda: count_open() >= WARM_LINKS, 30)
    warm.stop()
    _wait("warm-up links to close", lambda: count_open() == 0, 30)
    time.sleep(SETTLE)
    before = server.rss()
    clients: Worker = group.worker(
        f"{name}-clients", "idle-links", port=port, count=links, mode=mode, **args
    )
    opened = clients.expect("ready", 60 + links / 20)
    if opened["opened"] != links:
        raise BenchError(f"{name}: opened {opened['opened']} of {links}: {opened['last_error']}")
    _wait(f"{links} links at {name}", lambda: count_open() >= links, 60)
    time.sleep(SETTLE)
    load = other_load([server, clients], 1.0)
    after = server.rss()
    clients.stop()
    _wait("links to close", lambda: count_open() == 0, 60)
    time.sleep(SETTLE)
    return Result(name, links, before, after, server.rss(), load)


def measure_gateway(workdir: Path, bench_pki: BenchPki, links: int) -> Result:
    args = worker_args(bench_pki, 600)
    with ProcessGroup(workdir) as group:
        gateway = start_gateway(group, bench_pki, workdir, max_links=links + 500)
        return _measure(
            group,
            "gateway",
            server=gateway.proc,
            port=gateway.port,
            count_open=gateway.links,
            mode="link",
            links=links,
            args=args,
        )


def measure_baseline(workdir: Path, bench_pki: BenchPki, links: int) -> Result:
    args = worker_args(bench_pki, 600)
    with ProcessGroup(workdir) as group:
        server = group.worker("tls-server", "tls-server", mode="idle", **args)
        port = server.expect("ready", 30)["port"]

        def count_open() -> float:
            return float(server.ask("stats")["open"])

        return _measure(
            group,
            "baseline",
            server=server,
            port=port,
            count_open=count_open,
            mode="tls",
            links=links,
            args=args,
        )


def run(workdir: Path, bench_pki: BenchPki, *, links: int) -> Section:
    results = [
        measure_gateway(workdir, bench_pki, links),
        measure_baseline(workdir, bench_pki, links),
    ]
    for r in results:
        print(f"memory {r.name}: {r.per_link / KB:.1f} KB per link", flush=True)
    gateway, baseline = results
    names = {
        "gateway": f"`relay gateway`, {links} relay links (mTLS, ALPN device)",
        "baseline": f"minimal uvloop TLS server (baseline), {links} TLS connections",
    }
    table = [
        [
            "server",
            "RSS before (MB)",
            "RSS with links (MB)",
            "per link (KB)",
            "RSS after they closed (MB)",
            "other load (cores)",
        ]
    ]
    for r in results:
        table.append(
            [
                names[r.name],
                f"{r.before / MB:.1f}",
                f"{r.after / MB:.1f}",
                f"**{r.per_link / KB:.1f}**",
                f"{r.closed / MB:.1f}",
                f"{r.other_load:.2f}",
            ]
        )
    per = gateway.per_link / KB
    ratio = gateway.per_link / baseline.per_link
    notes = [
        f"Target (issue 10): ≤ 1.1x the bare TLS server's memory per link. Measured "
        f"**{ratio:.2f}x**: " + ("met." if ratio <= 1.1 else "**missed**."),
        f"Target: ≤ 50 KB per idle device link. Measured **{per:.1f} KB**: "
        + ("met." if per <= 50 else "**missed**.")
        + f" Of that, TLS alone (the baseline) costs {baseline.per_link / KB:.1f} KB; the "
        f"relay link adds {(gateway.per_link - baseline.per_link) / KB:.1f} KB "
        "(Link, protocol core, keepalive timer, registry entry).",
        "VmRSS of the server process (/proc/PID/status) after a warm-up of "
        f"{WARM_LINKS} links, then with all links open and idle for {SETTLE:g} s. "
        "KB = 1000 bytes.",
        "Every link presents the same device certificate (the gateway keeps a set of links "
        "per device, so this is legitimate); each is a full mTLS handshake. The baseline "
        "uses relay.net.tls.server_context too, with the same client certificate.",
        "Clients run in a separate process. 'RSS after they closed' shows how much the "
        "allocator keeps after the links are gone.",
    ]
    if gateway_needs_shim(bench_pki):
        notes.append(SHIM_NOTE)
    return Section(
        "memory",
        "Memory per idle device link",
        machine_line(),
        table,
        notes,
    )
