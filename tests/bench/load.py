"""Benchmark 5 (issue 10): 2,000 connected devices, a fraction issuing C-ECHO/C-FIND at a
rising aggregate rate, through the relay's real ends.

Processes: the PACS (tests/bench/wan_pacs.py, a small study), `relay gateway`, `relay
agent` (its DICOM service in front of the PACS) and one load generator
(tests/bench/loadgen.py as the `dicom-load` worker) holding every device link. The
generator opens the links, then raises the aggregate request rate step by step until a
step has an error or a p99 latency of 100 ms or more. Between the `step-start` and `step`
events the benchmark reads the gateway's and the agent's CPU time and, at the end of each
step, their RSS.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tests.bench.procs import BenchError, ProcessGroup, other_load, system_busy_seconds
from tests.bench.report import Section, machine_line
from tests.bench.targets import BenchPki
from tests.bench.throughput import worker_args
from tests.bench.wan_chain import Knobs, start_hospital

RATES: Final = (10, 20, 40, 60, 80, 120, 160, 200, 260, 320, 400)
P99_LIMIT_MS: Final = 100.0
MB: Final = 1e6


@dataclass
class Step:
    rate: float
    achieved: float
    ok: int
    errors: int
    last_error: str
    p50_ms: float
    p99_ms: float
    gateway_cpu: float  # cores
    agent_cpu: float
    pacs_cpu: float
    load_cpu: float
    gateway_rss: int
    agent_rss: int
    other_load: float

    @property
    def passed(self) -> bool:
        return self.errors == 0 and self.p99_ms < P99_LIMIT_MS


def measure(
    workdir: Path, bench_pki: BenchPki, *, links: int, active: int, step: float
) -> tuple[list[Step], dict[str, int]]:
    args = worker_args(bench_pki, 900)
    with ProcessGroup(workdir) as group:
        hospital = start_hospital(group, bench_pki, workdir, 4, Knobs())
        gateway, agent, pacs = hospital.gateway.proc, hospital.agent, hospital.pacs
        deadline = time.monotonic() + 30
        while not hospital.gateway.routes():
            if time.monotonic() > deadline:
                raise BenchError(f"the agent never became routable: {agent.log_tail()}")
            time.sleep(0.1)
        idle = {"gateway": gateway.rss(), "agent": agent.rss()}
        load = group.worker(
            "load",
            "dicom-load",
            port=hospital.gateway.port,
            links=links,
            active=active,
            rates=list(RATES),
            step=step,
            p99_limit_ms=P99_LIMIT_MS,
            **args,
        )
        ready = load.expect("ready", 120 + links / 10)
        if ready["opened"] != links:
            raise BenchError(f"load generator opened {ready['opened']} of {links} links")
        deadline = time.monotonic() + 60
        while hospital.gateway.links("device") < links:
            if time.monotonic() > deadline:
                raise BenchError(f"gateway holds {hospital.gateway.links('device')} links")
            time.sleep(0.2)
        idle["gateway_links"] = gateway.rss()
        procs = (gateway, agent, pacs, load)
        steps: list[Step] = []
        while True:
            event = load.expect("step-start", 60)
            cpu0 = [p.cpu() for p in procs]
            busy0, t0 = system_busy_seconds(), time.monotonic()
            done = load.expect("step", step + 120)
            cpu1 = [p.cpu() for p in procs]
            busy1, seconds = system_busy_seconds(), time.monotonic() - t0
            used = [(b - a) / seconds for a, b in zip(cpu0, cpu1, strict=True)]
            steps.append(
                Step(
                    rate=float(event["rate"]),
                    achieved=float(done["achieved"]),
                    ok=int(done["ok"]),
                    errors=int(done["errors"]),
                    last_error=str(done["last_error"]),
                    p50_ms=float(done["p50_ms"]),
                    p99_ms=float(done["p99_ms"]),
                    gateway_cpu=used[0],
                    agent_cpu=used[1],
                    pacs_cpu=used[2],
                    load_cpu=used[3],
                    gateway_rss=gateway.rss(),
                    agent_rss=agent.rss(),
                    other_load=max(0.0, (busy1 - busy0) / seconds - sum(used)),
                )
            )
            s = steps[-1]
            print(
                f"load {s.rate:g}/s: ok {s.ok}, errors {s.errors}, p50 {s.p50_ms:.0f} ms, "
                f"p99 {s.p99_ms:.0f} ms, gateway {s.gateway_cpu:.0%} agent {s.agent_cpu:.0%} "
                f"pacs {s.pacs_cpu:.0%} load {s.load_cpu:.0%}, other {s.other_load:.2f} "
                f"cores {s.last_error}",
                flush=True,
            )
            if not s.passed or len(steps) == len(RATES):
                break
        idle["other"] = int(other_load([], 1.0) * 100)
        return steps, idle


def run(
    workdir: Path, bench_pki: BenchPki, *, links: int = 2000, active: int = 200, step: float = 5.0
) -> Section:
    steps, idle = measure(workdir, bench_pki, links=links, active=active, step=step)
    best = max((s for s in steps if s.passed), key=lambda s: s.rate, default=None)
    table: list[list[str]] = [
        [
            "aggregate rate (req/s)",
            "ok",
            "errors",
            "p50 ms",
            "p99 ms",
            "gateway CPU",
            "agent CPU",
            "PACS CPU",
            "load generator CPU",
            "gateway RSS (MB)",
            "agent RSS (MB)",
            "other load (cores)",
        ]
    ]
    for s in steps:
        table.append(
            [
                f"{s.rate:g}" + ("" if s.passed else " ✗"),
                str(s.ok),
                str(s.errors),
                f"{s.p50_ms:.0f}",
                f"{s.p99_ms:.0f}",
                f"{s.gateway_cpu:.0%}",
                f"{s.agent_cpu:.0%}",
                f"{s.pacs_cpu:.0%}",
                f"{s.load_cpu:.0%}",
                f"{s.gateway_rss / MB:.0f}",
                f"{s.agent_rss / MB:.0f}",
                f"{s.other_load:.2f}",
            ]
        )
    failed = next((s for s in steps if not s.passed), None)
    notes = [
        (
            f"Highest rate with zero errors and p99 under {P99_LIMIT_MS:g} ms: "
            f"**{best.rate:g} requests/s** (p99 {best.p99_ms:.0f} ms); at it the gateway "
            f"used {best.gateway_cpu:.0%} of a core and {best.gateway_rss / MB:.0f} MB, the "
            f"agent {best.agent_cpu:.0%} and {best.agent_rss / MB:.0f} MB."
            if best
            else "No step met zero errors and p99 under 100 ms."
        ),
        (
            f"The first step that missed ({failed.rate:g}/s): {failed.errors} errors, p99 "
            f"{failed.p99_ms:.0f} ms"
            + (f"; last error: {failed.last_error}." if failed.last_error else ".")
            if failed
            else "No step missed: the rates tried were all met."
        ),
        f"{links} device links held by one load-generator process (one device "
        f"certificate, each link a full mTLS handshake); the first {active} of them issue "
        f"requests, in turn, open loop at the step's aggregate rate for {step:g} s: C-ECHO "
        "and study-level C-FIND alternately, one relay stream each "
        "(relay/dicom/PROTOCOL-DICOM.md) inside the link's sealed session (issue 9: one "
        "session per requesting link, opened and used once before the first step), each "
        "answered by the agent through its own DICOM association with the PACS (a "
        "pynetdicom PACS holding 4 instances).",
        f"Gateway RSS: {idle['gateway'] / MB:.0f} MB idle, "
        f"{idle['gateway_links'] / MB:.0f} MB with the {links} links; agent "
        f"{idle['agent'] / MB:.0f} MB idle. CPU columns: the process's CPU time over "
        "the step (100% = one core).",
        "PACS, gateway, agent and the load generator share the machine's 2 cores (and "
        "with other work: 'other load').",
    ]
    return Section(
        "load",
        "Load: 2,000 connected devices, C-ECHO/C-FIND at a rising rate (issue 10)",
        machine_line([]),
        table,
        notes,
    )
