"""Where a relay process spends its time under load: py-spy against the real process.

    python -m tests.bench.profile throughput|handshakes [--seconds 10] [--native]
                                  [--process gateway|sender|sink]
    python -m tests.bench.profile wan [--seconds 10] [--link 100M-40ms]
                                  [--pixel-codecs auto]

Starts the same processes as the benchmark, samples them with py-spy (install it into the
venv by hand: `pip install py-spy`; it is not a project dependency) and prints the
functions with the most samples, by own time and by inclusive time. `throughput` and
`handshakes` sample the gateway (or one end of the throughput load); `wan` samples the
agent and the workstation together while getscu retrieves the wan benchmark's study
through the relay again and again over the emulated link. The raw collapsed stacks are
kept next to the process logs for a flame graph.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.procs import VENV_BIN, BenchError, Process, ProcessGroup, raise_nofile
from tests.bench.targets import BenchPki, make_pki, start_gateway
from tests.bench.throughput import worker_args
from tests.bench.wan_chain import NODE_AE, Knobs, retrieve, start_hospital, start_site
from tests.bench.wan_net import LOOPBACK, PROFILES
from tests.bench.wan_pacs import DEFAULT_COUNT, study_uid
from tests.bench.workers import client_hello_bytes


def _frame_name(frame: str) -> str:
    """`func (path/to/file.py:123)` -> `func (file.py)`; line numbers merged."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if parts else path
    return f"{name} ({short})"


def summarize(collapsed: Path, top: int = 25) -> str:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    lines = [f"{total} samples", "", "own time:"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in own.most_common(top)]
    lines += ["", "inclusive time:"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines)


def _load(group: ProcessGroup, kind: str, port: int, args: dict[str, object]) -> dict[str, Process]:
    """Start the load; returns the throughput ends by name (for --process)."""
    if kind == "throughput":
        sink = group.worker("sink", "link-sink", port=port, **args)
        sink.expect("ready", 30)
        time.sleep(0.5)
        sender = group.worker("sender", "link-sender", port=port, **args)
        sender.expect("ready", 30)
        return {"sink": sink, "sender": sender}
    else:
        for i in range(2):
            group.worker(
                f"clients{i}",
                "handshake-client",
                port=port,
                hello=client_hello_bytes(),
                concurrency=16,
                **args,
            ).expect("ready", 30)
        return {}


def _spy(
    group: ProcessGroup, py_spy: str, target: Process, seconds: float, out: Path, *, native: bool
) -> Process:
    """py-spy recording `target` for `seconds` into `out` (collapsed stacks)."""
    cmd = [py_spy, "record", "-p", str(target.pid), "-d", str(int(seconds))]
    cmd += ["-r", "250", "-f", "raw", "-o", str(out)]
    # --nonblocking does not pause the process, but cannot read native stacks.
    cmd.append("--native" if native else "--nonblocking")
    return group.process(f"py-spy-{target.name}", cmd)


def _wait(spies: list[Process], seconds: float) -> None:
    for spy in spies:
        try:
            spy.popen.wait(seconds + 60)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{spy.name} did not finish") from None


def _profile_wan(
    py_spy: str, workdir: Path, bench_pki: BenchPki, args: argparse.Namespace
) -> dict[str, Path]:
    """Sample the agent and the workstation while getscu retrieves through the relay."""
    profile = next(p for p in (*PROFILES, LOOPBACK) if p.name == args.link)
    knobs = Knobs(pixel_codecs=args.pixel_codecs)
    outs = {name: workdir / f"wan-{name}.collapsed" for name in ("agent", "workstation")}
    getscu_dir = workdir / "getscu"
    with ProcessGroup(workdir) as group:
        hospital = start_hospital(group, bench_pki, workdir, DEFAULT_COUNT, knobs)
        site = start_site(
            group, bench_pki, workdir, hospital=hospital, profile=profile, knobs=knobs
        )
        targets = {"agent": hospital.agent, "workstation": site.workstation}
        spies = [
            _spy(group, py_spy, targets[name], args.seconds, out, native=args.native)
            for name, out in outs.items()
        ]
        ends = time.monotonic() + args.seconds
        retrievals = 0
        while time.monotonic() < ends:
            got = retrieve(
                "relay", site.node_port, NODE_AE, study_uid(DEFAULT_COUNT),
                out_dir=getscu_dir, ours=[], agent_metrics=None, timeout=300.0,
            )  # fmt: skip
            if got.completed != DEFAULT_COUNT:
                raise BenchError(f"retrieval {retrievals + 1}: {got.completed} instances")
            retrievals += 1
            print(f"retrieval {retrievals}: last instance at {got.last:.2f} s", flush=True)
        _wait(spies, args.seconds)
    shutil.rmtree(getscu_dir, ignore_errors=True)
    return outs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.profile")
    parser.add_argument("kind", choices=["throughput", "handshakes", "wan"])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--native", action="store_true", help="include C frames")
    parser.add_argument(
        "--process",
        choices=["gateway", "sender", "sink"],
        default="gateway",
        help="which process to sample (sender and sink: throughput only)",
    )
    links = [p.name for p in (*PROFILES, LOOPBACK)]
    parser.add_argument("--link", choices=links, default=PROFILES[0].name, help="wan only")
    parser.add_argument("--pixel-codecs", default="auto", help="wan only: pacs.pixel_codecs")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy", path=str(VENV_BIN)) or shutil.which("py-spy")
    if py_spy is None:
        print("py-spy not found: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="relay-profile-"))
    bench_pki = make_pki(workdir / "pki")
    if args.kind == "wan":
        outs = _profile_wan(py_spy, workdir, bench_pki, args)
    else:
        outs = {args.process: workdir / f"{args.kind}.collapsed"}
        with ProcessGroup(workdir) as group:
            gateway = start_gateway(group, bench_pki, workdir)
            ends = _load(group, args.kind, gateway.port, worker_args(bench_pki, args.seconds + 90))
            target = gateway.proc if args.process == "gateway" else ends.get(args.process)
            if target is None:
                parser.error(f"--process {args.process} needs the throughput load")
            time.sleep(2.0)
            spy = _spy(group, py_spy, target, args.seconds, outs[args.process], native=args.native)
            _wait([spy], args.seconds)
    missing = [name for name, out in outs.items() if not out.exists()]
    if missing:
        print(f"py-spy wrote nothing for {', '.join(missing)}; see {workdir}", file=sys.stderr)
        return 1
    for name, out in outs.items():
        print(f"== {name}\n{summarize(out)}\n\ncollapsed stacks: {out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
