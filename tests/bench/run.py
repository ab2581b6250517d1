"""`make bench`: run the benchmarks of issue 2 and write docs/BENCHMARKS.md.

    python -m tests.bench.run [throughput] [memory] [handshakes] [load] [wan] [seal] [cache]
                              [viewer] [priority] [codecs] [wan-real-ct]
                              [--quick] [--no-write]

With no names, all eleven run: about 6 minutes for the first three on a quiet 2-core
machine, up to ~30 on a busy one (a run with other load is repeated, at most 3 times),
2-4 for load (2,000 devices, DICOM at a rising rate, issue 10), 7-10 more for wan
(DICOM across an emulated WAN, issue 3), about 10 for seal (the same retrieval sealed and
unsealed, issue 9), 2-4 for cache (a prefetched study read from the workstation's cache
against a direct read, issue 12), 3-6 for viewer (OHIF in headless Chromium opening
the CT through the relay and from Orthanc's DICOMweb plugin, issue 13), 2-4 for priority
(a viewer's C-GET alone and while a prefetch fills the link, issue 12), seconds for codecs
(ratio and speed per pixel codec, issue 14) and about 6 for wan-real-ct (the wan
retrieval on the three links with a real CT slice's pixels, issue 14). `--quick` is a
smoke run (short windows, one run each, few links) whose numbers are not written unless
`--write` is also given. Logs of every process go to a temporary directory, kept (and
printed) only when a benchmark fails.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from tests.bench import (
    cache_read,
    codecs,
    handshakes,
    load,
    memory,
    priority,
    seal,
    throughput,
    viewer,
    wan,
)
from tests.bench.procs import BenchError, raise_nofile
from tests.bench.report import DOC, Section, write_section
from tests.bench.targets import make_pki
from tests.bench.wan_chain import Knobs
from tests.bench.wan_net import PROFILES

NAMES: Final = (
    "throughput", "memory", "handshakes", "load", "wan", "seal", "cache", "viewer", "priority",
    "codecs", "wan-real-ct",
)  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.run", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(NAMES)}")
    parser.add_argument("--quick", action="store_true", help="smoke run; does not write")
    parser.add_argument("--write", action="store_true", help="write results even with --quick")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--links", type=int, default=2000, help="idle links (memory)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    names = args.names or list(NAMES)
    unknown = sorted(set(names) - set(NAMES))
    if unknown:
        _parser().error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(NAMES)}")
    quick = args.quick
    write = (args.write or not quick) and not args.no_write
    raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    failed = False
    try:
        bench_pki = make_pki(workdir / "pki")
        jobs: dict[str, Callable[[], Section]] = {
            "throughput": lambda: throughput.run(
                workdir,
                bench_pki,
                runs=1 if quick else 3,
                warmup=1.0 if quick else 2.0,
                duration=2.0 if quick else 10.0,
                patience=0.0 if quick else 20.0,
                tries=1 if quick else 3,
            ),
            "memory": lambda: memory.run(workdir, bench_pki, links=200 if quick else args.links),
            "handshakes": lambda: handshakes.run(
                workdir,
                bench_pki,
                runs=1 if quick else 3,
                warmup=1.0 if quick else 2.0,
                duration=2.0 if quick else 10.0,
                patience=0.0 if quick else 20.0,
                tries=1 if quick else 3,
            ),
            "load": lambda: load.run(
                workdir,
                bench_pki,
                links=200 if quick else args.links,
                active=20 if quick else 200,
                step=2.0 if quick else 5.0,
            ),
            "wan": lambda: wan.run(workdir, bench_pki, runs=1 if quick else 3),
            "wan-real-ct": lambda: wan.run(
                workdir,
                bench_pki,
                runs=1 if quick else 3,
                profiles=PROFILES,
                knobs=Knobs(study="real-ct"),
            ),
            "seal": lambda: seal.run(workdir, runs=1 if quick else 5),
            "cache": lambda: cache_read.run(workdir, bench_pki, runs=1 if quick else 3),
            "viewer": lambda: viewer.run(workdir, bench_pki, runs=1 if quick else 3),
            "priority": lambda: priority.run(workdir, bench_pki, runs=1 if quick else 3),
            "codecs": lambda: codecs.run(ct_count=5 if quick else 20),
        }
        for name in names:
            started = time.monotonic()
            print(f"== {name}", flush=True)
            try:
                section = jobs[name]()
            except BenchError as exc:
                print(f"{name} FAILED: {exc}", file=sys.stderr, flush=True)
                failed = True
                continue
            print(section.render(), flush=True)
            print(f"({name}: {time.monotonic() - started:.0f} s)", flush=True)
            if write:
                write_section(section)
                print(f"wrote {DOC}", flush=True)
    finally:
        if failed:
            print(f"process logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
