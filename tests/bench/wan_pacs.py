"""The WAN benchmark's PACS as its own process: relay.dicom's EmbeddedPacs holding one CT study.

    python -m tests.bench.wan_pacs --port PORT [--count 200] [--ae-title RELAYPACS]
        [--seconds 900] [--second-count N] [--study phantom|real-ct]

The study (`make_study(count)`: 512x512, 12 bits in 16, Explicit VR Little Endian) is
generated before the port opens and kept in memory (a MemoryStore), so sending costs the
PACS no encoding: what the benchmark times is DICOM networking, not sample generation.
Its Study Instance UID is `study_uid(count)`, which the benchmark computes without
generating anything. `--second-count N` adds a second study of N slices (seed 1,
`study_uid(N, seed=1)`): the priority benchmark prefetches one while a viewer reads the
other. `--study real-ct` gives the same study with the pixels of one real CT slice in
every instance (`real_ct_study`). The process exits on SIGTERM/SIGINT or after `--seconds`.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Final

from relay_dev.pacs import EmbeddedPacs, MemoryStore
from relay_dev.samples import CT_STUDY, EncodedInstance, encode_instance, make_study
from tests.bench.procs import HOST

DEFAULT_AE: Final = "RELAYPACS"
DEFAULT_COUNT: Final = 200
STUDIES: Final = ("phantom", "real-ct")
REAL_CT: Final = "693_UNCR.dcm"  # pydicom-data: a real 512x512 CT slice, 14 bits signed


def study_uid(count: int, seed: int = 0) -> str:
    """The Study Instance UID that `make_study(count, seed=seed)` gives its CT study."""
    return CT_STUDY.with_uid(("CT", seed, count)).study_uid


def real_ct_study(count: int) -> list[EncodedInstance]:
    """`make_study(count)` with every slice's pixels replaced by one real CT slice's.

    The phantom's white noise puts a floor under every lossless codec that real CT, whose
    noise the reconstruction kernel correlates, does not have. The codecs (and zstd) work
    on one instance at a time, so one real slice repeated costs each of them what that
    slice costs; the headers, UIDs and sizes are the phantom study's.
    """
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    from relay_dev.samples import ct_dataset, derive_uid

    path = get_testdata_file(REAL_CT)
    if path is None:
        raise SystemExit(f"{REAL_CT} not found: install pydicom-data (the test extra)")
    real = dcmread(path)
    study = CT_STUDY.with_uid(("CT", 0, count))
    series_uid = derive_uid("series", study.study_uid, 2)
    out = []
    for i in range(count):
        ds = ct_dataset(study, i, count, series_uid=series_uid, pixels=False)
        ds.Rows, ds.Columns = real.Rows, real.Columns
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, real.BitsStored, real.HighBit
        ds.PixelRepresentation = real.PixelRepresentation
        ds.RescaleIntercept, ds.RescaleSlope = real.RescaleIntercept, real.RescaleSlope
        ds.PixelData = real.PixelData
        out.append(encode_instance(ds))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.wan_pacs", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, help="CT slices")
    parser.add_argument("--ae-title", default=DEFAULT_AE)
    parser.add_argument("--seconds", type=float, default=900.0, help="exit after this long")
    parser.add_argument("--second-count", type=int, default=0, help="slices of a 2nd study")
    parser.add_argument("--study", choices=STUDIES, default="phantom", help="pixels of the CT")
    args = parser.parse_args(argv)
    if not 1 <= args.count + args.second_count <= 5000 or args.second_count < 0:
        parser.error("--count must be 1-5000 in all (the studies are held in memory)")
    instances = real_ct_study(args.count) if args.study == "real-ct" else make_study(args.count)
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
