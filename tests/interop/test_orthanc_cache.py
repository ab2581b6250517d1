"""Issue 12 against a real PACS: a worklist rule fills the workstation's cache from
Orthanc, then the link is cut and DCMTK still reads the study, byte for byte.

Every process of the chain runs in Orthanc's namespace (Orthanc binds every address);
`relay cache status` runs there too, since the workstation's control endpoint is on that
namespace's loopback.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.dicom import rawds
from relay_dev import samples
from tests.e2e.chain import RELAY
from tests.e2e.dicom_chain import DicomChain, bytes_by_instance, running_dicom_chain
from tests.interop.harness import Orthanc, dcmtk

pytestmark = pytest.mark.interop

TIMEOUT = 60.0
EXPLICIT = "1.2.840.10008.1.2.1"
CT = samples.make_study(8, rows=128, cols=128, seed=71)
MR = samples.make_study(3, modality="MR", seed=72)
CT_STUDY = str(rawds.decode_dataset(CT[0].data, EXPLICIT).StudyInstanceUID)
CT_PATIENT = str(rawds.decode_dataset(CT[0].data, EXPLICIT).PatientID)
HELD = {i.sop_instance: i.data for i in CT}
SCP_PORT = 11114
RULE = (
    "prefetch:\n  priors: 0\n  rules:\n"
    "    - {name: ct, every: 10s, match: {ModalitiesInStudy: CT, StudyDate: '19000101..today'}}\n"
)


def wait_for(predicate: Callable[[], bool], within: float = 90.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.3)
    return False


def cache_status(chain: DicomChain) -> dict[str, Any]:
    assert chain.ns is not None
    done = subprocess.run(
        chain.ns.exec_argv([*RELAY, "cache", "status", "--json", "--config",
                            str(chain.tmp / "ws1.yaml")]),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.fixture(scope="module")
def loaded(orthanc_module: Orthanc, tmp_path_factory: pytest.TempPathFactory) -> Orthanc:
    orthanc_module.reset()
    upload = tmp_path_factory.mktemp("upload")
    for i, inst in enumerate([*CT, *MR]):
        (upload / f"{i}.dcm").write_bytes(inst.file_bytes())
    orthanc_module.upload([upload])
    assert len(orthanc_module.instances()) == len(CT) + len(MR)
    return orthanc_module


@pytest.fixture(scope="module")
def chain(loaded: Orthanc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DicomChain]:
    c = DicomChain(
        tmp_path_factory.mktemp("chain"),
        loaded.dicom_port,
        pacs_ae=loaded.ae_title,
        ns=loaded.ns,
        destinations={"STORESCP": SCP_PORT},
        ws_extra="cache: {dir: cache/, max_size: 1GiB}\n" + RULE,
    )
    with running_dicom_chain(c):
        yield c


def test_rule_prefetch_then_link_down_reads_from_the_cache(
    chain: DicomChain, loaded: Orthanc, tmp_path: Path
) -> None:
    def complete() -> list[dict[str, Any]]:
        return [s for s in cache_status(chain)["studies"] if s["state"] == "complete"]

    assert wait_for(lambda: len(complete()) == 1), chain.logs()
    (entry,) = complete()
    assert entry["instances"] == len(CT) and entry["source"] == "rule:ct"  # the MR is not CT

    chain.procs["gateway"].stop()  # the link is down from here on
    assert wait_for(lambda: chain.http_get(chain.ports["ws_metrics"], "/readyz")[0] != 200)

    keys = {"StudyInstanceUID": CT_STUDY}
    got = dcmtk.getscu(chain.node, tmp_path / "get", "STUDY", keys, extra_args=["+B"],
                       timeout=TIMEOUT)  # fmt: skip
    assert got.status == "Success" and len(got.files) == len(CT)
    assert bytes_by_instance(got.files) == HELD  # Orthanc's bytes, from the cache

    with dcmtk.storescp(tmp_path / "dest", ns=loaded.ns, port=SCP_PORT, ae_title="STORESCP",
                        extra_args=["+B"]) as scp:  # fmt: skip
        moved = dcmtk.movescu(chain.node, "STORESCP", "STUDY", keys, timeout=TIMEOUT)
        files = scp.wait_for_files(len(CT), timeout=30)
    assert moved.ok and moved.status == "Success"
    assert bytes_by_instance(files) == HELD

    found = dcmtk.findscu(chain.node, "STUDY", {"PatientID": CT_PATIENT, "StudyInstanceUID": ""},
                          timeout=TIMEOUT)  # fmt: skip
    assert found.status == "Success" and found.values("StudyInstanceUID") == [CT_STUDY]
    assert "C-FIND answered from the cache" in chain.procs["ws1"].output()
