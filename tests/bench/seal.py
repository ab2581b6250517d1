"""Benchmark of issue 9: what sealed sessions cost, against the same code without them.

Two chains run side by side on this machine, each a PACS, `relay gateway`, `relay agent`
and `relay workstation` (tests/bench/wan_chain.py): one from this checkout (sealed: the
workstation's requests ride a TLS 1.3 session with the agent, inside one gateway stream),
one from the commit this branch started from, extracted with `git archive` and put first
on the children's PYTHONPATH (unsealed: the same code before the seal). There is no
"unsealed" option in the product: the comparison is with the previous code itself.
For each link profile, DCMTK `getscu` retrieves the same CT study through each chain,
alternately, `runs` times; medians are reported with the CPU seconds of each relay
process per GB retrieved. Session set-up time is measured in-process: two SealCores over
memory, full handshakes and resumed ones, and a session through a real gateway.

    python -m tests.bench.seal [--profiles 100M-40ms,20M-80ms,loopback] [--runs 5] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from tests.bench.procs import REPO, BenchError, Process, ProcessGroup, raise_nofile
from tests.bench.report import Section, machine_line, median, write_section
from tests.bench.targets import BenchPki, make_pki
from tests.bench.wan import Quiet, _out_dir, _timeout
from tests.bench.wan_chain import (
    ENV,
    NODE_AE,
    Hospital,
    Knobs,
    Retrieval,
    Site,
    retrieve,
    start_hospital,
    start_site,
)
from tests.bench.wan_net import LOOPBACK, PROFILES, Profile
from tests.bench.wan_pacs import DEFAULT_COUNT, study_uid

VARIANTS: Final = ("sealed", "unsealed")
WAN_COST_TARGET: Final = 0.05
LOOPBACK_COST_TARGET: Final = 0.15
GB: Final = 1e9
MB: Final = 1e6
SETUP_ROUNDS: Final = 50


def base_commit() -> str:
    """The commit of main this branch started from (the code without the seal)."""
    out = subprocess.run(
        ["git", "merge-base", "HEAD", "main"], cwd=REPO, capture_output=True, text=True,
        check=True, timeout=30,
    )  # fmt: skip
    return out.stdout.strip()


def extract(commit: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "archive", commit], cwd=REPO, capture_output=True, check=True, timeout=120
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True, timeout=120)
    return into


@dataclass
class Chain:
    variant: str
    hospital: Hospital
    sites: dict[str, Site] = field(default_factory=dict)


@dataclass
class Row:
    profile: Profile
    runs: dict[str, list[Retrieval]] = field(default_factory=lambda: {v: [] for v in VARIANTS})

    def last(self, variant: str) -> float:
        return median([r.last for r in self.runs[variant]])

    def first(self, variant: str) -> float:
        return median([r.first for r in self.runs[variant]])

    @property
    def cost(self) -> float:
        return self.last("sealed") / self.last("unsealed") - 1.0

    def cpu_per_gb(self, variant: str, role: str) -> float:
        values = []
        for r in self.runs[variant]:
            cpu = sum(v for k, v in r.cpu.items() if k.startswith(f"{variant}-{role}"))
            values.append(cpu / (r.file_bytes / GB))
        return median(values)

    def throughput(self, variant: str) -> float:
        return median([r.file_bytes / r.last for r in self.runs[variant]])


def _start(  # noqa: PLR0917 - one call site, all of them needed
    group: ProcessGroup,
    variant: str,
    tree: Path | None,
    pki: BenchPki,
    workdir: Path,
    count: int,
    profiles: Sequence[Profile],
) -> Chain:
    """Start one chain; its processes' names are prefixed with the variant."""
    ENV.pop("PYTHONPATH", None)
    if tree is not None:
        ENV["PYTHONPATH"] = str(tree)
    wd = workdir / variant
    wd.mkdir(parents=True, exist_ok=True)
    before = len(group._procs)
    hospital = start_hospital(group, pki, wd, count, Knobs())
    chain = Chain(variant, hospital)
    for profile in profiles:
        chain.sites[profile.name] = start_site(
            group, pki, wd, hospital=hospital, profile=profile, knobs=Knobs()
        )
    for proc in group._procs[before:]:
        proc.name = f"{variant}-{proc.name}"
    ENV.pop("PYTHONPATH", None)
    return chain


def measure(workdir: Path, *, runs: int, count: int, profiles: Sequence[Profile]) -> list[Row]:
    workdir.mkdir(parents=True, exist_ok=True)
    pki = make_pki(workdir / "pki")
    tree = extract(base_commit(), workdir / "unsealed-tree")
    out_dir = _out_dir()
    rows = [Row(p) for p in profiles]
    quiet = Quiet(120.0)
    uid = study_uid(count)
    try:
        with ProcessGroup(workdir) as group:
            chains = {
                "sealed": _start(group, "sealed", None, pki, workdir, count, profiles),
                "unsealed": _start(group, "unsealed", tree, pki, workdir, count, profiles),
            }
            for row in rows:
                print(f"seal {row.profile.label}", flush=True)
                for i in range(runs):
                    for variant in VARIANTS if i % 2 == 0 else VARIANTS[::-1]:
                        chain = chains[variant]
                        site = chain.sites[row.profile.name]
                        ours = [*chain.hospital.procs, *site.procs]

                        timeout = _timeout(row.profile, count * 530_000.0, count)

                        def once(
                            site: Site = site,
                            chain: Chain = chain,
                            ours: list[Process] = ours,
                            timeout: float = timeout,
                        ) -> Retrieval:
                            return retrieve(
                                chain.variant, site.node_port, NODE_AE, uid,
                                out_dir=out_dir / "getscu", ours=ours,
                                agent_metrics=chain.hospital.agent_metrics, timeout=timeout,
                            )  # fmt: skip

                        sample = quiet.measure(once)
                        if sample.completed != count or sample.files != count:
                            raise BenchError(f"{variant}: {sample.completed} of {count}")
                        row.runs[variant].append(sample)
                        print(
                            f"  run {i + 1}/{runs} {variant:8}: first {sample.first:6.2f} s, "
                            f"last {sample.last:6.2f} s, other load {sample.other_load:.2f}",
                            flush=True,
                        )
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return rows


# -- session set-up, in process ------------------------------------------------------------


def setup_times(pki_dir: Path) -> dict[str, float]:
    """Median seconds of CPU for one full handshake and one resumed (both ends together,
    in memory), and of one complete session establishment over an in-memory stream."""
    from tests.seal.helpers import duplex, make_pkis

    pkis = make_pkis(pki_dir)
    server_ctx, client_ctx = pkis.server_ctx(), pkis.client_ctx()
    full, resumed = [], []
    ticket = None
    for _ in range(SETUP_ROUNDS):
        started = time.process_time()
        d = duplex(pkis, client_ctx=client_ctx, server_ctx=server_ctx)
        d.run()
        d.server.send(b"x")
        d.run()
        full.append(time.process_time() - started)
        ticket = d.client.session
    for _ in range(SETUP_ROUNDS):
        started = time.process_time()
        d = duplex(pkis, client_ctx=client_ctx, server_ctx=server_ctx, session=ticket)
        d.run()
        resumed.append(time.process_time() - started)
        assert d.server.state == "open"
    wall = asyncio.run(_established_over_pipe(pkis))
    return {
        "full": statistics.median(full),
        "resumed": statistics.median(resumed),
        "pipe": wall,
    }


async def _established_over_pipe(pkis: object) -> float:
    from relay.net.bytestream import pipe
    from relay.proto import LinkSettings
    from relay.seal.policy import agent_check, device_check
    from relay.seal.session import establish
    from relay.wire import ALPN_SESSION
    from tests.seal.helpers import SITE, TD, Pkis

    assert isinstance(pkis, Pkis)
    times = []
    for _ in range(20):
        a, b = pipe({"target": "session"})
        started = time.perf_counter()
        device, agent = await asyncio.gather(
            establish(a, pkis.client_ctx(), server_side=False, alpn=ALPN_SESSION,
                      check_peer=agent_check(TD, SITE), settings=LinkSettings(), name="d"),
            establish(b, pkis.server_ctx(), server_side=True, alpn=ALPN_SESSION,
                      check_peer=device_check(TD, SITE), settings=LinkSettings(), name="a"),
        )  # fmt: skip
        times.append(time.perf_counter() - started)
        device.link.close()
        agent.link.close()
        await asyncio.sleep(0)
    return statistics.median(times)


# -- the report -----------------------------------------------------------------------------


def render(rows: list[Row], setup: dict[str, float], runs: int, count: int) -> Section:
    table = [[
        "link (nominal)", "unsealed: first / last (s)", "sealed: first / last (s)",
        "cost of sealing (last)", "target", "throughput sealed / unsealed (MB/s)",
    ]]  # fmt: skip
    notes = []
    for row in rows:
        loop = not row.profile.emulated
        target = LOOPBACK_COST_TARGET if loop else WAN_COST_TARGET
        ok = row.cost <= target
        table.append([
            row.profile.label,
            f"{row.first('unsealed'):.2f} / {row.last('unsealed'):.2f}",
            f"{row.first('sealed'):.2f} / {row.last('sealed'):.2f}",
            f"**{row.cost * 100:+.1f}%**",
            f"≤ {target * 100:.0f}% {'✓' if ok else '✗ missed'}",
            f"{row.throughput('sealed') / MB:.1f} / {row.throughput('unsealed') / MB:.1f}",
        ])  # fmt: skip
        for variant in VARIANTS:
            lasts = ", ".join(f"{r.last:.2f}" for r in row.runs[variant])
            loads = ", ".join(f"{r.other_load:.2f}" for r in row.runs[variant])
            cpu = ", ".join(
                f"{role} {row.cpu_per_gb(variant, role):.1f}"
                for role in ("agent", "gateway", "workstation")
            )
            notes.append(
                f"{row.profile.label}, {variant}: last instance at {lasts} s (other load "
                f"{loads} cores); CPU seconds per GB retrieved: {cpu}."
            )
    notes += [
        f"Workload: the CT study of the WAN benchmark ({count} instances, 512x512, about "
        f"105 MB), retrieved with getscu (C-GET, study level) from the workstation's DICOM "
        f"node; {runs} runs per variant, alternating, medians. Same machine, same moment: "
        "both chains run side by side, idle while the other one is measured.",
        "unsealed = the code of the commit this branch started from (`git merge-base HEAD "
        "main`), run from a `git archive` of it put first on PYTHONPATH; sealed = this "
        "commit. The difference between them is the seal (and what it changed at the ends).",
        "Cost of sealing = sealed / unsealed - 1, time to the last instance. Throughput = "
        "bytes stored by getscu / time to the last instance.",
        f"Session set-up, in process on this machine (median of {SETUP_ROUNDS}): a full "
        f"TLS 1.3 handshake with both certificates checked costs {setup['full'] * 1000:.1f} "
        f"ms of CPU for both ends together, a resumed one (ticket) {setup['resumed'] * 1000:.1f}"
        f" ms; establishing a session (handshake and the inner Link) over an in-memory "
        f"stream takes {setup['pipe'] * 1000:.1f} ms. Across a WAN add one round trip "
        "(TLS 1.3: the device sends its first request with its Finished).",
    ]
    return Section("seal", "Sealed sessions: cost against the same code unsealed (issue 9)",
                   machine_line(), table, notes)  # fmt: skip


def run(workdir: Path, *, runs: int = 5, count: int = DEFAULT_COUNT) -> Section:
    """For `make bench` (tests/bench/run.py): every profile, the section to write."""
    profiles = (*PROFILES, LOOPBACK)
    chosen = [p for p in profiles if p.name in ("100M-40ms", "20M-80ms", "loopback")]
    setup = setup_times(workdir / "seal-setup-pki")
    rows = measure(workdir / "seal", runs=runs, count=count, profiles=chosen)
    return render(rows, setup, runs, count)


def main(argv: list[str] | None = None) -> int:
    every = (*PROFILES, LOOPBACK)
    names = [p.name for p in every]
    parser = argparse.ArgumentParser(prog="python -m tests.bench.seal", description=__doc__)
    parser.add_argument("--profiles", default="100M-40ms,20M-80ms,loopback")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    chosen = [p for p in every if p.name in args.profiles.split(",")]
    if not chosen:
        parser.error(f"no profile among {args.profiles!r} (of {', '.join(names)})")
    raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="relay-bench-seal-"))
    try:
        setup = setup_times(workdir / "setup-pki")
        rows = measure(workdir, runs=args.runs, count=args.count, profiles=chosen)
    except BenchError as exc:
        print(f"seal FAILED: {exc}\nprocess logs kept in {workdir}", file=sys.stderr)
        return 1
    section = render(rows, setup, args.runs, args.count)
    print(section.render())
    if args.write:
        write_section(section)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
