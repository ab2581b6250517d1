"""Where the gateway spends its time under load: py-spy against the real gateway process.

    python -m tests.bench.profile throughput|handshakes [--seconds 10] [--native]
                                  [--process gateway|sender|sink]

Starts the same processes as the benchmark, samples the gateway with py-spy (install it
into the venv by hand: `pip install py-spy`; it is not a project dependency) and prints
the functions with the most samples, by own time and by inclusive time. The raw
collapsed stacks are kept next to the process logs for a flame graph.
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
from tests.bench.targets import make_pki, start_gateway
from tests.bench.throughput import worker_args
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.profile")
    parser.add_argument("kind", choices=["throughput", "handshakes"])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--native", action="store_true", help="include C frames")
    parser.add_argument(
        "--process",
        choices=["gateway", "sender", "sink"],
        default="gateway",
        help="which process to sample (sender and sink: throughput only)",
    )
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy", path=str(VENV_BIN)) or shutil.which("py-spy")
    if py_spy is None:
        print("py-spy not found: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="relay-profile-"))
    bench_pki = make_pki(workdir / "pki")
    out = workdir / f"{args.kind}.collapsed"
    with ProcessGroup(workdir) as group:
        gateway = start_gateway(group, bench_pki, workdir)
        ends = _load(group, args.kind, gateway.port, worker_args(bench_pki, args.seconds + 90))
        target = gateway.proc if args.process == "gateway" else ends.get(args.process)
        if target is None:
            parser.error(f"--process {args.process} needs the throughput load")
        time.sleep(2.0)
        cmd = [py_spy, "record", "-p", str(target.pid), "-d", str(int(args.seconds))]
        cmd += ["-r", "250", "-f", "raw", "-o", str(out)]
        # --nonblocking does not pause the gateway, but cannot read native stacks.
        cmd.append("--native" if args.native else "--nonblocking")
        spy: Process = group.process("py-spy", cmd)
        try:
            spy.popen.wait(args.seconds + 60)
        except subprocess.TimeoutExpired:
            raise BenchError("py-spy did not finish") from None
    if not out.exists():
        print(f"py-spy wrote nothing; see {workdir}/py-spy.log", file=sys.stderr)
        return 1
    print(summarize(out))
    print(f"\ncollapsed stacks: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
