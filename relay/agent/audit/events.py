"""The audit event model: DICOM PS3.15 (RFC 3881) audit messages as JSON, and the
agent's events built from one table.

Each event is shaped like the DICOM audit message schema (PS3.15 A.5.1) with JSON instead
of XML: EventIdentification (EventID, EventActionCode, EventDateTime,
EventOutcomeIndicator, EventTypeCode), ActiveParticipant, AuditSourceIdentification and
ParticipantObjectIdentification, plus a short `kind` to grep for. Coded values are
{"csd-code", "codeSystemName", "originalText"} as in the schema.

Events and codes (PS3.15 A.5.3, CID 403 for the Security Alert type codes):

| kind           | EventID                                   | EventTypeCode                    |
|----------------|-------------------------------------------|----------------------------------|
| enrollment     | 110114 User Authentication                | 110122 Login                     |
| renewal        | 110113 Security Alert                     | 110137 User security Attr. Chg.  |
| token_created  | 110113 Security Alert                     | 110137 User security Attr. Chg.  |
| revocation     | 110113 Security Alert                     | 110137 User security Attr. Chg.  |
| auth_refused   | 110113 Security Alert                     | 110126 Node Authentication       |
| it_login       | 110114 User Authentication                | 110122 Login                     |
| it_logout      | 110114 User Authentication                | 110123 Logout                    |
| audit_pruned   | 110113 Security Alert                     | 110133 Audit Recording Stopped   |
| query          | 110112 Query                              |                                  |
| transfer_begin | 110102 Begin Transferring DICOM Instances |                                  |
| transfer_end   | 110104 DICOM Instances Transferred        |                                  |

Patient identifiers may appear in events (transfers name the patient): they stay inside
the hospital.

`audit_pruned` says a device's set was deleted to make room for a new device
(`audit.max_devices`): that device's recorded history stops being kept, which a SIEM
must see as audit records lost, hence Audit Recording Stopped rather than Security
Configuration (no setting changed). It names the set and its device, never a line of it.

A query's identifier is stored as its first MAX_QUERY_BYTES (ParticipantObjectQuery,
base64) with the SHA-256 and length of the whole (details `QuerySHA256`, `QueryLength`),
its other details at most MAX_QUERY_DETAIL characters each: a device runs C-FINDs as
often as its stream rate allows, and the smaller its events the longer its own set (see
`files`) keeps them.
"""

from __future__ import annotations

import base64
import datetime as dt
import enum
import hashlib
import ipaddress
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final, NamedTuple

MAX_LINE_BYTES: Final = 64 * 1024
MAX_TEXT: Final = 1024  # characters of any one string field
MAX_PARTICIPANTS: Final = 8
MAX_OBJECTS: Final = 16
MAX_DETAILS: Final = 16
MAX_QUERY_BYTES: Final = 512
"""Of a query's identifier stored (before base64), with the SHA-256 and length of the whole
(ParticipantObjectDetail `QuerySHA256`, `QueryLength`). Enough to see what was searched
(a viewer's identifier is mostly a few hundred bytes; the level, patient and UIDs are
details of their own), and the hash says whether a full identifier found elsewhere (the
device, a capture, the PACS's log) is the one that was sent. Storing 8 KiB made each
C-FIND event 11 KB: ~9,500 of them filled a trail of the default size (then shared by
every device; now each device has a set of its own)."""
MAX_QUERY_DETAIL: Final = 256
"""Characters of each detail of a query event (a UID or patient ID is at most 64; a list
match is in the identifier, which the hash covers), so that the event stays small."""


class Code(NamedTuple):
    """A coded value (code, coding scheme, display text)."""

    code: str
    system: str
    display: str

    def to_json(self) -> dict[str, str]:
        return {"csd-code": self.code, "codeSystemName": self.system, "originalText": self.display}


# EventID (PS3.15 A.5.3)
EV_BEGIN_TRANSFER: Final = Code("110102", "DCM", "Begin Transferring DICOM Instances")
EV_INSTANCES_TRANSFERRED: Final = Code("110104", "DCM", "DICOM Instances Transferred")
EV_QUERY: Final = Code("110112", "DCM", "Query")
EV_SECURITY_ALERT: Final = Code("110113", "DCM", "Security Alert")
EV_USER_AUTHENTICATION: Final = Code("110114", "DCM", "User Authentication")
# EventTypeCode
TYPE_LOGIN: Final = Code("110122", "DCM", "Login")
TYPE_LOGOUT: Final = Code("110123", "DCM", "Logout")
TYPE_NODE_AUTHENTICATION: Final = Code("110126", "DCM", "Node Authentication")
TYPE_AUDIT_RECORDING_STOPPED: Final = Code("110133", "DCM", "Audit Recording Stopped")
TYPE_USER_SECURITY_ATTRIBUTES: Final = Code("110137", "DCM", "User security Attributes Changed")
# RoleIDCode
ROLE_APPLICATION: Final = Code("110150", "DCM", "Application")
ROLE_DESTINATION: Final = Code("110152", "DCM", "Destination Role ID")
ROLE_SOURCE: Final = Code("110153", "DCM", "Source Role ID")
# ParticipantObjectIDTypeCode
ID_PATIENT_NUMBER: Final = Code("2", "RFC-3881", "Patient Number")
ID_STUDY_UID: Final = Code("110180", "DCM", "Study Instance UID")
ID_SOP_CLASS_UID: Final = Code("110181", "DCM", "SOP Class UID")
ID_NODE: Final = Code("110182", "DCM", "Node ID")
# Ours, for objects DICOM has no code for.
ID_CERTIFICATE_SERIAL: Final = Code("certificate-serial", "DMZR", "Certificate Serial Number")
ID_ENROLLMENT_TOKEN: Final = Code("enrollment-token", "DMZR", "Enrollment Token ID")
ID_AUDIT_SET: Final = Code("audit-set", "DMZR", "Audit Set")

# ParticipantObjectTypeCode / ...TypeCodeRole (RFC 3881)
OBJ_PERSON: Final = 1
OBJ_SYSTEM: Final = 2
ROLE_PATIENT: Final = 1
ROLE_REPORT: Final = 3
ROLE_SECURITY_RESOURCE: Final = 13
# NetworkAccessPointTypeCode
NAP_MACHINE_NAME: Final = 1
NAP_IP_ADDRESS: Final = 2
# AuditSourceTypeCode 4: application server process tier in a multi-tier system.
SOURCE_APPLICATION_SERVER: Final = "4"


class Outcome(enum.IntEnum):
    """EventOutcomeIndicator."""

    SUCCESS = 0
    MINOR_FAILURE = 4  # e.g. refused credentials: the action was not performed
    SERIOUS_FAILURE = 8  # the action was terminated prematurely
    MAJOR_FAILURE = 12  # the action was made unavailable


def _text(value: object) -> str:
    text = str(value)
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: who did it (requestor) or took part."""

    user_id: str
    requestor: bool
    role: Code | None = None
    address: str | None = None  # NetworkAccessPointID: an IP address or machine name
    alternative_id: str | None = None
    name: str | None = None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"UserID": _text(self.user_id), "UserIsRequestor": self.requestor}
        if self.alternative_id:
            out["AlternativeUserID"] = _text(self.alternative_id)
        if self.name:
            out["UserName"] = _text(self.name)
        if self.role is not None:
            out["RoleIDCode"] = self.role.to_json()
        if self.address:
            host = host_of(self.address)
            out["NetworkAccessPointTypeCode"] = NAP_IP_ADDRESS if _is_ip(host) else NAP_MACHINE_NAME
            out["NetworkAccessPointID"] = _text(host)
        return out


@dataclass(frozen=True)
class ParticipantObject:
    """A ParticipantObjectIdentification: the study, patient, query or credential."""

    object_id: str
    id_type: Code
    type_code: int = OBJ_SYSTEM
    role: int | None = None
    name: str | None = None
    query: bytes | None = None  # ParticipantObjectQuery, stored base64
    details: Mapping[str, object] = field(default_factory=dict)

    def to_json(self, *, with_bulk: bool = True) -> dict[str, object]:
        out: dict[str, object] = {
            "ParticipantObjectTypeCode": self.type_code,
            "ParticipantObjectIDTypeCode": self.id_type.to_json(),
            "ParticipantObjectID": _text(self.object_id),
        }
        if self.role is not None:
            out["ParticipantObjectTypeCodeRole"] = self.role
        if self.name:
            out["ParticipantObjectName"] = _text(self.name)
        details = dict(self.details)
        if self.query is not None:
            if with_bulk:
                out["ParticipantObjectQuery"] = base64.b64encode(
                    self.query[:MAX_QUERY_BYTES]
                ).decode("ascii")
            # First, so that MAX_DETAILS never drops them.
            details = {
                "QuerySHA256": hashlib.sha256(self.query).hexdigest(),
                "QueryLength": len(self.query),
                **{k: v for k, v in details.items() if k not in ("QuerySHA256", "QueryLength")},
            }
        if with_bulk and details:
            out["ParticipantObjectDetail"] = [
                {"type": _text(k), "value": _text(v)}
                for k, v in list(details.items())[:MAX_DETAILS]
            ]
        return out


@dataclass(frozen=True)
class AuditEvent:
    """One audit message. Build it with the AuditLog helpers, or directly."""

    kind: str
    event_id: Code
    action: str  # EventActionCode: C R U D E
    at: datetime
    outcome: Outcome
    description: str = ""
    type_codes: Sequence[Code] = ()
    participants: Sequence[Participant] = ()
    objects: Sequence[ParticipantObject] = ()
    #: The directory user of the device concerned (a device bound at enrollment).
    user: str | None = None
    #: Refusals this event stands for: more than 1 for a limiter's summary (the IT
    #: login's, the gateway refusal reports'), so that an aggregate counts them all.
    refusals: int = 1
    #: Set on the one record of refusals aggregated by `budget` (count, first, last,
    #: source, sources): written as the event's `aggregate`.
    aggregate: Mapping[str, object] | None = None

    def to_json(
        self, source_id: str, site: str | None = None, *, with_bulk: bool = True
    ) -> dict[str, object]:
        if self.at.tzinfo is None:
            raise ValueError("audit events need a timezone-aware time")
        ident: dict[str, object] = {
            "EventID": self.event_id.to_json(),
            "EventActionCode": self.action,
            "EventDateTime": iso_time(self.at),
            "EventOutcomeIndicator": int(self.outcome),
        }
        if self.description:
            ident["EventOutcomeDescription"] = _text(self.description)
        if self.type_codes:
            ident["EventTypeCode"] = [c.to_json() for c in self.type_codes]
        source: dict[str, object] = {
            "AuditSourceID": _text(source_id),
            "AuditSourceTypeCode": SOURCE_APPLICATION_SERVER,
        }
        if site:
            source["AuditEnterpriseSiteID"] = _text(site)
        out: dict[str, object] = {
            "kind": self.kind,
            **({"user": _text(self.user)} if self.user else {}),
            "EventIdentification": ident,
            "ActiveParticipant": [p.to_json() for p in self.participants[:MAX_PARTICIPANTS]],
            "AuditSourceIdentification": source,
        }
        if self.objects:
            out["ParticipantObjectIdentification"] = [
                o.to_json(with_bulk=with_bulk) for o in self.objects[:MAX_OBJECTS]
            ]
        if self.aggregate is not None:
            out["aggregate"] = {k: _bounded(v) for k, v in self.aggregate.items()}
        return out


def _bounded(value: object) -> object:
    """A number as it is; text (or a list of it) cut to MAX_TEXT characters."""
    if isinstance(value, int | float):
        return value
    if isinstance(value, list):
        return [_text(v) for v in value[:MAX_DETAILS]]
    return _text(value)


def iso_time(when: datetime) -> str:
    return when.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def host_of(address: str) -> str:
    """'1.2.3.4:5' -> '1.2.3.4'; '[::1]:5' -> '::1'; anything else unchanged."""
    if address.startswith("["):
        return address[1:].split("]", 1)[0]
    if address.count(":") == 1:
        return address.split(":", 1)[0]
    return address


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _dumps(data: dict[str, object]) -> str:
    # ASCII only: every non-ASCII character is a \uXXXX escape. Outsiders' text (an IT
    # login's user name, a device name) reaches events, and raw U+2028, U+2029 or U+0085
    # would be line breaks to readers that split with str.splitlines(): one event hidden,
    # others forged. Escaped, an event is one line by any definition of a line.
    return json.dumps(data, separators=(",", ":"), ensure_ascii=True)


def encode_event(event: AuditEvent, source_id: str, site: str | None = None) -> str:
    """One JSON line of ASCII (no newline), at most MAX_LINE_BYTES: bulk fields go first
    if needed."""
    line = _dumps(event.to_json(source_id, site))
    if len(line) <= MAX_LINE_BYTES:
        return line
    data = event.to_json(source_id, site, with_bulk=False)
    data["truncated"] = True
    line = _dumps(data)
    if len(line) <= MAX_LINE_BYTES:
        return line
    data.pop("ParticipantObjectIdentification", None)
    return _dumps(data)
