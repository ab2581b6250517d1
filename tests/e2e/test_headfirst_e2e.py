"""Series metadata from headers first, end to end (relay/workstation/dicomweb/headfirst.py).

`relay gateway|agent|workstation` from the CLI over real TLS, the embedded PACS in its own
process with the demo's CT (40 images of 512x512) and MR; `dicomweb-client` as the
browser. The series metadata request starts the agent's headers-only retrieval beside the series
(the PACS sees that second C-GET); the headers must complete (the real agent stripped
every instance and the counts matched: otherwise the workstation counts them unused), and
the metadata must equal that of the PACS's whole instances, and of the same series once
it is all there; frames are still the PACS's pixels. On loopback the series itself may
arrive first (whichever is complete first answers), so which of the two answered is not
asserted here: tests/workstation/dicomweb/test_headfirst.py holds the series back to
show the headers answer, and the viewer benchmark's link shows it in use.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from relay.dicom import rawds
from relay.workstation.dicomweb import dicomjson
from relay_dev import samples
from tests.e2e.dicom_chain import HOST, DicomChain, PacsProcess, running_dicom_chain

pytestmark = pytest.mark.interop

TIMEOUT = 60.0
HELD = samples.demo_studies()  # what the PACS process holds (it builds the same list)


def _series() -> dict[str, tuple[str, list[samples.EncodedInstance]]]:
    out: dict[str, tuple[str, list[samples.EncodedInstance]]] = {}
    for inst in HELD:
        ds = rawds.decode_dataset(inst.data, inst.transfer_syntax)
        out.setdefault(str(ds.SeriesInstanceUID), (str(ds.StudyInstanceUID), []))[1].append(inst)
    return out


SERIES = _series()
CT_SERIES = next(iter(SERIES))
CT_STUDY, CT_INSTANCES = SERIES[CT_SERIES]


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsProcess]:
    proc = PacsProcess(tmp_path_factory.mktemp("pacs")).start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def chain(pacs: PacsProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DicomChain]:
    ws_extra = "dicomweb:\n  listen: 127.0.0.1:0\n  headers_first: true\n"
    c = DicomChain(tmp_path_factory.mktemp("chain"), pacs.port, ws_extra=ws_extra)
    c.reporters["dicomweb"] = ("ws1", "dicomweb")
    with running_dicom_chain(c):
        yield c


def by_uid(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["00080018"]["Value"][0]: d for d in docs}


def test_series_metadata_from_headers_equals_the_whole_instances(
    chain: DicomChain, pacs: PacsProcess
) -> None:
    url = f"http://{HOST}:{chain.port('dicomweb')}/dicom-web"
    client = DICOMwebClient(url)
    time.sleep(0.3)  # the PACS writes its counters every 0.1 s
    gets = pacs.events().get("gets", 0)

    early = by_uid(client.retrieve_series_metadata(CT_STUDY, CT_SERIES))

    assert chain.metric("ws", "relay_dicomweb_series_headers_retrievals_total") == 1
    deadline = time.monotonic() + TIMEOUT  # the headers may finish after the series
    while time.monotonic() < deadline and not (
        chain.metric("ws", "relay_dicomweb_series_headers_complete_total")
        or chain.metric("ws", "relay_dicomweb_series_headers_unused_total")
    ):
        time.sleep(0.1)
    assert chain.metric("ws", "relay_dicomweb_series_headers_complete_total") == 1
    assert chain.metric("ws", "relay_dicomweb_series_headers_unused_total") == 0
    # exactly what the PACS's whole instances make, BulkDataURIs and all
    assert set(early) == {i.sop_instance for i in CT_INSTANCES}
    for inst in CT_INSTANCES:
        ds = rawds.decode_dataset(inst.data, inst.transfer_syntax)
        instance_url = f"{url}/studies/{CT_STUDY}/series/{CT_SERIES}/instances/{inst.sop_instance}"
        assert early[inst.sop_instance] == dicomjson.to_json(ds, bulk_base=instance_url)
    # frames: the PACS's pixels (from the series flight)
    for inst in CT_INSTANCES[:3]:
        [frame] = client.retrieve_instance_frames(
            CT_STUDY, CT_SERIES, inst.sop_instance, [1],
            media_types=(("application/octet-stream", "*"),),
        )  # fmt: skip
        ds = rawds.decode_dataset(inst.data, inst.transfer_syntax)
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.UID(inst.transfer_syntax)
        want = ds.pixel_array
        assert np.array_equal(np.frombuffer(frame, dtype=want.dtype).reshape(want.shape), want)
    # once the series is all there, its metadata (from the whole instances) is the same
    client.retrieve_series(CT_STUDY, CT_SERIES)  # waits for the flight to finish
    later = by_uid(client.retrieve_series_metadata(CT_STUDY, CT_SERIES))
    assert later == early
    assert chain.metric("ws", "relay_dicomweb_series_headers_retrievals_total") == 1
    time.sleep(0.3)
    assert pacs.events().get("gets", 0) - gets == 2  # the series, and its headers
