"""Issue 13 end to end: DICOMweb at the workstation, with `dicomweb-client` as the browser.

`relay gateway|agent|workstation` from the CLI over real TLS, the embedded PACS in its
own process with the demo's CT (40 images) and MR (24). What the DICOMweb client gets
through the relay must equal what the PACS holds and answers: QIDO matches equal the
PACS's own C-FIND, instances are the PACS's dataset bytes, frames its pixels, metadata
every attribute. Concurrent requests for a series share one retrieval; refusals (DNS
rebinding, size limit) and a PACS that is down get the right HTTP statuses.
"""

from __future__ import annotations

import email
import email.policy
import io
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from relay.dicom import rawds
from relay.workstation.dicomweb import part10
from relay.workstation.dicomweb.qido import parse_query
from relay_dev import samples
from tests.e2e.chain import RELAY
from tests.e2e.dicom_chain import HOST, PACS_AE, DicomChain, PacsProcess, running_dicom_chain

pytestmark = pytest.mark.interop

TIMEOUT = 60.0
MAX_UPLOAD = 2 * 1024 * 1024
RULE = (
    "prefetch:\n  priors: 0\n  rules:\n"
    "    - {name: ct, every: 10s, match: {ModalitiesInStudy: CT, StudyDate: '20000101..today'}}\n"
)
HELD = samples.demo_studies()  # what the PACS process holds (it builds the same list)
BY_UID = {i.sop_instance: i for i in HELD}


def _decoded(inst: samples.EncodedInstance) -> Dataset:
    return rawds.decode_dataset(inst.data, inst.transfer_syntax)


def _series() -> dict[str, tuple[str, list[samples.EncodedInstance]]]:
    out: dict[str, tuple[str, list[samples.EncodedInstance]]] = {}
    for inst in HELD:
        ds = _decoded(inst)
        out.setdefault(str(ds.SeriesInstanceUID), (str(ds.StudyInstanceUID), []))[1].append(inst)
    return out


SERIES = _series()
CT_SERIES, MR_SERIES = list(SERIES)[:2]
CT_STUDY, MR_STUDY = SERIES[CT_SERIES][0], SERIES[MR_SERIES][0]


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsProcess]:
    proc = PacsProcess(tmp_path_factory.mktemp("pacs")).start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def chain(pacs: PacsProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DicomChain]:
    c = DicomChain(
        tmp_path_factory.mktemp("chain"),
        pacs.port,
        ws_extra=f"dicomweb:\n  listen: 127.0.0.1:0\n  max_upload: {MAX_UPLOAD}\n" + RULE,
    )
    c.reporters["dicomweb"] = ("ws1", "dicomweb")
    with running_dicom_chain(c):
        # the worklist rule puts the CT in the cache; the MR stays on the network
        deadline = time.monotonic() + TIMEOUT
        while not cached_studies(c) and time.monotonic() < deadline:
            time.sleep(0.3)
        assert cached_studies(c) == [CT_STUDY], c.logs()
        yield c


def cached_studies(chain: DicomChain) -> list[str]:
    done = subprocess.run([*RELAY, "cache", "status", "--json", "--names", "--config",
                           str(chain.tmp / "ws1.yaml")],
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)  # fmt: skip
    if done.returncode != 0:
        return []
    studies = json.loads(done.stdout)["studies"]
    return [s["study_uid"] for s in studies if s["state"] == "complete"]


@pytest.fixture(scope="module")
def url(chain: DicomChain) -> str:
    return f"http://{HOST}:{chain.port('dicomweb')}/dicom-web"


@pytest.fixture(scope="module")
def client(url: str) -> DICOMwebClient:
    return DICOMwebClient(url)


def pacs_find(pacs: PacsProcess, identifier: Dataset) -> list[Dataset]:
    """The PACS's own answer to a C-FIND, asked directly (pynetdicom, no relay)."""
    ae = AE(ae_title="DIRECT")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(HOST, pacs.port, ae_title=PACS_AE)
    assert assoc.is_established
    try:
        answers = assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind)
        found = [ds for status, ds in answers
                 if status and status.Status in (0xFF00, 0xFF01) and ds is not None]  # fmt: skip
    finally:
        assoc.release()
    return found


def comparable(ds: Dataset) -> dict[str, str]:
    skip = {"QueryRetrieveLevel", "RetrieveAETitle", "SpecificCharacterSet",
            "InstanceAvailability"}  # fmt: skip
    return {
        e.keyword: str(e.value) for e in ds if e.keyword not in skip and e.value not in ("", None)
    }


@pytest.mark.parametrize(
    ("level", "params", "path"),
    [
        ("STUDY", [("PatientName", "*"), ("ModalitiesInStudy", "CT")], {}),
        ("STUDY", [("StudyDate", "20000101-20991231"), ("includefield", "all")], {}),
        ("SERIES", [], {"StudyInstanceUID": MR_STUDY}),
        ("IMAGE", [("limit", "5"), ("offset", "3")],
         {"StudyInstanceUID": CT_STUDY, "SeriesInstanceUID": CT_SERIES}),
    ],
    ids=["studies-ct", "studies-dates", "series", "instances-paged"],
)  # fmt: skip
def test_qido_equals_the_pacs_c_find(
    client: DICOMwebClient,
    pacs: PacsProcess,
    level: str,
    params: list[tuple[str, str]],
    path: dict[str, str],
) -> None:
    search: dict[str, Any] = {
        k: v for k, v in params if k not in ("limit", "offset", "includefield")
    }
    fields = [v for k, v in params if k == "includefield"]
    limit = next((int(v) for k, v in params if k == "limit"), None)
    offset = next((int(v) for k, v in params if k == "offset"), None)
    if level == "STUDY":
        got = client.search_for_studies(search_filters=search, fields=fields or None)
    elif level == "SERIES":
        got = client.search_for_series(path["StudyInstanceUID"], search_filters=search)
    else:
        got = client.search_for_instances(
            path["StudyInstanceUID"], path["SeriesInstanceUID"],
            search_filters=search, limit=limit, offset=offset,
        )  # fmt: skip
    query = parse_query(level, params, path)
    direct = query.page(pacs_find(pacs, query.identifier))
    assert len(got) == len(direct) > 0
    relayed = sorted((comparable(Dataset.from_json(m)) for m in got), key=str)
    assert relayed == sorted((comparable(d) for d in direct), key=str)


def test_qido_malformed_is_400_naming_the_parameter(url: str) -> None:
    r = requests.get(f"{url}/studies", params={"StudyDate": "yesterday"}, timeout=TIMEOUT)
    assert r.status_code == 400 and "StudyDate" in r.text


def test_concurrent_requests_share_one_series_retrieval(url: str, pacs: PacsProcess) -> None:
    """Three requests for a series not yet retrieved (the first test to touch the MR): the
    PACS sees one C-GET for the series (headers first is off by default), and each
    request gets every instance."""
    study, instances = SERIES[MR_SERIES]
    time.sleep(0.3)  # the PACS writes its counters every 0.1 s: let earlier tests' land
    before = pacs.events().get("gets", 0)
    results: list[int] = []

    def fetch() -> None:
        r = requests.get(f"{url}/studies/{study}/series/{MR_SERIES}/metadata", timeout=TIMEOUT)
        results.append(len(r.json()))

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert results == [len(instances)] * 3
    time.sleep(0.3)
    assert pacs.events().get("gets", 0) - before == 1  # the series, once


def multipart(response: requests.Response) -> list[tuple[str, bytes]]:
    head = f"Content-Type: {response.headers['Content-Type']}\r\n\r\n".encode()
    message = email.message_from_bytes(head + response.content, policy=email.policy.HTTP)
    out = []
    for part in message.iter_parts():
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        out.append((str(part["Content-Type"]), payload))
    return out


def test_retrieved_instances_are_the_pacs_bytes(
    url: str, client: DICOMwebClient, chain: DicomChain
) -> None:
    """The CT is complete in the cache: served from it, still the PACS's bytes."""
    port = chain.port("ws_metrics")
    r = requests.get(f"{url}/studies/{CT_STUDY}", timeout=TIMEOUT,
                     headers={"Accept": 'multipart/related; type="application/dicom"'})  # fmt: skip
    assert r.status_code == 200
    parts = multipart(r)
    want = SERIES[CT_SERIES][1]
    assert len(parts) == len(want)
    got = {}
    for ctype, data in parts:
        assert ctype.startswith("application/dicom")
        meta, offset = part10.split(data)
        got[meta[0x00020003]] = data[offset:]
    assert got == {i.sop_instance: i.data for i in want}  # byte for byte
    metrics = requests.get(f"http://{HOST}:{port}/metrics", timeout=TIMEOUT).text
    assert "relay_dicomweb_series_from_cache_total 1.0" in metrics
    # and dicomweb-client reads them as DICOM files
    inst = want[0]
    ds = client.retrieve_instance(CT_STUDY, CT_SERIES, inst.sop_instance)
    assert ds.SOPInstanceUID == inst.sop_instance
    assert ds.PixelData == _decoded(inst).PixelData


def test_frames_decode_to_the_pacs_pixels(client: DICOMwebClient) -> None:
    for inst in SERIES[CT_SERIES][1][:3]:
        [frame] = client.retrieve_instance_frames(
            CT_STUDY, CT_SERIES, inst.sop_instance, [1],
            media_types=(("application/octet-stream", "*"),),
        )  # fmt: skip
        ds = _decoded(inst)
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.UID(inst.transfer_syntax)
        want = ds.pixel_array
        pixels = np.frombuffer(frame, dtype=want.dtype).reshape(want.shape)
        assert np.array_equal(pixels, want)
        assert len(np.unique(pixels)) > 10  # a real image, not a blank


def test_frames_as_htj2k_decode_to_the_pacs_pixels(url: str) -> None:
    """HTJ2K on request (dicomweb-client does not know image/jphc: plain HTTP here)."""
    import imagecodecs

    accept = 'multipart/related; type="image/jphc"; transfer-syntax=1.2.840.10008.1.2.4.201'
    native = 0
    encoded = 0
    for inst in SERIES[CT_SERIES][1][:3]:
        base = f"{url}/studies/{CT_STUDY}/series/{CT_SERIES}/instances/{inst.sop_instance}"
        r = requests.get(f"{base}/frames/1", headers={"Accept": accept}, timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        [(ctype, stream)] = multipart(r)
        assert ctype.replace('"', "").startswith(
            "image/jphc; transfer-syntax=1.2.840.10008.1.2.4.201"
        )
        ds = _decoded(inst)
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.UID(inst.transfer_syntax)
        want = ds.pixel_array
        assert np.array_equal(imagecodecs.htj2k_decode(stream), want)
        native += len(ds.PixelData)
        encoded += len(stream)
    assert encoded < native  # fewer bytes to the browser


def test_metadata_is_complete_with_bulk_data_uris(client: DICOMwebClient) -> None:
    docs = client.retrieve_series_metadata(MR_STUDY, MR_SERIES)
    want = {i.sop_instance: _decoded(i) for i in SERIES[MR_SERIES][1]}
    assert len(docs) == len(want)
    for doc in docs:
        uri = doc["7FE00010"]["BulkDataURI"]
        meta = Dataset.from_json(doc, bulk_data_uri_handler=lambda *_: b"")
        pacs_ds = want[meta.SOPInstanceUID]
        for elem in pacs_ds:
            assert elem.tag in meta, elem.keyword
            if elem.VR not in ("OB", "OW", "SQ", "UN"):
                assert meta[elem.tag].value == elem.value, elem.keyword
        # the BulkDataURI serves the pixel data itself
        r = requests.get(uri, timeout=TIMEOUT)
        assert r.status_code == 200
        assert multipart(r)[0][1] == pacs_ds.PixelData


def test_rendered_thumbnail(url: str) -> None:
    inst = SERIES[MR_SERIES][1][0]
    base = f"{url}/studies/{MR_STUDY}/series/{MR_SERIES}/instances/{inst.sop_instance}"
    r = requests.get(f"{base}/rendered?viewport=64,64", headers={"Accept": "image/jpeg"},
                     timeout=TIMEOUT)  # fmt: skip
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/jpeg"
    from PIL import Image

    image = Image.open(io.BytesIO(r.content))
    assert image.format == "JPEG" and max(image.size) == 64
    # the series and the study: their middle image (by Instance Number), as PNG
    png = {"Accept": "image/png"}
    by_number = sorted(SERIES[MR_SERIES][1], key=lambda i: int(_decoded(i).InstanceNumber))
    middle = by_number[len(by_number) // 2]
    base = f"{url}/studies/{MR_STUDY}/series/{MR_SERIES}"
    want = requests.get(f"{base}/instances/{middle.sop_instance}/rendered", headers=png,
                        timeout=TIMEOUT).content  # fmt: skip
    assert want[:4] == b"\x89PNG"
    for what in (f"{base}/rendered", f"{url}/studies/{MR_STUDY}/rendered"):
        r = requests.get(what, headers=png, timeout=TIMEOUT)
        assert r.status_code == 200 and r.content == want, what
    r = requests.get(f"{url}/studies/{MR_STUDY}/thumbnail", timeout=TIMEOUT)
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(r.content)).size) == 128


def test_dns_rebinding_and_cross_origin_requests_are_refused(url: str, chain: DicomChain) -> None:
    port = chain.port("dicomweb")
    r = requests.get(
        f"{url}/studies", headers={"Host": f"attacker.example:{port}"}, timeout=TIMEOUT
    )
    assert r.status_code == 403
    r = requests.get(
        f"{url}/studies", headers={"Origin": "http://attacker.example"}, timeout=TIMEOUT
    )
    assert r.status_code == 403 and "Access-Control-Allow-Origin" not in r.headers


def test_stow_lands_in_the_pacs_and_oversize_is_413(
    url: str, client: DICOMwebClient, pacs: PacsProcess
) -> None:
    inst = SERIES[MR_SERIES][1][0]
    ds = pydicom.dcmread(io.BytesIO(inst.file_bytes()))
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    before = pacs.events().get("stores", 0)
    result = client.store_instances([ds])
    assert [str(x.ReferencedSOPInstanceUID) for x in result.ReferencedSOPSequence] == [
        ds.SOPInstanceUID
    ]
    ident = _ident("IMAGE", SOPInstanceUID=ds.SOPInstanceUID, StudyInstanceUID=MR_STUDY,
                   SeriesInstanceUID=MR_SERIES)  # fmt: skip
    found = pacs_find(pacs, ident)
    assert len(found) == 1
    deadline = time.monotonic() + 5  # the PACS writes its counters every 0.1 s
    while pacs.events().get("stores", 0) <= before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pacs.events().get("stores", 0) > before
    big = b"\0" * (MAX_UPLOAD + 1)
    r = requests.post(f"{url}/studies", data=big, timeout=TIMEOUT, headers={
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=x'})  # fmt: skip
    assert r.status_code == 413


def _ident(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def test_metrics_count_requests_by_route_and_status(chain: DicomChain) -> None:
    port = chain.port("ws_metrics")
    text = requests.get(f"http://{HOST}:{port}/metrics", timeout=TIMEOUT).text
    assert 'relay_dicomweb_requests_total{route="/dicom-web/studies",status="200"}' in text
    assert 'relay_dicomweb_requests_total{route="/dicom-web/studies",status="403"}' in text
    assert "relay_dicomweb_request_duration_seconds_bucket" in text
    retrievals = [line for line in text.splitlines()
                  if line.startswith("relay_dicomweb_series_retrievals_total ")]  # fmt: skip
    assert retrievals and float(retrievals[0].split()[1]) == 1  # the MR; the CT was cached
    assert "1.2.826" not in text  # no UIDs in labels


def test_unknown_study_is_404_and_a_pacs_down_is_502_with_the_reason(
    url: str, pacs: PacsProcess
) -> None:
    r = requests.get(f"{url}/studies/1.2.3.999/metadata", timeout=TIMEOUT)
    assert r.status_code == 404
    pacs.stop()  # last test of the module: the PACS is gone
    r = requests.get(f"{url}/studies", params={"PatientID": "X"}, timeout=TIMEOUT)
    assert r.status_code == 502, r.text
    assert "PACS" in r.text
    json.dumps(r.text)


def test_with_the_link_down_qido_is_answered_from_the_cache(url: str, chain: DicomChain) -> None:
    chain.procs["gateway"].stop()
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if chain.http_get(chain.ports["ws_metrics"], "/readyz")[0] != 200:
            break
        time.sleep(0.2)
    r = requests.get(f"{url}/studies", params={"ModalitiesInStudy": "CT"}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert "cache" in r.headers.get("Warning", "")
    assert [Dataset.from_json(m).StudyInstanceUID for m in r.json()] == [CT_STUDY]
    # the cached study stays readable
    r = requests.get(f"{url}/studies/{CT_STUDY}/series/{CT_SERIES}/metadata", timeout=TIMEOUT)
    assert r.status_code == 200 and len(r.json()) == len(SERIES[CT_SERIES][1])
