"""The WAN benchmark's PACS as its own process: relay.dicom's EmbeddedPacs holding one CT study.

    python -m tests.bench.wan_pacs --port PORT [--count 200] [--ae-title RELAYPACS]
        [--seconds 900] [--second-count N]

The study (`make_study(count)`: 512x512, 12 bits in 16, Explicit VR Little Endian) is
generated before the port opens and kept in memory (a MemoryStore), so sending costs the
PACS no encoding: what the benchmark times is DICOM networking, not sample generation.
Its Study Instance UID is `study_uid(count)`, which the benchmark computes without
generating anything. `--second-count N` adds a second study of N slices (seed 1,
`study_uid(N, seed=1)`): the priority benchmark prefetches one while a viewer reads the
other. The process exits on SIGTERM/SIGINT or after `--seconds`.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Final

from relay_dev.pacs import EmbeddedPacs, MemoryStore
from relay_dev.samples import CT_STUDY, make_study
from tests.bench.procs import HOST

DEFAULT_AE: Final = "RELAYPACS"
DEFAULT_COUNT: Final = 200


def study_uid(count: int, seed: int = 0) -> str:
    """The Study Instance UID that `make_study(count, seed=seed)` gives its CT study."""
    return CT_STUDY.with_uid(("CT", seed, count)).study_uid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.wan_pacs", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, help="CT slices")
    parser.add_argument("--ae-title", default=DEFAULT_AE)
    parser.add_argument("--seconds", type=float, default=900.0, help="exit after this long")
    parser.add_argument("--second-count", type=int, default=0, help="slices of a 2nd study")
    args = parser.parse_args(argv)
    if not 1 <= args.count + args.second_count <= 5000 or args.second_count < 0:
        parser.error("--count must be 1-5000 in all (the studies are held in memory)")
    instances = make_study(args.count)
    if args.second_count:
        instances += make_study(args.second_count, seed=1)
    total = sum(len(i.data) for i in instances)
    pacs = EmbeddedPacs(MemoryStore(instances), ae_title=args.ae_title, host=HOST, port=args.port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    pacs.start()
    print(
        f"wan_pacs {args.ae_title} on {HOST}:{pacs.port}: study {study_uid(args.count)}, "
        f"{len(instances)} instances, {total} bytes",
        flush=True,
    )
    try:
        stop.wait(args.seconds)
    finally:
        pacs.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
