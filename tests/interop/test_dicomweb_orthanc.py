"""Issue 13 against a real PACS: the workstation's DICOMweb in front of Orthanc.

Orthanc runs in a network namespace with only `lo`, and so does the whole chain (gateway,
agent, workstation); `dicomweb-client` runs on a thread inside that namespace. QIDO
matches equal Orthanc's own C-FIND (findscu, directly), WADO-RS instances are Orthanc's
stored bytes, and a STOW-RS upload lands in Orthanc through the relay's C-STORE.
"""

from __future__ import annotations

import email
import email.policy
import io
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from relay.dicom import rawds
from relay.workstation.dicomweb import part10
from relay_dev import samples
from tests.e2e.dicom_chain import DicomChain, running_dicom_chain
from tests.interop.harness import Orthanc, dcmtk

pytestmark = pytest.mark.interop

TIMEOUT = 60.0
EXPLICIT = "1.2.840.10008.1.2.1"
CT = samples.make_study(5, rows=128, cols=128, seed=131)
FIRST = rawds.decode_dataset(CT[0].data, EXPLICIT)
STUDY, SERIES = str(FIRST.StudyInstanceUID), str(FIRST.SeriesInstanceUID)
T = TypeVar("T")


@pytest.fixture(scope="module")
def chain(
    orthanc_module: Orthanc, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DicomChain]:
    orthanc_module.reset()
    for inst in CT:
        orthanc_module.rest("POST", "/instances", inst.file_bytes())
    c = DicomChain(
        tmp_path_factory.mktemp("chain"),
        orthanc_module.dicom_port,
        pacs_ae=orthanc_module.ae_title,
        ns=orthanc_module.ns,
        ws_extra="dicomweb:\n  listen: 127.0.0.1:0\n",
    )
    c.reporters["dicomweb"] = ("ws1", "dicomweb")
    with running_dicom_chain(c):
        yield c


@pytest.fixture(scope="module")
def inside(orthanc_module: Orthanc) -> Callable[[Callable[[], Any]], Any]:
    """Run a function on a thread inside Orthanc's namespace (where the chain is)."""

    def call(fn: Callable[[], T]) -> T:
        return orthanc_module.ns.call_inside(fn, timeout=TIMEOUT)

    return call


@pytest.fixture(scope="module")
def url(chain: DicomChain) -> str:
    return f"http://127.0.0.1:{chain.port('dicomweb')}/dicom-web"


def test_qido_equals_orthancs_c_find(
    url: str, orthanc_module: Orthanc, inside: Callable[[Callable[[], Any]], Any]
) -> None:
    got = inside(lambda: DICOMwebClient(url).search_for_studies(
        search_filters={"PatientID": str(FIRST.PatientID)}))  # fmt: skip
    direct = dcmtk.findscu(orthanc_module.node, "STUDY",
                           {"PatientID": str(FIRST.PatientID), "PatientName": "", "StudyDate": "",
                            "AccessionNumber": ""}, timeout=TIMEOUT)  # fmt: skip
    assert len(got) == len(direct.matches) == 1
    relayed = Dataset.from_json(got[0])
    for keyword in ("StudyInstanceUID", "PatientName", "StudyDate", "AccessionNumber"):
        assert str(relayed.get(keyword)) == str(direct.matches[0].get(keyword)), keyword
    series = inside(lambda: DICOMwebClient(url).search_for_instances(STUDY, SERIES))
    assert sorted(Dataset.from_json(m).SOPInstanceUID for m in series) == sorted(
        i.sop_instance for i in CT
    )


@pytest.mark.parametrize(("modalities", "found"), [("CT,MR", 1), ("MR,PT", 0)])
def test_a_comma_list_of_modalities_is_orthancs_c_find_of_those_values(
    url: str,
    orthanc_module: Orthanc,
    inside: Callable[[Callable[[], Any]], Any],
    modalities: str,
    found: int,
) -> None:
    """`ModalitiesInStudy=CT,MR` (dicomweb-client, OHIF's study list) was a 400 since
    734c6e0: it goes to Orthanc as the C-FIND's values CT and MR, and the matches are
    those of findscu's own C-FIND with them."""
    got = inside(lambda: DICOMwebClient(url).search_for_studies(
        search_filters={"ModalitiesInStudy": modalities}))  # fmt: skip
    direct = dcmtk.findscu(orthanc_module.node, "STUDY",
                           {"ModalitiesInStudy": modalities.replace(",", "\\")},
                           timeout=TIMEOUT)  # fmt: skip
    assert len(got) == len(direct.matches) == found
    assert [Dataset.from_json(m).StudyInstanceUID for m in got] == [STUDY] * found


def _orthanc_file(orthanc: Orthanc, sop_instance: str) -> bytes:
    query = {"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance}}
    [found] = orthanc.rest("POST", "/tools/find", query)
    data = orthanc.rest("GET", f"/instances/{found}/file")
    assert isinstance(data, bytes)
    return data


def _series_bytes(url: str, inside: Callable[[Callable[[], Any]], Any]) -> dict[str, bytes]:
    response = inside(lambda: requests.get(f"{url}/studies/{STUDY}/series/{SERIES}",
                                           timeout=TIMEOUT))  # fmt: skip
    assert response.status_code == 200
    head = f"Content-Type: {response.headers['Content-Type']}\r\n\r\n".encode()
    message = email.message_from_bytes(head + response.content, policy=email.policy.HTTP)
    got: dict[str, bytes] = {}
    for part in message.iter_parts():
        data = part.get_payload(decode=True)
        assert isinstance(data, bytes)
        meta, offset = part10.split(data)
        got[meta[0x00020003]] = data[offset:]
    return got


def test_wado_instances_are_orthancs_bytes(
    url: str,
    chain: DicomChain,
    orthanc_module: Orthanc,
    inside: Callable[[Callable[[], Any]], Any],
) -> None:
    got = _series_bytes(url, inside)
    assert len(got) == len(CT)
    for sop, dataset in got.items():
        stored = _orthanc_file(orthanc_module, sop)
        assert dataset == stored[part10.split(stored)[1] :]  # Orthanc's bytes, exactly
    # Orthanc's C-GET counts vouch for the series: written through to the cache, and the
    # next request reads it there
    deadline = time.monotonic() + TIMEOUT
    while chain.metric("ws", "relay_dicomweb_series_written_to_cache_total") < 1:
        assert time.monotonic() < deadline, chain.logs()
        time.sleep(0.2)
    assert _series_bytes(url, inside) == got
    assert chain.metric("ws", "relay_dicomweb_series_from_cache_total") == 1


def test_stow_lands_in_orthanc(
    url: str, orthanc_module: Orthanc, inside: Callable[[Callable[[], Any]], Any]
) -> None:
    ds = pydicom.dcmread(io.BytesIO(CT[0].file_bytes()))
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    result = inside(lambda: DICOMwebClient(url).store_instances([ds]))
    assert [str(x.ReferencedSOPInstanceUID) for x in result.ReferencedSOPSequence] == [
        str(ds.SOPInstanceUID)
    ]
    assert str(ds.SOPInstanceUID) in orthanc_module.instances()
    stored = pydicom.dcmread(io.BytesIO(_orthanc_file(orthanc_module, str(ds.SOPInstanceUID))))
    assert stored.PixelData == ds.PixelData and stored.PatientID == ds.PatientID
