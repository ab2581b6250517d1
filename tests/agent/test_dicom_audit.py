"""The DICOM audit trail: a query, and a retrieval's begin and end with counts."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from relay.agent.audit import AuditLog, read_events
from relay.agent.dicom_audit import DicomAuditor
from relay.agent.handlers import serve_audited
from relay.dicom import rawds
from relay.dicom.agent import OperationSummary
from relay.dicom.codec import Request
from relay.dicom.pacs_target import PacsTarget
from relay_dev import samples
from relay_dev.pacs import EmbeddedPacs, MemoryStore
from tests.dicom import viewer
from tests.dicom.chain import Chain

DEVICE = "spiffe://hospital.test/device/main/ws1"


def identifier(study_uid: str) -> bytes:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_uid
    ds.PatientID = "PID-42"
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False  # explicit VR little endian
    write_dataset(buffer, ds)
    return buffer.getvalue()


def test_retrieval_is_audited_at_begin_and_end_and_queries_once(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", source_id="agent")
    auditor = DicomAuditor(log, clock=lambda: datetime(2026, 1, 1, tzinfo=UTC))
    uid = "1.2.826.0.1.3680043.2.1125.42"
    request = Request(op="retrieve", root="study", transfer_syntax="1.2.840.10008.1.2.1",
                      dataset=identifier(uid))  # fmt: skip
    started = OperationSummary("get", 0xFF00, "started", 0.0, request=request)
    auditor.begin(DEVICE, started)
    auditor.end(DEVICE, OperationSummary("get", 0x0000, "", 1.5, instances=2, request=request))
    find = Request(op="find", root="study", transfer_syntax="1.2.840.10008.1.2.1",
                   dataset=identifier(uid))  # fmt: skip
    auditor.begin(DEVICE, OperationSummary("find", 0xFF00, "started", 0.0, request=find))
    auditor.end(DEVICE, OperationSummary("find", 0x0000, "", 0.2, request=find))

    events = read_events(log.path)
    kinds = [e.get("kind") or e.get("Kind") or e["EventID"]["csd-code"] for e in events]
    assert len(events) == 3, kinds  # begin, end, query: a query has no begin event
    text = log.devices.path_of(DEVICE).read_text()  # the device's own set
    assert uid in text and "PID-42" in text and DEVICE in text
    assert "110102" in text and "110104" in text and "110112" in text


def _transfer_end(events: list[dict[str, Any]]) -> dict[str, Any]:
    ends = [e for e in events if e["kind"] == "transfer_end"]
    assert len(ends) == 1, events
    return ends[0]


def _object(event: dict[str, Any], id_type: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [
        o
        for o in event["ParticipantObjectIdentification"]
        if o["ParticipantObjectIDTypeCode"]["csd-code"] == id_type
    ]
    assert len(found) == 1, event
    return found[0]


async def test_an_upload_through_the_node_is_audited_with_its_study_and_count(
    tmp_path: Path,
) -> None:
    """A viewer's C-STORE through the workstation's node: the agent's audit events name
    the instance's study and patient, and the end counts one completed instance."""
    study = samples.make_study(1, rows=8, cols=8, seed=83)
    new = study[0]
    ds = rawds.decode_dataset(new.data, new.transfer_syntax)
    study_uid, patient_id = str(ds.StudyInstanceUID), str(ds.PatientID)
    assert study_uid and patient_id
    with EmbeddedPacs(MemoryStore([])) as pacs:
        target = PacsTarget(ae_title=pacs.ae_title, host="127.0.0.1", port=pacs.port, timeout=10)
        chain = Chain(target)
        await chain.start()
        try:
            status = await asyncio.to_thread(
                viewer.store, chain.port, new.sop_class, new.sop_instance, new.data
            )
            await chain.settle()
        finally:
            await chain.stop()
    assert status.Status == 0
    [summary] = chain.summaries
    log = AuditLog(tmp_path / "audit.jsonl", source_id="agent")
    auditor = DicomAuditor(log, clock=lambda: datetime(2026, 1, 1, tzinfo=UTC))
    auditor.begin(DEVICE, replace(summary, status=0xFF00, instances=0))
    auditor.end(DEVICE, summary)

    events = read_events(log.path)
    begin = [e for e in events if e["kind"] == "transfer_begin"]
    assert len(begin) == 1
    assert _object(begin[0], "110180")["ParticipantObjectID"] == study_uid
    end = _transfer_end(events)
    study_object = _object(end, "110180")
    assert study_object["ParticipantObjectID"] == study_uid
    details = {d["type"]: d["value"] for d in study_object["ParticipantObjectDetail"]}
    assert details == {"Completed": "1", "Failed": "0", "Warning": "0"}
    assert _object(end, "2")["ParticipantObjectID"] == patient_id
    assert end["EventIdentification"]["EventOutcomeIndicator"] == 0


async def test_a_refused_upload_is_audited_as_one_failed_instance(tmp_path: Path) -> None:
    new = samples.make_study(1, rows=8, cols=8, seed=84)[0]
    with EmbeddedPacs(MemoryStore([]), require_called_aet=True) as pacs:
        # The PACS rejects an association addressed to another AE title.
        target = PacsTarget(ae_title="NOTTHEPACS", host="127.0.0.1", port=pacs.port, timeout=10)
        chain = Chain(target)
        await chain.start()
        try:
            status = await asyncio.to_thread(
                viewer.store, chain.port, new.sop_class, new.sop_instance, new.data
            )
            await chain.settle()
        finally:
            await chain.stop()
    assert status.Status == 0xA700
    [summary] = chain.summaries
    log = AuditLog(tmp_path / "audit.jsonl", source_id="agent")
    DicomAuditor(log).end(DEVICE, summary)
    study_object = _object(_transfer_end(read_events(log.path)), "110180")
    details = {d["type"]: d["value"] for d in study_object["ParticipantObjectDetail"]}
    assert details == {"Completed": "0", "Failed": "1", "Warning": "0"}


class _Hangs:
    """A DICOM agent whose operation starts (its request read) and never ends."""

    def __init__(self, request: Request) -> None:
        self.request = request

    async def serve(
        self,
        stream: Any,
        *,
        on_request: Callable[[OperationSummary], None] | None = None,
        admit: Callable[[], bool] | None = None,
        device: str = "",
    ) -> OperationSummary:
        if on_request is not None:
            on_request(OperationSummary("get", 0xFF00, "started", 0.0, request=self.request))
        await asyncio.Event().wait()
        raise AssertionError("never")


async def test_a_transfer_cut_by_the_drain_is_audited_as_ended_in_failure(
    tmp_path: Path,
) -> None:
    """The drain cancels a handler after drain_grace: its begin event used to stay
    without an end, so the trail could not show that the transfer was cut."""
    log = AuditLog(tmp_path / "audit.jsonl", source_id="agent")
    auditor = DicomAuditor(log, clock=lambda: datetime(2026, 1, 1, tzinfo=UTC))
    uid = "1.2.826.0.1.3680043.2.1125.43"
    request = Request(op="retrieve", root="study", transfer_syntax="1.2.840.10008.1.2.1",
                      dataset=identifier(uid))  # fmt: skip
    task = asyncio.create_task(serve_audited(_Hangs(request), cast(Any, None), auditor, DEVICE))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    events = read_events(log.path)
    assert [e["kind"] for e in events] == ["transfer_begin", "transfer_end"]
    end = _transfer_end(events)
    assert end["EventIdentification"]["EventOutcomeIndicator"] != 0  # a failure
    assert uid in json.dumps(end) and "cut: the agent stopped" in json.dumps(end)
