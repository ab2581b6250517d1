"""Benchmark 3: new device links per second (full mTLS handshakes) that one server accepts.

Clients in CLIENT_PROCS separate processes open links as fast as they can (CONCURRENCY in
flight each): TLS 1.3 with the device certificate and ALPN device, send what a device
sends first (its SETTINGS frame), wait for the server's first bytes (proof that it
accepted the link: the gateway sends its SETTINGS only after checking the certificate,
ALPN and identity), then close. Servers, each a single process with one thread:

- gateway: `relay gateway`.
- baseline/python: a minimal uvloop TLS server with relay.net.tls.server_context that
  greets each connection with a SETTINGS frame after the handshake, and does nothing else.
- baseline/haproxy: HAProxy (`nbthread 1`) terminating mTLS (`verify required`) and
  answering a one-line HTTP request itself (`http-request return`), which the clients send
  in place of SETTINGS.

Then an established link during a flood (FLOOD_CASES): a device-shaped sender writing one
stream as fast as credit allows through `relay gateway` to an agent-shaped sink, alone,
then with the same clients flooding the gateway with handshakes, with all sources'
handshake budget (`all_sources:`) lifted, at its defaults and tight. The link's rate in each
flood over its rate alone says how much of the event loop the handshakes left it.
`python -m tests.bench.handshakes [seconds]` runs only these, once.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from tests.bench.procs import (
    QUIET_LIMIT,
    BenchError,
    Process,
    ProcessGroup,
    Worker,
    quietest,
    system_busy_seconds,
    wait_for_quiet,
)
from tests.bench.report import Section, machine_line, median
from tests.bench.targets import (
    ALL_SOURCES_LIFTED,
    SHIM_NOTE,
    BenchPki,
    Gateway,
    gateway_needs_shim,
    haproxy_version,
    make_pki,
    start_gateway,
    start_haproxy,
)
from tests.bench.throughput import worker_args
from tests.bench.workers import client_hello_bytes

SERVERS: Final = ("gateway", "baseline/python", "baseline/haproxy")
CLIENT_PROCS: Final = 2
CONCURRENCY: Final = 16
HTTP_HELLO: Final = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
#: The established link alone, then flooded with all sources' handshake budget lifted,
#: at its defaults (300 a second), and tight (50 a second: bites even where the clients
#: cannot ask for 300, as on a small shared machine). Case name -> `all_sources:` value.
FLOOD_CASES: Final = {
    "alone": None,
    "flood, unbounded": None,
    "flood, all_sources defaults": "{}",
    "flood, all_sources 50/s": "{handshake_rate: 50, handshake_burst: 100}",
}
MB: Final = 1e6


@dataclass
class Sample:
    rate: float  # links/s accepted
    server_cpu: float  # CPU seconds of the server in the window
    count: int
    errors: int
    seconds: float
    other_load: float

    @property
    def cpu_per_1000(self) -> float:
        return self.server_cpu / (self.count / 1000) if self.count else float("nan")


@dataclass
class ServerResult:
    server: str
    samples: list[Sample] = field(default_factory=list)


def _measure(server: Process, clients: list[Worker], warmup: float, duration: float) -> Sample:
    time.sleep(warmup)
    first = [c.ask("stats") for c in clients]
    cpu = server.cpu()
    ours = cpu + sum(c.cpu() for c in clients)
    busy = system_busy_seconds()
    time.sleep(duration)
    last = [c.ask("stats") for c in clients]
    cpu2 = server.cpu()
    ours2 = cpu2 + sum(c.cpu() for c in clients)
    busy2 = system_busy_seconds()
    count = sum(b["ok"] - a["ok"] for a, b in zip(first, last, strict=True))
    errors = sum(b["errors"] - a["errors"] for a, b in zip(first, last, strict=True))
    seconds = median([b["t"] - a["t"] for a, b in zip(first, last, strict=True)])
    if count == 0:
        raise BenchError(f"no link completed: {last[0]['last_error']}")
    return Sample(
        rate=count / seconds,
        server_cpu=cpu2 - cpu,
        count=count,
        errors=errors,
        seconds=seconds,
        other_load=max(0.0, (busy2 - busy - (ours2 - ours)) / seconds),
    )


@dataclass
class FloodSample:
    link_rate: float  # bytes/s the established link delivered at its sink
    handshakes: float  # flood links/s the gateway accepted
    refused: float  # flood connections/s closed on the clients (refused, or failed)
    gateway_cpu: float  # the gateway's CPU seconds per second
    other_load: float


def _routed(gateway: Gateway) -> None:
    deadline = time.monotonic() + 10
    while not gateway.routes():
        if time.monotonic() > deadline:
            raise BenchError(f"the gateway never routed the sink: {gateway.proc.log_tail()}")
        time.sleep(0.05)


def run_flood_case(
    case: str, bench_pki: BenchPki, workdir: Path, warmup: float, duration: float
) -> FloodSample:
    """One of FLOOD_CASES: the established link's rate, and what the flood got."""
    args: dict[str, Any] = worker_args(bench_pki, warmup + duration + 60)
    bound = FLOOD_CASES[case] or ALL_SOURCES_LIFTED
    with ProcessGroup(workdir) as group:
        gateway = start_gateway(group, bench_pki, workdir, all_sources=bound)
        sink = group.worker("sink", "link-sink", port=gateway.port, **args)
        sink.expect("ready", 30)
        _routed(gateway)
        sender = group.worker("sender", "link-sender", port=gateway.port, **args)
        sender.expect("ready", 30)
        clients = [
            group.worker(
                f"clients{i}",
                "handshake-client",
                port=gateway.port,
                hello=client_hello_bytes(),
                concurrency=CONCURRENCY,
                **args,
            )
            for i in range(CLIENT_PROCS if case != "alone" else 0)
        ]
        for client in clients:
            client.expect("ready", 30)
        procs: list[Process | Worker] = [gateway.proc, sink, sender, *clients]
        time.sleep(warmup)
        first, flood = sink.ask("stats"), [c.ask("stats") for c in clients]
        cpu, ours, busy = gateway.proc.cpu(), sum(p.cpu() for p in procs), system_busy_seconds()
        time.sleep(duration)
        last, flood2 = sink.ask("stats"), [c.ask("stats") for c in clients]
        cpu2, ours2 = gateway.proc.cpu(), sum(p.cpu() for p in procs)
        busy2 = system_busy_seconds()
        seconds = float(last["t"] - first["t"])

        def flood_rate(key: str) -> float:
            total: float = sum(b[key] - a[key] for a, b in zip(flood, flood2, strict=True))
            return total / seconds

        return FloodSample(
            link_rate=(last["bytes"] - first["bytes"]) / seconds,
            handshakes=flood_rate("ok"),
            refused=flood_rate("errors"),
            gateway_cpu=(cpu2 - cpu) / seconds,
            other_load=max(0.0, (busy2 - busy - (ours2 - ours)) / seconds),
        )


def flood_notes(samples: dict[str, list[FloodSample]]) -> list[str]:
    """The flood cases' medians, each link rate as a share of the link's rate alone."""
    alone = median([s.link_rate for s in samples["alone"]])
    parts = []
    for case in FLOOD_CASES:
        runs = samples[case]
        rate = median([s.link_rate for s in runs])
        parts.append(
            f"{case}: **{rate / MB:.0f} MB/s ({rate / alone:.2f}x alone)**, flood "
            f"{median([s.handshakes for s in runs]):.0f} handshakes/s accepted and "
            f"{median([s.refused for s in runs]):.0f}/s refused, gateway CPU "
            f"{median([s.gateway_cpu for s in runs]):.0%}, other load "
            f"{', '.join(f'{s.other_load:.2f}' for s in runs)} cores"
        )
    return [
        "An established link (one device stream, sender -> gateway -> sink) during a flood "
        f"of handshakes ({CLIENT_PROCS} x {CONCURRENCY} in flight, full mTLS, each closed "
        "once accepted; medians): " + "; ".join(parts) + ". The flood's clients share the "
        "machine's 2 cores with the link's ends and the gateway, so the ratios, not the "
        "rates, are the result."
    ]


def _haproxy(group: ProcessGroup, workdir: Path, bench_pki: BenchPki) -> tuple[Process, int]:
    frontend = (
        "  mode http\n"
        f"  bind 127.0.0.1:{{port}} ssl crt {bench_pki.gateway_pem} ca-file {bench_pki.ca}"
        " verify required ssl-min-ver TLSv1.3 alpn dmzrelay-device/1 no-tls-tickets\n"
        "  http-request return status 200 content-type text/plain string ok\n"
        "  default_backend be"
    )
    return start_haproxy(group, workdir, "haproxy-handshakes", frontend, "  mode http")


def run_server(
    server_name: str, bench_pki: BenchPki, workdir: Path, warmup: float, duration: float
) -> Sample:
    args: dict[str, Any] = worker_args(bench_pki, warmup + duration + 60)
    hello = client_hello_bytes()
    with ProcessGroup(workdir) as group:
        if server_name == "gateway":
            gateway = start_gateway(group, bench_pki, workdir)
            server, port = gateway.proc, gateway.port
        elif server_name == "baseline/python":
            worker = group.worker("tls-server", "tls-server", mode="hello", **args)
            port = worker.expect("ready", 30)["port"]
            server = worker
        else:
            server, port = _haproxy(group, workdir, bench_pki)
            hello = HTTP_HELLO.hex()
        clients = [
            group.worker(
                f"clients{i}",
                "handshake-client",
                port=port,
                hello=hello,
                concurrency=CONCURRENCY,
                **args,
            )
            for i in range(CLIENT_PROCS)
        ]
        for client in clients:
            client.expect("ready", 30)
        return _measure(server, clients, warmup, duration)


def run(
    workdir: Path,
    bench_pki: BenchPki,
    *,
    runs: int,
    warmup: float,
    duration: float,
    patience: float = 30.0,
    tries: int = 3,
) -> Section:
    results = {name: ServerResult(name) for name in SERVERS}
    floods: dict[str, list[FloodSample]] = {case: [] for case in FLOOD_CASES}
    for i in range(runs):
        for name in SERVERS:

            def measure(name: str = name) -> Sample:
                wait_for_quiet(patience=patience)
                return run_server(name, bench_pki, workdir, warmup, duration)

            sample = quietest(measure, lambda s: s.other_load, tries)
            results[name].samples.append(sample)
            print(
                f"handshakes run {i + 1}/{runs} {name}: {sample.rate:.0f}/s, "
                f"server CPU {sample.cpu_per_1000:.2f} s/1000 "
                f"({sample.server_cpu / sample.seconds:.0%} of a core), "
                f"errors {sample.errors}, other load {sample.other_load:.2f} cores",
                flush=True,
            )
        for case in FLOOD_CASES:

            def flooded(case: str = case) -> FloodSample:
                wait_for_quiet(patience=patience)
                return run_flood_case(case, bench_pki, workdir, warmup, duration)

            found = quietest(flooded, lambda s: s.other_load, tries)
            floods[case].append(found)
            print(f"handshakes run {i + 1}/{runs} {case}: {found}", flush=True)
    names = {
        "gateway": "`relay gateway`",
        "baseline/python": "minimal uvloop TLS server (baseline)",
        "baseline/haproxy": "HAProxy terminating mTLS (baseline)",
    }
    gw = median([s.rate for s in results["gateway"].samples])
    table = [
        [
            "server",
            "links/s per run",
            "median links/s",
            "gateway / this",
            "server CPU s per 1000",
            "server CPU use",
            "links/s per core of server CPU",
            "errors",
            "other load (cores)",
        ]
    ]
    for name, res in results.items():
        rate = median([s.rate for s in res.samples])
        cpu1000 = median([s.cpu_per_1000 for s in res.samples])
        table.append(
            [
                names[name],
                ", ".join(f"{s.rate:.0f}" for s in res.samples),
                f"**{rate:.0f}**",
                "—" if name == "gateway" else f"{gw / rate:.2f}x",
                f"{cpu1000:.2f}",
                f"{median([s.server_cpu / s.seconds for s in res.samples]):.0%}",
                f"{1000 / cpu1000:.0f}",
                str(sum(s.errors for s in res.samples)),
                ", ".join(f"{s.other_load:.2f}" for s in res.samples),
            ]
        )
    gw_core = 1000 / median([s.cpu_per_1000 for s in results["gateway"].samples])
    bare_core = 1000 / median([s.cpu_per_1000 for s in results["baseline/python"].samples])
    per_core = gw_core / bare_core
    notes = [
        f"Target (issue 10): handshakes per core-second of server CPU ≥ 0.9x the bare uvloop "
        f"TLS server. Measured **{gw_core:.0f}/s against {bare_core:.0f}/s = "
        f"{per_core:.2f}x**: " + ("met." if per_core >= 0.9 else "**missed**."),
        f"Target: ≥ 500 new device links/s on one core. Measured **{gw:.0f}/s** accepted "
        f"while sharing the machine with the clients; the gateway's CPU cost per link "
        f"gives **{gw_core:.0f}/s per core of gateway CPU**. "
        + (
            "Met."
            if min(gw, gw_core) >= 500
            else (
                "Met per core of gateway CPU; the measured rate is limited by the clients, which "
                "need the other core and more."
                if gw_core >= 500
                else "**Missed.**"
            )
        ),
        f"{CLIENT_PROCS} client processes x {CONCURRENCY} links in flight, {warmup:g} s "
        f"warm-up, {duration:g} s measured, {runs} runs per server interleaved, median "
        "reported. A link counts once the server's first bytes arrived. A run with more "
        f"than {QUIET_LIMIT} cores of other load was measured again, up to {tries} times, "
        "keeping the quietest.",
        "Each handshake: TLS 1.3, ECDSA P-256 certificates both ways verified against the "
        "site CA (VERIFY_X509_STRICT), X25519 key exchange, no session tickets or "
        "resumption (the gateway disables them), so every link is a full handshake.",
        "The clients' own handshake work (signing with the device key, verifying the "
        "gateway chain) competes with the server for the 2 cores; 'links/s per core of "
        "server CPU' is 1000 / 'server CPU s per 1000', the rate one dedicated core would "
        "sustain.",
    ]
    notes.extend(flood_notes(floods))
    if gateway_needs_shim(bench_pki):
        notes.append(SHIM_NOTE)
    return Section(
        "handshakes",
        "New device links per second (full mTLS handshakes)",
        machine_line([haproxy_version()]),
        table,
        notes,
    )


def main(argv: list[str]) -> int:
    """The flood cases only, once each, `argv[0]` seconds measured (default 5)."""
    duration = float(argv[0]) if argv else 5.0
    with tempfile.TemporaryDirectory(prefix="bench-flood-") as tmp:
        workdir = Path(tmp)
        bench_pki = make_pki(workdir / "pki")
        samples = {
            case: [run_flood_case(case, bench_pki, workdir, 2.0, duration)] for case in FLOOD_CASES
        }
    print("\n".join(flood_notes(samples)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
