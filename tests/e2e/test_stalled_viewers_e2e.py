"""A hung viewer set must not freeze the other viewers (real processes).

`relay gateway`, `relay agent` and `relay workstation` from the CLI, and the demo PACS.
Six C-GETs of the CT study whose viewer stops answering C-STORE (a hung viewer): each
viewer stream fills its receive window (1 MiB + 3 MiB for a viewer's stream) and is
never read. Four or five of them used to hold the sealed session's whole link window
(16 MiB) and another viewer's C-FIND and C-ECHO waited for the node's DIMSE timeout
(120 s). Now each holds link credit for 1 MiB at most, and the others are answered at
once.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Iterator

import pytest

from relay.dicom import rawds
from relay_dev import samples
from relay_dev.samples import demo_studies
from tests.dicom import viewer
from tests.dicom.helpers import query
from tests.e2e.dicom_chain import DicomChain, PacsProcess, running_dicom_chain
from tests.interop.harness import require_tools

pytestmark = pytest.mark.interop

STALLED = 6  # of the node's 8 associations: one is left for the C-FIND, one for the C-ECHO
PROMPT = 5.0  # seconds: an answer that is not starved comes in well under a second
FILLED_WITHIN = 30.0


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DicomChain]:
    require_tools("echoscu")  # the chain's readiness check
    pacs = PacsProcess(tmp_path_factory.mktemp("pacs")).start()
    try:
        with running_dicom_chain(DicomChain(tmp_path_factory.mktemp("chain"), pacs.port)) as c:
            yield c
    finally:
        pacs.stop()


def _ct_study() -> str:
    ct = next(i for i in demo_studies() if i.sop_class == samples.CT_IMAGE_STORAGE)
    return str(rawds.decode_dataset(ct.data, "1.2.840.10008.1.2.1").StudyInstanceUID)


def _until_quiet(chain: DicomChain, within: float) -> float:
    """Until the agent has stopped sending (the stalled streams' windows are full)."""
    deadline = time.monotonic() + within
    last, still = -1.0, 0
    while still < 4:
        assert time.monotonic() < deadline, "the agent never stopped sending"
        time.sleep(0.25)
        sent = chain.metric("agent", "relay_bytes_total", 'direction="sent",stage="compressed"')
        still = still + 1 if sent == last else 0
        last = sent
    return last


def test_a_hung_viewer_set_leaves_another_viewers_find_answered(chain: DicomChain) -> None:
    port = chain.ports["dicom"]
    study = _ct_study()
    release = threading.Event()
    stores = threading.Semaphore(0)

    def hung() -> None:
        def stall() -> None:
            stores.release()
            release.wait(120)

        viewer.get(
            port,
            query("STUDY", StudyInstanceUID=study),
            classes=[samples.CT_IMAGE_STORAGE],
            before_store=stall,
        )

    def find() -> str:
        matches, final = viewer.find(port, query("STUDY", StudyInstanceUID=study))
        return f"{len(matches)} match(es), status 0x{final.Status:04X}"

    def echo() -> str:
        return f"0x{viewer.echo(port).Status:04X}"

    pool = concurrent.futures.ThreadPoolExecutor(STALLED + 2)
    try:
        stalls = [pool.submit(hung) for _ in range(STALLED)]
        for _ in range(STALLED):  # every viewer has its first C-STORE, and hangs in it
            if not stores.acquire(timeout=FILLED_WITHIN):
                raise AssertionError([f.exception() for f in stalls if f.done()])
        _until_quiet(chain, FILLED_WITHIN)

        start = time.monotonic()
        assert pool.submit(find).result(PROMPT) == "1 match(es), status 0x0000"
        assert pool.submit(echo).result(PROMPT) == "0x0000"
        assert time.monotonic() - start < PROMPT
        assert not any(s.done() for s in stalls)  # the hung viewers are still hung
    finally:
        release.set()
        pool.shutdown(wait=False, cancel_futures=True)
