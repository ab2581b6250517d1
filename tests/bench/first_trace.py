"""Where the relay's first image goes: every hop of a C-GET timed, over many retrievals.

    python -m tests.bench.first_trace [--profile 1G-5ms] [--runs 10] [--count 200]

Starts the WAN benchmark's chain (tests/bench/wan_chain.py: PACS, gateway and agent on
loopback, the delay/rate proxy, the workstation) with tests/bench/trace_hooks first on
every process's PYTHONPATH, so that each appends a timestamp as a retrieval passes its
hops (trace_hooks/sitecustomize.py). Then DCMTK getscu retrieves the study from the
workstation `runs` times, each after a direct getscu from the PACS (as the benchmark
alternates them: the agent's spare association then waits as long), and prints, per
relay retrieval and as medians of the warm ones (the first is cold: it associates with
the PACS), when each hop came, in ms after getscu's launch:

    ws.get         the workstation's node has the C-GET (getscu started and associated)
    agent.request  the request read at the agent (through the link and the gateway)
    agent.store    the PACS's first C-STORE complete at the agent's intake
    agent.encoded  that instance encoded (the codec chosen, its CPU)
    agent.count    the PACS's count (its first pending response) queued at the agent
    ws.instance    the instance read off the stream at the workstation
    ws.count       the count read there (pynetdicom's C-GET SCP needs it first)
    ws.deliver     the instance handed to pynetdicom for getscu
    getscu         getscu logs its C-STORE response (the file is written)

A timing tool, by hand: the hooks cost a little at every hop, and the machine's other
load shows in every number. Compare hops of the same run (structure), not runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from tests.bench import wan_chain
from tests.bench.procs import HOST, REPO, BenchError, ProcessGroup, raise_nofile
from tests.bench.targets import make_pki
from tests.bench.wan_chain import NODE_AE, PACS_AE, Knobs, start_hospital, start_site
from tests.bench.wan_net import LOOPBACK, PROFILES
from tests.bench.wan_pacs import study_uid
from tests.interop.harness.tools import tool_path

HOOKS: Final = Path(__file__).parent / "trace_hooks"
HOPS: Final = (
    "ws.get", "agent.request", "agent.store", "agent.encoded", "agent.count",
    "ws.instance", "ws.count", "ws.deliver", "getscu",
)  # fmt: skip
_STORED: Final = b"Sending C-STORE Response"


@dataclass
class Run:
    """One relay getscu: its launch and first stored instance (monotonic ns)."""

    launched: int
    stored: int
    hops: dict[str, float] = field(default_factory=dict)  # ms after the launch
    codec: str = ""


def getscu(port: int, ae: str, uid: str, out_dir: Path) -> tuple[int, int]:
    """Retrieve the study; (launch, first instance stored) in monotonic ns."""
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    argv = [
        "getscu", "-v", "-S", "-aet", "BENCHVIEW", "-aec", ae, "-od", str(out_dir),
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={uid}", HOST, str(port),
    ]  # fmt: skip
    env = {**os.environ, "PATH": tool_path(), **wan_chain.ENV}
    launched = time.monotonic_ns()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    stored = 0
    for line in iter(proc.stdout.readline, b""):
        if not stored and _STORED in line:
            stored = time.monotonic_ns()
    if proc.wait(120) != 0 or not stored:
        raise BenchError(f"getscu from {ae} failed (exit {proc.returncode})")
    return launched, stored


def read_traces(trace_dir: Path) -> list[tuple[int, str, str]]:
    """Every process's lines, in time order: (ns, hop, detail)."""
    lines = []
    for path in trace_dir.glob("trace-*.txt"):
        for line in path.read_text(encoding="ascii").splitlines():
            ns, hop, detail = [*line.split(" ", 2), ""][:3]
            lines.append((int(ns), hop, detail))
    return sorted(lines)


def place(run: Run, lines: list[tuple[int, str, str]]) -> None:
    """The first of each hop between the run's launch and its first stored instance."""

    def ms(ns: int) -> float:
        return (ns - run.launched) / 1e6

    for ns, hop, detail in lines:
        if not run.launched <= ns <= run.stored:
            continue
        name = hop
        if hop == "ws.read":
            name = {"INSTANCE": "ws.instance", "PENDING": "ws.count"}.get(detail.split()[0], "")
        elif hop == "agent.encoded" and not run.codec:
            run.codec = detail
        if name in HOPS and name not in run.hops:
            run.hops[name] = ms(ns)
    run.hops["getscu"] = ms(run.stored)


def report(runs: list[Run]) -> str:
    rows = [" ".join(f"{h:>13}" for h in HOPS) + "  first instance (codec CPU-us bytes)"]
    for run in runs:
        cells = (f"{run.hops[h]:13.1f}" if h in run.hops else f"{'-':>13}" for h in HOPS)
        rows.append(" ".join(cells) + f"  {run.codec}")
    warm = runs[1:] or runs
    medians = (statistics.median([r.hops[h] for r in warm if h in r.hops] or [0.0]) for h in HOPS)
    rows.append(" ".join(f"{m:13.1f}" for m in medians) + f"  median of {len(warm)} warm")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    names = [p.name for p in (*PROFILES, LOOPBACK)]
    parser = argparse.ArgumentParser(prog="python -m tests.bench.first_trace", description=__doc__)
    parser.add_argument("--profile", default="1G-5ms", choices=names)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--count", type=int, default=200)
    args = parser.parse_args(argv)
    profile = next(p for p in (*PROFILES, LOOPBACK) if p.name == args.profile)
    raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="relay-first-trace-"))
    trace_dir = workdir / "traces"
    trace_dir.mkdir()
    wan_chain.ENV.update(
        {"PYTHONPATH": f"{HOOKS}{os.pathsep}{REPO}", "FIRST_TRACE_DIR": str(trace_dir)}
    )
    uid = study_uid(args.count)
    runs: list[Run] = []
    try:
        with ProcessGroup(workdir) as group:
            bench_pki = make_pki(workdir / "pki")
            knobs = Knobs()
            hospital = start_hospital(group, bench_pki, workdir, args.count, knobs)
            site = start_site(
                group, bench_pki, workdir, hospital=hospital, profile=profile, knobs=knobs
            )
            for i in range(args.runs):
                getscu(site.direct_port, PACS_AE, uid, workdir / "direct")
                run = Run(*getscu(site.node_port, NODE_AE, uid, workdir / "relay"))
                runs.append(run)
                first = (run.stored - run.launched) / 1e6
                print(f"relay {i + 1}/{args.runs}: first instance {first:.1f} ms", flush=True)
    except BenchError as exc:
        print(f"first_trace FAILED: {exc}\nlogs in {workdir}", file=sys.stderr)
        return 1
    lines = read_traces(trace_dir)
    for run in runs:
        place(run, lines)
    print(f"{profile.label}: ms after getscu's launch, per relay retrieval")
    print(report(runs))
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
