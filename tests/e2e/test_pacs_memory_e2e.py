"""The agent remembers its PACS across a restart (relay.agent.pacs_memory), end to end.

`relay agent` learns from its first retrieve what the PACS's studies hold and that its
C-GETs give their counts; a later retrieve is then not surveyed (no C-FIND beside it).
Before pacs-memory.json, a restarted agent forgot and surveyed again. Real processes:
the three roles from the CLI, getscu, the PACS in a process of its own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from relay.agent.pacs_memory import MEMORY_FILE
from relay_dev import samples
from tests.e2e.dicom_chain import (
    HOST,
    PACS_AE,
    DicomChain,
    PacsProcess,
    running_dicom_chain,
)
from tests.interop.harness import DicomNode, dcmtk, require_tools

pytestmark = pytest.mark.interop

TIMEOUT = 60.0
# No priors fetched and no cache: every C-FIND the PACS sees is the agent's survey.
WS_EXTRA = "prefetch: {priors: 0}\ncache: {enabled: false}\n"


def _settled(read: Callable[[], int]) -> int:
    """A PACS counter once it stopped moving (its events file is ~0.1 s old)."""
    last, deadline = read(), time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = read()
        if now == last:
            return now
        last = now
    return last


def test_a_restarted_agent_remembers_its_pacs(tmp_path: Path) -> None:
    require_tools("getscu", "findscu")
    pacs = PacsProcess(tmp_path / "pacs").start()
    try:
        direct = DicomNode(HOST, pacs.port, PACS_AE)
        found = dcmtk.findscu(direct, "STUDY", {"PatientID": ""}, timeout=TIMEOUT)
        studies = dict(
            zip(found.values("PatientID"), found.values("StudyInstanceUID"), strict=True)
        )
        ct = {"StudyInstanceUID": studies[samples.CT_STUDY.patient_id]}
        mr = {"StudyInstanceUID": studies[samples.MR_STUDY.patient_id]}
        chain = DicomChain(tmp_path / "chain", pacs.port, ws_extra=WS_EXTRA)
        with running_dicom_chain(chain):
            finds = _settled(lambda: pacs.events().get("finds", 0))
            first = dcmtk.getscu(chain.node, tmp_path / "ct", "STUDY", ct, timeout=TIMEOUT)
            assert first.ok and first.files
            surveyed = _settled(lambda: pacs.events().get("finds", 0))
            assert surveyed > finds  # a new agent surveys its first retrieve

            assert chain.procs["agent"].stop() == 0  # SIGTERM: saved on the way out
            saved = json.loads((chain.tmp / "state" / MEMORY_FILE).read_text())
            assert samples.CT_IMAGE_STORAGE in saved["classes"]
            assert saved["counting"] == ["get"]
            chain.start("agent")
            chain.wait_ready()

            before = _settled(lambda: pacs.events().get("finds", 0))
            again = dcmtk.getscu(chain.node, tmp_path / "mr", "STUDY", mr, timeout=TIMEOUT)
            mr_count = sum(i.sop_class != samples.CT_IMAGE_STORAGE for i in samples.demo_studies())
            assert again.ok and len(again.files) == mr_count
            assert _settled(lambda: pacs.events().get("finds", 0)) == before  # remembered
    finally:
        pacs.stop()
