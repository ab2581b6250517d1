"""The DICOM side of the agent's audit trail (PS3.15): queries, and the begin and end of
every transfer, with the device, the study and the counts.

Patient identifiers may appear here: the audit log stays inside the hospital.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from relay.agent.audit import AuditLog, Outcome
from relay.dicom.agent import OperationSummary
from relay.dicom.stats import status_category

# Study Root Query/Retrieve Information Model - FIND (the PS3.15 participant for queries)
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
_TRANSFERS = frozenset({"get", "move", "store"})


def _outcome(summary: OperationSummary) -> Outcome:
    category = status_category(summary.status)
    if category in ("success", "warning"):
        return Outcome.SUCCESS
    if category == "cancel":
        return Outcome.MINOR_FAILURE
    return Outcome.SERIOUS_FAILURE


class DicomAuditor:
    def __init__(self, audit: AuditLog, clock: Callable[[], datetime] | None = None) -> None:
        self.audit = audit
        self.clock = clock or (lambda: datetime.now(UTC))

    def begin(self, device: str, summary: OperationSummary) -> None:
        if summary.op not in _TRANSFERS:
            return
        keys = summary.keys()
        self.audit.transfer_begin(
            now=self.clock(),
            device=device,
            study_uid=keys.get("StudyInstanceUID", ""),
            to_device=summary.op != "store",
            patient_id=keys.get("PatientID"),
            details={"operation": summary.op, **keys},
        )

    def end(self, device: str, summary: OperationSummary) -> None:
        keys = summary.keys()
        if summary.op == "find":
            root = summary.request.root if summary.request is not None else ""
            self.audit.query(
                now=self.clock(),
                device=device,
                sop_class_uid=PATIENT_ROOT_FIND if root == "patient" else STUDY_ROOT_FIND,
                outcome=_outcome(summary),
                query=summary.request.dataset if summary.request is not None else None,
                details={**keys, "Status": f"0x{summary.status:04X}"},
            )
        elif summary.op in _TRANSFERS:
            self.audit.transfer_end(
                now=self.clock(),
                device=device,
                study_uid=keys.get("StudyInstanceUID", ""),
                outcome=_outcome(summary),
                completed=summary.instances,
                failed=summary.failed,
                warning=summary.warning,
                to_device=summary.op != "store",
                patient_id=keys.get("PatientID"),
                description=f"{summary.op}: status 0x{summary.status:04X} {summary.comment}"[:256],
            )
