"""The agent's audit trail (DICOM PS3.15 events as JSON lines): the event model (`events`),
the writer (`trail`), its files (`files`: the security set and one set per device) and
its config section (`settings`)."""

from relay.agent.audit.events import (
    MAX_LINE_BYTES,
    AuditEvent,
    Code,
    Outcome,
    Participant,
    ParticipantObject,
)
from relay.agent.audit.files import DEFAULT_MAX_DEVICES, device_dir
from relay.agent.audit.settings import AuditSettings, SyslogSettings, read_audit_settings
from relay.agent.audit.trail import (
    AUDIT_FILE,
    DEFAULT_KEEP,
    DEFAULT_MAX_BYTES,
    DEVICE_KINDS,
    AuditLog,
    AuditSink,
    read_events,
)

__all__ = [
    "AUDIT_FILE",
    "DEFAULT_KEEP",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_DEVICES",
    "DEVICE_KINDS",
    "MAX_LINE_BYTES",
    "AuditEvent",
    "AuditLog",
    "AuditSettings",
    "AuditSink",
    "Code",
    "Outcome",
    "Participant",
    "ParticipantObject",
    "SyslogSettings",
    "device_dir",
    "read_audit_settings",
    "read_events",
]
