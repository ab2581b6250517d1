"""Issue 13: a browser's series retrieval is written through to the encrypted disk cache.

`relay gateway|agent|workstation` from the CLI over real TLS, the embedded PACS in its
own process (the demo's CT and MR), no prefetch rule: the cache holds only what the
browser (`dicomweb-client`) retrieved. The MR series is retrieved once through the agent;
then a DICOM viewer's C-GET (DCMTK getscu) and, with the link cut, WADO-RS instances,
metadata and frames are all answered from the cache, byte-identical to the PACS's.
"""

from __future__ import annotations

import email
import email.policy
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from relay.dicom import rawds
from relay.workstation.dicomweb import part10
from relay_dev import samples
from tests.e2e.chain import RELAY
from tests.e2e.dicom_chain import HOST, DicomChain, PacsProcess, dataset_bytes, running_dicom_chain
from tests.interop.harness import dcmtk, require_tools

pytestmark = pytest.mark.interop

TIMEOUT = 60.0
HELD = samples.demo_studies()


def _decoded(inst: samples.EncodedInstance) -> Dataset:
    return rawds.decode_dataset(inst.data, inst.transfer_syntax)


def _by_series() -> dict[str, tuple[str, list[samples.EncodedInstance]]]:
    out: dict[str, tuple[str, list[samples.EncodedInstance]]] = {}
    for inst in HELD:
        ds = _decoded(inst)
        out.setdefault(str(ds.SeriesInstanceUID), (str(ds.StudyInstanceUID), []))[1].append(inst)
    return out


SERIES = _by_series()
CT_SERIES, MR_SERIES = list(SERIES)[:2]
CT_STUDY = SERIES[CT_SERIES][0]
MR_STUDY, MR = SERIES[MR_SERIES]


def wait_for(predicate: Callable[[], bool], within: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsProcess]:
    require_tools("getscu")
    proc = PacsProcess(tmp_path_factory.mktemp("pacs")).start()
    try:
        yield proc
    finally:
        proc.stop()


def cache_status(chain: DicomChain) -> list[dict[str, Any]]:
    done = subprocess.run([*RELAY, "cache", "status", "--json", "--names", "--config",
                           str(chain.tmp / "ws1.yaml")],
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)  # fmt: skip
    if done.returncode != 0:
        return []
    studies: list[dict[str, Any]] = json.loads(done.stdout)["studies"]
    return studies


def multipart(response: requests.Response) -> list[bytes]:
    head = f"Content-Type: {response.headers['Content-Type']}\r\n\r\n".encode()
    message = email.message_from_bytes(head + response.content, policy=email.policy.HTTP)
    out = []
    for part in message.iter_parts():
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        out.append(payload)
    return out


def test_a_browser_retrieval_is_cached_and_read_with_the_link_cut(
    pacs: PacsProcess, tmp_path: Path
) -> None:
    chain = DicomChain(
        tmp_path / "c",
        pacs.port,
        ws_extra="dicomweb:\n  listen: 127.0.0.1:0\n"
        "cache: {dir: cache/, max_size: 1GiB}\nprefetch: {priors: 0}\n",
    )
    chain.reporters["dicomweb"] = ("ws1", "dicomweb")
    want = {i.sop_instance: i.data for i in MR}
    with running_dicom_chain(chain):
        url = f"http://{HOST}:{chain.port('dicomweb')}/dicom-web"
        client = DICOMwebClient(url)
        assert cache_status(chain) == []
        time.sleep(0.3)  # the PACS writes its counters every 0.1 s
        gets = pacs.events().get("gets", 0)

        # 1. The browser retrieves the MR series: through the agent, once.
        got = client.retrieve_series(MR_STUDY, MR_SERIES)
        assert sorted(str(ds.SOPInstanceUID) for ds in got) == sorted(want)
        for ds in got:
            assert ds.PixelData == _decoded(next(i for i in MR if i.sop_instance ==
                                                 ds.SOPInstanceUID)).PixelData  # fmt: skip

        # 2. ... and written through: the study is complete in the cache, sealed.
        def cached() -> bool:
            return [s["state"] for s in cache_status(chain)] == ["complete"]

        assert wait_for(cached), chain.logs()
        [listed] = cache_status(chain)
        assert listed["study_uid"] == MR_STUDY and listed["source"] == "browser"
        assert listed["instances"] == len(MR)
        assert chain.metric("ws", "relay_dicomweb_series_written_to_cache_total") == 1
        canaries = [samples.MR_STUDY.patient_name.encode(), samples.MR_STUDY.patient_id.encode(),
                    MR_STUDY.encode()]  # fmt: skip
        files = [p for p in (tmp_path / "c" / "cache").rglob("*") if p.is_file()]
        assert len(files) >= len(MR)
        for path in files:
            assert not any(c in path.read_bytes() for c in canaries), path

        # 3. A DICOM viewer's C-GET of the series is served from the cache.
        node_get = dcmtk.getscu(chain.node, tmp_path / "g", "SERIES",
                                {"StudyInstanceUID": MR_STUDY, "SeriesInstanceUID": MR_SERIES},
                                extra_args=["+B"], timeout=TIMEOUT)  # fmt: skip
        assert node_get.status == "Success"
        assert sorted(map(dataset_bytes, node_get.files)) == sorted(want.values())
        assert "from the cache" in chain.procs["ws1"].output()

        # 4. Cut the link: the cached series stays readable over WADO-RS.
        chain.procs["gateway"].stop()
        assert wait_for(lambda: chain.http_get(chain.ports["ws_metrics"], "/readyz")[0] != 200)
        accept = {"Accept": 'multipart/related; type="application/dicom"'}
        r = requests.get(f"{url}/studies/{MR_STUDY}/series/{MR_SERIES}", timeout=TIMEOUT,
                         headers=accept)  # fmt: skip
        assert r.status_code == 200
        served = {}
        for data in multipart(r):
            meta, offset = part10.split(data)
            served[meta[0x00020003]] = data[offset:]
        assert served == want  # the PACS's bytes, from the disk cache
        assert chain.metric("ws", "relay_dicomweb_series_from_cache_total") == 1
        docs = client.retrieve_series_metadata(MR_STUDY, MR_SERIES)
        assert len(docs) == len(MR)
        inst = MR[len(MR) // 2]
        [frame] = client.retrieve_instance_frames(
            MR_STUDY, MR_SERIES, inst.sop_instance, [1],
            media_types=(("application/octet-stream", "*"),),
        )  # fmt: skip
        ds = _decoded(inst)
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.UID(inst.transfer_syntax)
        pixels = ds.pixel_array
        assert np.array_equal(np.frombuffer(frame, dtype=pixels.dtype).reshape(pixels.shape),
                              pixels)  # fmt: skip

        # 5. `relay cache wipe`: no decrypted copy of it stays in the server's memory
        # either (the instances read and kept, the cached series' index).
        assert chain.metric("ws", "relay_dicomweb_cache_reads_held_bytes") > 0
        config = str(chain.tmp / "ws1.yaml")
        wipe = subprocess.run(
            [*RELAY, "cache", "wipe", "--config", config],
            capture_output=True, text=True, timeout=TIMEOUT, check=False,
        )  # fmt: skip
        assert wipe.returncode == 0, wipe.stderr
        assert chain.metric("ws", "relay_dicomweb_cache_reads_held_bytes") == 0

        # 6. With the link still cut, what was never retrieved and what was wiped are not
        # there: the link is known down (its redials fail), so a 503 with Retry-After that
        # says "offline" comes at once, not after the tunnel's open deadline (15 s).
        never: tuple[str, dict[str, str]] = (
            f"{url}/studies/{CT_STUDY}/series/{CT_SERIES}/metadata",
            {},
        )
        wiped = (f"{url}/studies/{MR_STUDY}/series/{MR_SERIES}/instances/{inst.sop_instance}",
                 accept)  # fmt: skip
        with ThreadPoolExecutor(2) as pool:
            # well within the open deadline (15 s): the old answer came only after it
            answers = list(pool.map(lambda a: requests.get(a[0], timeout=10, headers=a[1]),
                                    [never, wiped]))  # fmt: skip
        assert [a.status_code for a in answers] == [503, 503], [a.text for a in answers]
        assert all("offline" in a.text and a.headers["Retry-After"] for a in answers)
        time.sleep(0.3)
        assert pacs.events().get("gets", 0) - gets == 1  # the one retrieval in step 1


def test_a_full_cache_never_fails_the_browser(pacs: PacsProcess, tmp_path: Path) -> None:
    """A cache too small for the series (1 MiB; the MR is ~9 MiB): the write-through
    stops with one log line, the browser still gets every instance, nothing is listed
    as complete, and the cache stays within its cap."""
    chain = DicomChain(
        tmp_path / "c",
        pacs.port,
        ws_extra="dicomweb:\n  listen: 127.0.0.1:0\n"
        "cache: {dir: cache/, max_size: 1MiB}\nprefetch: {priors: 0}\n",
    )
    chain.reporters["dicomweb"] = ("ws1", "dicomweb")
    with running_dicom_chain(chain):
        client = DICOMwebClient(f"http://{HOST}:{chain.port('dicomweb')}/dicom-web")
        got = client.retrieve_series(MR_STUDY, MR_SERIES)
        assert sorted(str(ds.SOPInstanceUID) for ds in got) == sorted(i.sop_instance for i in MR)
        assert wait_for(
            lambda: chain.metric("ws", "relay_dicomweb_cache_write_failures_total") == 1
        ), chain.logs()
        log = chain.procs["ws1"].output()
        assert "served from memory" in log
        assert samples.MR_STUDY.patient_name not in log and MR_STUDY not in log
        assert all(s["state"] != "complete" for s in cache_status(chain))
        files = [p for p in (tmp_path / "c" / "cache" / "objects").iterdir() if p.is_file()]
        assert sum(p.stat().st_size for p in files) <= 1024 * 1024
        # and again: served (from memory), still whole
        again = client.retrieve_series(MR_STUDY, MR_SERIES)
        assert len(again) == len(MR)
