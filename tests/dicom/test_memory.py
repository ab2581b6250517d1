"""A C-GET of a 1 GB study through the whole chain keeps memory bounded (in one process).

PACS, agent and workstation node all run in this process, the viewer is DCMTK getscu
(--ignore: it receives everything and stores nothing). Resident memory is sampled during the
transfer and compared with the level after a warm-up. Buffering the study anywhere would
show as about a gigabyte; the relay's bound is a few instances per stage. (The multi-process
version, with each role measured on its own, belongs to the end-to-end suite.)
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from relay.dicom.pacs_target import PacsTarget
from relay_dev import samples
from relay_dev.pacs import EmbeddedPacs, SyntheticStore
from tests.interop.harness import dcmtk

from .chain import Chain

pytestmark = [pytest.mark.slow, pytest.mark.interop]

STUDY_BYTES = 1 << 30
MAX_GROWTH = 200 * 1024 * 1024


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def getscu_ignore(port: int, study_uid: str) -> dcmtk.ToolResult:
    argv = [
        "getscu",
        "-v",
        "-S",
        "--ignore",
        "-pdu",
        "131072",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study_uid}",
        "-aec",
        "RELAY",
        "127.0.0.1",
        str(port),
    ]
    return dcmtk.run_tool(argv, timeout=1200)


async def test_get_of_a_1gb_study_keeps_memory_bounded() -> None:
    study = samples.SyntheticStudy.of_size(STUDY_BYTES)
    warm = samples.SyntheticStudy(8, seed=99)
    for k in range(64):  # fill the phantom caches: that memory is the PACS's, not the relay's
        study.instance(round(k * (study.count - 1) / 63))
    store = SyntheticStore(study)
    with EmbeddedPacs(store) as pacs:
        pacs.add(warm.instance(i) for i in range(warm.count))
        chain = Chain(
            PacsTarget(ae_title=pacs.ae_title, host="127.0.0.1", port=pacs.port, timeout=30)
        )
        await chain.start()
        try:
            warm_up = await asyncio.to_thread(getscu_ignore, chain.port, warm.spec.study_uid)
            assert warm_up.suboperations.get("Completed") == warm.count
            baseline = rss()
            peak = [baseline]
            done = threading.Event()

            def sample() -> None:
                while not done.is_set():
                    peak[0] = max(peak[0], rss())
                    time.sleep(0.05)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            try:
                result = await asyncio.to_thread(getscu_ignore, chain.port, study.spec.study_uid)
            finally:
                done.set()
                sampler.join(5)
            await chain.settle()
        finally:
            await chain.stop()
    subops = result.suboperations
    assert (subops.get("Completed"), subops.get("Failed")) == (study.count, 0), result.output[
        -2000:
    ]
    moved = chain.agent_stats.raw_bytes["out"]
    assert moved > STUDY_BYTES
    growth = peak[0] - baseline
    print(
        f"\n1 GB C-GET: {study.count} instances, RSS baseline {baseline >> 20} MiB, "
        f"peak {peak[0] >> 20} MiB, growth {growth >> 20} MiB; "
        f"raw {moved >> 20} MiB -> wire {chain.agent_stats.wire_bytes['out'] >> 20} MiB"
    )
    assert growth < MAX_GROWTH, f"resident memory grew by {growth >> 20} MiB"
