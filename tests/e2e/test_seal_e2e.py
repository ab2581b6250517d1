"""Issue 9 end to end: what a gateway process holds after DICOM went through it.

Real processes from the CLI (tests/e2e/dicom_chain.py): `relay gateway`, `relay agent`
with an embedded PACS behind it, `relay workstation` with its DICOM node, DCMTK as the
viewer. A study whose patient name and ID are unique canaries is stored (C-STORE),
queried (C-FIND), retrieved with C-GET and with C-MOVE through the chain; then the
gateway's memory is read (/proc/PID/maps + /proc/PID/mem). With sealed sessions the
gateway only ever held TLS records, so neither canary may be there. The workstation's
memory is scanned the same way as a control: it must hold the canary, or the scan proves
nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay_dev import samples
from tests.e2e.dicom_chain import DicomChain, NsForwarder, PacsProcess, running_dicom_chain
from tests.e2e.memscan import scan
from tests.interop.harness import NetNS, dcmtk, require_tools

pytestmark = pytest.mark.interop

TIMEOUT = 60.0


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsProcess]:
    require_tools("findscu", "getscu", "movescu", "storescu", "storescp")
    server = PacsProcess(tmp_path_factory.mktemp("pacs")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def viewer() -> Iterator[NsForwarder]:
    forwarder = NsForwarder()
    yield forwarder
    forwarder.close()


@pytest.fixture(scope="module")
def chain(
    pacs: PacsProcess, viewer: NsForwarder, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DicomChain]:
    c = DicomChain(
        tmp_path_factory.mktemp("chain"), pacs.port, destinations={"STORESCP": viewer.port}
    )
    with running_dicom_chain(c):
        yield c


def test_gateway_memory_holds_no_canary_after_store_find_get_and_move(
    chain: DicomChain, viewer: NsForwarder, tmp_path: Path
) -> None:
    name = f"CANARY{os.urandom(6).hex().upper()}"
    patient_id = f"CANID{os.urandom(5).hex().upper()}"
    spec = samples.StudySpec(patient_name=f"{name}^SEALED", patient_id=patient_id)
    study = samples.make_study(6, spec=spec, rows=64, cols=64, seed=909)
    paths = []
    for i, inst in enumerate(study):
        path = tmp_path / "canary" / f"{i}.dcm"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(inst.file_bytes())
        paths.append(path)
    assert dcmtk.storescu(chain.node, paths, timeout=TIMEOUT).ok
    keys = {"PatientID": patient_id, "PatientName": "", "StudyInstanceUID": ""}
    found = dcmtk.findscu(chain.node, "STUDY", keys, timeout=TIMEOUT)
    assert found.values("PatientName") == [f"{name}^SEALED"]  # it did travel the chain
    study_uid = {"StudyInstanceUID": found.values("StudyInstanceUID")[0]}
    got = dcmtk.getscu(chain.node, tmp_path / "got", "STUDY", study_uid, timeout=TIMEOUT)
    assert len(got.files) == len(study)
    with (
        NetNS() as ns,
        dcmtk.storescp(tmp_path / "dest", ns=ns, ae_title="STORESCP", extra_args=["+B"]) as scp,
    ):
        viewer.target(ns, scp.port)
        try:
            moved = dcmtk.movescu(chain.node, "STORESCP", "STUDY", study_uid, timeout=TIMEOUT)
            files = scp.wait_for_files(len(study), timeout=30)
        finally:
            viewer.target(None, None)
    assert moved.ok and len(files) == len(study)

    needles = [name.encode(), patient_id.encode()]
    in_workstation = scan(chain.pid("ws1"), needles)
    assert all(in_workstation.values()), in_workstation  # the control: the scan works
    in_gateway = scan(chain.pid("gateway"), needles)
    print(f"canary occurrences: gateway {in_gateway}, workstation {in_workstation}")
    assert in_gateway == dict.fromkeys(needles, 0), in_gateway
