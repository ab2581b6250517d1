"""The DICOM audit trail: a query, and a retrieval's begin and end with counts."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from relay.agent.audit import AuditLog, read_events
from relay.agent.dicom_audit import DicomAuditor
from relay.dicom.agent import OperationSummary
from relay.dicom.codec import Request

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
    text = (tmp_path / "audit.jsonl").read_text()
    assert uid in text and "PID-42" in text and DEVICE in text
    assert "110102" in text and "110104" in text and "110112" in text
