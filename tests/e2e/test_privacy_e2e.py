"""Issue 8: no data element value in any role's log at the default level.

A canary patient (name, ID, accession and study UID unique to the run) is stored through
the relay, queried, retrieved with C-GET and C-MOVE, and used in operations that are
refused or fail (unknown and unreachable C-MOVE destinations, a retrieve the PACS
refuses, a malformed query key, the PACS down): pynetdicom dumps identifiers on the way
in and out and on errors, pydicom warns with values. Afterwards no line of the gateway's,
the agent's or the workstation's log (stdout and stderr) contains the canary in any
form. At `log_level: debug` the dumps are allowed, and a second run shows that they are
there: the search would find a leak.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay_dev import samples
from tests.e2e.dicom_chain import (
    DicomChain,
    NsForwarder,
    PacsProcess,
    dataset_bytes,
    running_dicom_chain,
)
from tests.interop.harness import NetNS, dcmtk, require_tools

pytestmark = pytest.mark.interop

TIMEOUT = 60.0
ROLES = ("gateway", "agent", "ws1")
COUNT = 4


@dataclass(frozen=True)
class Canary:
    """A patient and study that exist only for this run; `forms` are what must not leak."""

    instances: list[samples.EncodedInstance]
    spec: samples.StudySpec

    @classmethod
    def make(cls) -> Canary:
        token = os.urandom(5).hex().upper()
        spec = samples.StudySpec(
            patient_name=f"CANARY{token}^PRIVACY{token}",
            patient_id=f"PID{token}",
            accession=f"ACC{token}",
            study_uid=f"2.25.{int.from_bytes(os.urandom(15), 'big') | 1 << 100}",
        )
        seed = int.from_bytes(os.urandom(3), "big")
        return cls(samples.make_study(COUNT, spec=spec, rows=32, cols=32, seed=seed), spec)

    @property
    def study_uid(self) -> str:
        return self.spec.study_uid

    @property
    def forms(self) -> set[str]:
        family, given = self.spec.patient_name.split("^")
        uids = {inst.sop_instance for inst in self.instances}
        return {self.spec.patient_name, family, given, self.spec.patient_id,
                self.spec.accession, self.study_uid, *uids}  # fmt: skip

    def write(self, directory: Path) -> list[Path]:
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, inst in enumerate(self.instances):
            path = directory / f"{i}.dcm"
            path.write_bytes(inst.file_bytes())
            paths.append(path)
        return paths


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[PacsProcess]:
    require_tools("echoscu", "findscu", "getscu", "movescu", "storescu", "storescp")
    server = PacsProcess(tmp_path / "pacs", data="none").start()
    yield server
    server.stop()


@pytest.fixture
def viewer() -> Iterator[NsForwarder]:
    """STORESCP, the workstation's C-MOVE destination (a storescp in a namespace)."""
    forwarder = NsForwarder()
    yield forwarder
    forwarder.close()


@pytest.fixture
def down() -> Iterator[NsForwarder]:
    """DOWNAE, a configured destination that is down: it closes every connection."""
    forwarder = NsForwarder()
    yield forwarder
    forwarder.close()


def _chain(tmp: Path, pacs: PacsProcess, viewer: NsForwarder, down: NsForwarder) -> DicomChain:
    return DicomChain(tmp, pacs.port, destinations={"STORESCP": viewer.port, "DOWNAE": down.port})


def _leaks(chain: DicomChain, forms: set[str]) -> dict[str, list[str]]:
    """Each role's log lines that contain any form of the canary."""
    found: dict[str, list[str]] = {}
    for role in ROLES:
        lines = chain.procs[role].output().splitlines()
        bad = [line for line in lines if any(form in line for form in forms)]
        if bad:
            found[role] = bad
    return found


def _json_lines(chain: DicomChain, role: str) -> list[dict[str, object]]:
    """A role's log, every line of which must be one of our JSON objects (no raw stderr)."""
    entries = []
    for line in chain.procs[role].output().splitlines():
        entry = json.loads(line)
        assert isinstance(entry, dict) and entry.get("role"), line
        entries.append(entry)
    return entries


def test_no_role_logs_the_canary_at_the_default_level(
    pacs: PacsProcess, viewer: NsForwarder, down: NsForwarder, tmp_path: Path
) -> None:
    canary = Canary.make()
    chain = _chain(tmp_path / "chain", pacs, viewer, down)
    by_uid = {"StudyInstanceUID": canary.study_uid}
    with running_dicom_chain(chain):
        node = chain.node
        # Upload, queries at every level and both roots, C-GET, C-MOVE: all succeed.
        assert dcmtk.storescu(node, canary.write(tmp_path / "up"), timeout=TIMEOUT).ok
        found = dcmtk.findscu(
            node, "STUDY",
            {"PatientID": canary.spec.patient_id, "PatientName": "", "StudyInstanceUID": "",
             "AccessionNumber": ""},
            timeout=TIMEOUT,
        )  # fmt: skip
        assert found.values("PatientName") == [canary.spec.patient_name]
        assert found.values("StudyInstanceUID") == [canary.study_uid]
        family = canary.spec.patient_name.split("^")[0]
        wild = dcmtk.findscu(node, "STUDY", {"PatientName": f"{family}*", "PatientID": ""},
                             timeout=TIMEOUT)  # fmt: skip
        assert wild.values("PatientID") == [canary.spec.patient_id]
        patient = dcmtk.findscu(node, "PATIENT", {"PatientID": canary.spec.patient_id,
                                                  "PatientName": ""},
                                model="patient", timeout=TIMEOUT)  # fmt: skip
        assert patient.values("PatientName") == [canary.spec.patient_name]
        images = dcmtk.findscu(node, "IMAGE", {**by_uid, "SeriesInstanceUID": "",
                                               "SOPInstanceUID": ""}, timeout=TIMEOUT)  # fmt: skip
        assert sorted(images.values("SOPInstanceUID")) == sorted(
            inst.sop_instance for inst in canary.instances
        )
        stored = sorted(inst.data for inst in canary.instances)
        got = dcmtk.getscu(node, tmp_path / "get", "STUDY", by_uid, extra_args=["+B"],
                           timeout=TIMEOUT)  # fmt: skip
        assert sorted(map(dataset_bytes, got.files)) == stored
        got_patient = dcmtk.getscu(node, tmp_path / "get-p", "PATIENT",
                                   {"PatientID": canary.spec.patient_id}, model="patient",
                                   timeout=TIMEOUT)  # fmt: skip
        assert len(got_patient.files) == COUNT
        with (
            NetNS() as ns,
            dcmtk.storescp(tmp_path / "dest", ns=ns, ae_title="STORESCP", extra_args=["+B"]) as scp,
        ):
            viewer.target(ns, scp.port)
            try:
                moved = dcmtk.movescu(node, "STORESCP", "STUDY", by_uid, timeout=TIMEOUT)
                files = scp.wait_for_files(COUNT, timeout=30)
            finally:
                viewer.target(None, None)
        assert moved.ok and sorted(map(dataset_bytes, files)) == stored

        # Refused and failed operations, each carrying the canary in its keys.
        unknown = dcmtk.movescu(node, "NOSUCHAE", "STUDY", by_uid, timeout=TIMEOUT, check=False)
        assert not unknown.ok
        unreachable = dcmtk.movescu(node, "DOWNAE", "STUDY", by_uid, timeout=TIMEOUT,
                                    check=False)  # fmt: skip
        assert not unreachable.ok
        refused = dcmtk.getscu(node, tmp_path / "refused", "IMAGE", by_uid, timeout=TIMEOUT,
                               check=False)  # fmt: skip
        assert not refused.ok and refused.files == ()
        # Not a UID (letters in it): pydicom warns, quoting the value.
        malformed = {"StudyInstanceUID": f"{canary.study_uid}.X{family}",
                     "PatientName": canary.spec.patient_name}  # fmt: skip
        dcmtk.findscu(node, "STUDY", malformed, timeout=TIMEOUT, check=False)
        pacs.stop()
        gone = dcmtk.findscu(node, "STUDY", {"PatientID": canary.spec.patient_id},
                             timeout=TIMEOUT, check=False)  # fmt: skip
        assert not gone.ok
        gone_get = dcmtk.getscu(node, tmp_path / "gone", "STUDY", by_uid, timeout=TIMEOUT,
                                check=False)  # fmt: skip
        assert not gone_get.ok and gone_get.files == ()

    # The canary went through both ends (the answers above carry it); their logs did not.
    leaks = _leaks(chain, canary.forms)
    assert not leaks, "\n".join(f"{r}: {line[:300]}" for r, ls in leaks.items() for line in ls[:8])
    for role in ROLES:
        entries = _json_lines(chain, role)
        assert {e["level"] for e in entries} >= {"info"}, role
    agent = _json_lines(chain, "agent")
    assert sum(e["msg"] == "stream open" and e.get("target") == "dicom" for e in agent) >= 10


def test_at_debug_level_the_dumps_are_there(
    pacs: PacsProcess, viewer: NsForwarder, down: NsForwarder, tmp_path: Path
) -> None:
    """The control: with `log_level: debug` the same search finds the canary in both ends'
    logs (README says so), so the test above would see a leak. The gateway still never
    sees a value: it does not parse DICOM."""
    canary = Canary.make()
    chain = _chain(tmp_path / "chain", pacs, viewer, down).setup()
    for role in ROLES:
        config = chain.tmp / f"{role}.yaml"
        config.write_text(config.read_text() + "log_level: debug\n")
    try:
        chain.start()
        chain.wait_ready()
        assert dcmtk.storescu(chain.node, canary.write(tmp_path / "up"), timeout=TIMEOUT).ok
        keys = {"PatientID": canary.spec.patient_id, "PatientName": ""}
        found = dcmtk.findscu(chain.node, "STUDY", keys, timeout=TIMEOUT)
        assert found.values("PatientName") == [canary.spec.patient_name]
    finally:
        chain.stop_all()
    leaks = _leaks(chain, canary.forms)
    assert set(leaks) == {"agent", "ws1"}, sorted(leaks)
