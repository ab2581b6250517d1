"""Benchmark of issue 12: reading a prefetched study from the workstation's cache.

The hospital of tests/bench/wan.py (PACS with a 200-slice CT of about 105 MB, gateway,
agent), one WAN profile (100 Mbit/s, 40 ms by default) emulated by the delay/rate proxy
in front of the gateway and in front of the PACS. `relay prefetch` fills the
workstation's cache through the WAN; then getscu reads the study (a) from the
workstation's DICOM node, served from the cache, and (b) straight from the PACS across
the same emulated link, alternately, `runs` times each. Medians; target: (b)/(a) >= 15.

    python -m tests.bench.run cache          # writes docs/BENCHMARKS.md
    python -m tests.bench.cache_read --runs 1  # prints the section only
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

from tests.bench.procs import BenchError, ProcessGroup, raise_nofile
from tests.bench.report import DOC, Section, machine_line, median, write_section
from tests.bench.targets import BenchPki, make_pki
from tests.bench.wan_chain import NODE_AE, PACS_AE, Knobs, retrieve, start_hospital, start_site
from tests.bench.wan_net import MBIT, PROFILES, Profile, check_link
from tests.bench.wan_pacs import DEFAULT_COUNT, study_uid

SPEEDUP_TARGET: Final = 15.0
FILL_TIMEOUT: Final = 600.0


def _cache_status(config: Path) -> dict[str, Any]:
    from relay.workstation.cache.cli import call

    return call(config, "cache-status", {})


def _prefetch(config: Path, uid: str) -> float:
    """Queue the study and wait until it is complete; the seconds it took."""
    from relay.workstation.cache.cli import call

    started = time.monotonic()
    call(config, "prefetch", {"studies": [uid]})
    while time.monotonic() - started < FILL_TIMEOUT:
        studies = _cache_status(config)["studies"]
        if studies and studies[0]["state"] == "complete":
            return time.monotonic() - started
        time.sleep(0.2)
    raise BenchError(f"the study was not cached within {FILL_TIMEOUT:.0f} s")


def run(
    workdir: Path, bench_pki: BenchPki, *, runs: int = 3, count: int = DEFAULT_COUNT,
    profile: Profile = PROFILES[0],
) -> Section:  # fmt: skip
    uid = study_uid(count)
    knobs = Knobs()
    rows: dict[str, list[float]] = {"cache": [], "direct": []}
    loads: list[float] = []
    with ProcessGroup(workdir) as group:
        hospital = start_hospital(group, bench_pki, workdir, count, knobs)
        check = check_link(group, profile, {"TCP_NODELAY": "1"})
        cache_dir = workdir / "ws-cache"
        site = start_site(
            group, bench_pki, workdir, hospital=hospital, profile=profile, knobs=knobs,
            extra_config=f"cache: {{dir: {cache_dir}, max_size: 2GiB}}\n",
        )  # fmt: skip
        config = workdir / f"workstation-{profile.name}.yaml"
        fill = _prefetch(config, uid)
        ours = [*hospital.procs, *site.procs]
        for i in range(runs):
            for case in ("cache", "direct") if i % 2 == 0 else ("direct", "cache"):
                cached = case == "cache"
                sample = retrieve(
                    case, site.node_port if cached else site.direct_port,
                    NODE_AE if cached else PACS_AE, uid, out_dir=workdir / "out", ours=ours,
                    agent_metrics=None, timeout=600,
                )  # fmt: skip
                if sample.completed != count or sample.files != count:
                    raise BenchError(f"{case}: {sample.completed} completed, expected {count}")
                rows[case].append(sample.seconds)
                if cached:
                    loads.append(sample.other_load)
                print(f"cache {case}: {sample.seconds:.2f} s (load {sample.other_load:.2f})",
                      flush=True)  # fmt: skip
        status = _cache_status(config)
    cache_s, direct_s = median(rows["cache"]), median(rows["direct"])
    speedup = direct_s / cache_s
    verdict = "meets" if speedup >= SPEEDUP_TARGET else "MISSES"
    table = [
        ["read of the study", "median seconds", "runs"],
        ["getscu from the workstation, served from the cache", f"{cache_s:.2f}",
         ", ".join(f"{s:.2f}" for s in rows["cache"])],
        [f"getscu straight from the PACS across {profile.label}", f"{direct_s:.2f}",
         ", ".join(f"{s:.2f}" for s in rows["direct"])],
        ["prefetch through the relay (once, before the reads)", f"{fill:.2f}", "1"],
    ]  # fmt: skip
    notes = [
        f"Speed-up of a cached read over a direct read: **{speedup:.1f}x** ({verdict} the "
        f"target of {SPEEDUP_TARGET:g}x).",
        f"{count} CT slices of 512x512 16-bit, {status['bytes'] / 1e6:.0f} MB sealed in the "
        f"cache; link check through the proxy: {check.rate / MBIT:.1f} Mbit/s, RTT "
        f"{check.rtt * 1000:.1f} ms.",
        "The cached read decrypts and verifies every file (AES-GCM) before the first "
        "C-STORE and holds the datasets until sent (cache.serve_buffer, 256 MiB); the rest "
        "is pynetdicom sending 200 C-STORE sub-operations to getscu on loopback, one at a "
        "time (getscu's default 16 KiB PDUs).",
        f"Other load during the reads (cores used outside the benchmark): "
        f"{', '.join(f'{x:.2f}' for x in loads)}.",
    ]
    return Section("cache", "Reading a prefetched study from the cache (issue 12)",
                   machine_line(), table, notes)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.cache_read", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT)
    parser.add_argument("--write", action="store_true", help=f"write the section into {DOC}")
    args = parser.parse_args(argv)
    raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="relay-bench-cache-"))
    try:
        out = run(workdir, make_pki(workdir / "pki"), runs=args.runs, count=args.count)
    except BenchError as exc:
        print(f"cache FAILED: {exc}\nprocess logs kept in {workdir}", file=sys.stderr)
        return 1
    print(out.render())
    if args.write:
        write_section(out)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
