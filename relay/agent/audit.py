"""The agent's audit trail: JSON lines with DICOM PS3.15 (RFC 3881) audit message fields.

Each line is one event, shaped like the DICOM audit message schema (PS3.15 A.5.1) with
JSON instead of XML: EventIdentification (EventID, EventActionCode, EventDateTime,
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
| query          | 110112 Query                              |                                  |
| transfer_begin | 110102 Begin Transferring DICOM Instances |                                  |
| transfer_end   | 110104 DICOM Instances Transferred        |                                  |

Patient identifiers may appear here (transfers name the patient): the file stays inside
the hospital, mode 0600. Several processes append to the same file (the agent and the
`relay token` / `relay device` commands): each event is one write() under an flock, which
also serializes rotation, so lines never interleave and none is lost at a rotation.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import enum
import fcntl
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Protocol

if TYPE_CHECKING:
    from relay.ops.config import Address, Reader

__all__ = [
    "AUDIT_FILE",
    "DEFAULT_KEEP",
    "DEFAULT_MAX_BYTES",
    "MAX_LINE_BYTES",
    "AuditEvent",
    "AuditLog",
    "AuditSettings",
    "AuditSink",
    "Code",
    "Outcome",
    "Participant",
    "ParticipantObject",
    "read_audit_settings",
    "read_events",
]

log = logging.getLogger(__name__)

AUDIT_FILE: Final = "audit.jsonl"
DEFAULT_MAX_BYTES: Final = 10 * 1024 * 1024
DEFAULT_KEEP: Final = 10
MAX_LINE_BYTES: Final = 64 * 1024
MAX_TEXT: Final = 1024  # characters of any one string field
MAX_PARTICIPANTS: Final = 8
MAX_OBJECTS: Final = 16
MAX_DETAILS: Final = 16
MAX_QUERY_BYTES: Final = 8 * 1024  # of a query dataset, before base64


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
TYPE_NODE_AUTHENTICATION: Final = Code("110126", "DCM", "Node Authentication")
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
            host = _host_of(self.address)
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
        if with_bulk and self.query is not None:
            out["ParticipantObjectQuery"] = base64.b64encode(self.query[:MAX_QUERY_BYTES]).decode(
                "ascii"
            )
        if with_bulk and self.details:
            out["ParticipantObjectDetail"] = [
                {"type": _text(k), "value": _text(v)}
                for k, v in list(self.details.items())[:MAX_DETAILS]
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

    def to_json(
        self, source_id: str, site: str | None = None, *, with_bulk: bool = True
    ) -> dict[str, object]:
        if self.at.tzinfo is None:
            raise ValueError("audit events need a timezone-aware time")
        ident: dict[str, object] = {
            "EventID": self.event_id.to_json(),
            "EventActionCode": self.action,
            "EventDateTime": _iso(self.at),
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
            "EventIdentification": ident,
            "ActiveParticipant": [p.to_json() for p in self.participants[:MAX_PARTICIPANTS]],
            "AuditSourceIdentification": source,
        }
        if self.objects:
            out["ParticipantObjectIdentification"] = [
                o.to_json(with_bulk=with_bulk) for o in self.objects[:MAX_OBJECTS]
            ]
        return out


def _iso(when: datetime) -> str:
    return when.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _host_of(address: str) -> str:
    """'1.2.3.4:5' -> '1.2.3.4'; '[::1]:5' -> '::1'; anything else unchanged."""
    if address.startswith("["):
        return address[1:].split("]", 1)[0]
    if address.count(":") == 1:
        return address.split(":", 1)[0]
    return address


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def encode_event(event: AuditEvent, source_id: str, site: str | None = None) -> str:
    """One JSON line (no newline), at most MAX_LINE_BYTES: bulk fields go first if needed."""
    line = json.dumps(event.to_json(source_id, site), separators=(",", ":"), ensure_ascii=False)
    if len(line.encode("utf-8")) <= MAX_LINE_BYTES:
        return line
    data = event.to_json(source_id, site, with_bulk=False)
    data["truncated"] = True
    line = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    if len(line.encode("utf-8")) <= MAX_LINE_BYTES:
        return line
    data.pop("ParticipantObjectIdentification", None)
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


class AuditSink(Protocol):
    """Somewhere else each event goes (the syslog sender). Must not block."""

    def emit(self, event: AuditEvent, line: str) -> None: ...


class AuditLog:
    """Appends events to `path` (JSON lines), rotating at `max_bytes` and keeping `keep`
    older files (path.1 newest ... path.KEEP oldest).

    `source_id` identifies this agent (its SPIFFE ID) as the AuditSource and as the
    agent participant. Writing never raises: a failure is logged and counted in
    `failures`, because the audit trail must not take the service down with it.
    """

    def __init__(
        self,
        path: Path,
        *,
        source_id: str,
        site: str | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        keep: int = DEFAULT_KEEP,
        sink: AuditSink | None = None,
    ) -> None:
        if max_bytes < MAX_LINE_BYTES:
            raise ValueError(f"max_bytes must be at least {MAX_LINE_BYTES} (one event)")
        if not 1 <= keep <= 1000:
            raise ValueError("keep must be 1..1000")
        self.path = Path(path)
        self.source_id = source_id
        self.site = site
        self.max_bytes = max_bytes
        self.keep = keep
        self.sink = sink
        self.written = 0
        self.failures = 0
        self._lock_path = self.path.with_name(self.path.name + ".lock")

    # -- writing

    def log(self, event: AuditEvent) -> bool:
        """Append one event; True if it reached the file."""
        line = encode_event(event, self.source_id, self.site)
        ok = self._append((line + "\n").encode("utf-8"))
        if self.sink is not None:
            try:
                self.sink.emit(event, line)
            except Exception:  # a sink must never break auditing to the file
                log.exception("audit sink failed")
        return ok

    def _append(self, data: bytes) -> bool:
        try:
            lock_fd = os.open(self._lock_path, os.O_WRONLY | os.O_CREAT, 0o600)
        except OSError as exc:
            return self._failed(exc)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            try:
                size = os.stat(self.path).st_size
            except FileNotFoundError:
                size = 0
            if size > 0 and size + len(data) > self.max_bytes:
                self._rotate()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
        except OSError as exc:
            return self._failed(exc)
        finally:
            os.close(lock_fd)  # releases the flock
        self.written += 1
        return True

    def _rotate(self) -> None:
        """path -> path.1 -> ... -> path.KEEP (the oldest is dropped). Called under flock."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._numbered(self.keep))
        for n in range(self.keep - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(self._numbered(n), self._numbered(n + 1))
        os.replace(self.path, self._numbered(1))

    def _numbered(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{n}")

    def _failed(self, exc: OSError) -> bool:
        self.failures += 1
        log.error("cannot write the audit trail", extra={"file": str(self.path), "error": str(exc)})
        return False

    # -- the agent's events

    def _agent(self, role: Code | None = None) -> Participant:
        return Participant(self.source_id, requestor=False, role=role or ROLE_APPLICATION)

    def enrollment(
        self,
        *,
        now: datetime,
        device: str,
        token_id: str | None,
        peer: str | None,
        outcome: Outcome,
        description: str = "",
        serial: str | None = None,
    ) -> AuditEvent:
        """A PC presented an enrollment code (User Authentication / Login)."""
        objects = []
        if serial is not None:
            objects.append(_certificate_object(serial, device))
        if token_id:
            objects.append(
                ParticipantObject(token_id, ID_ENROLLMENT_TOKEN, role=ROLE_SECURITY_RESOURCE)
            )
        event = AuditEvent(
            kind="enrollment",
            event_id=EV_USER_AUTHENTICATION,
            action="E",
            at=now,
            outcome=outcome,
            description=description,
            type_codes=(TYPE_LOGIN,),
            participants=(Participant(device, requestor=True, address=peer), self._agent()),
            objects=tuple(objects),
        )
        self.log(event)
        return event

    def renewal(
        self,
        *,
        now: datetime,
        device: str,
        outcome: Outcome,
        description: str = "",
        serial: str | None = None,
        not_after: datetime | None = None,
    ) -> AuditEvent:
        """A device renewed its certificate over its link (or was refused)."""
        objects: tuple[ParticipantObject, ...] = ()
        if serial is not None:
            details = {"NotAfter": _iso(not_after)} if not_after is not None else {}
            objects = (_certificate_object(serial, device, details),)
        event = AuditEvent(
            kind="renewal",
            event_id=EV_SECURITY_ALERT,
            action="E",
            at=now,
            outcome=outcome,
            description=description,
            type_codes=(TYPE_USER_SECURITY_ATTRIBUTES,),
            participants=(Participant(device, requestor=True), self._agent()),
            objects=objects,
        )
        self.log(event)
        return event

    def token_created(
        self, *, now: datetime, device: str, token_id: str, expires_at: datetime, actor: str
    ) -> AuditEvent:
        """IT created an enrollment code for `device`."""
        event = AuditEvent(
            kind="token_created",
            event_id=EV_SECURITY_ALERT,
            action="E",
            at=now,
            outcome=Outcome.SUCCESS,
            description=f"enrollment code for {device}",
            type_codes=(TYPE_USER_SECURITY_ATTRIBUTES,),
            participants=(Participant(actor, requestor=True), self._agent()),
            objects=(
                ParticipantObject(
                    token_id,
                    ID_ENROLLMENT_TOKEN,
                    role=ROLE_SECURITY_RESOURCE,
                    name=device,
                    details={"ExpiresAt": _iso(expires_at)},
                ),
            ),
        )
        self.log(event)
        return event

    def revocation(
        self,
        *,
        now: datetime,
        device: str,
        actor: str,
        outcome: Outcome = Outcome.SUCCESS,
        description: str = "",
    ) -> AuditEvent:
        """A device was revoked (by `actor`: a CLI user, or the agent pushing it)."""
        event = AuditEvent(
            kind="revocation",
            event_id=EV_SECURITY_ALERT,
            action="E",
            at=now,
            outcome=outcome,
            description=description or f"device {device} revoked",
            type_codes=(TYPE_USER_SECURITY_ATTRIBUTES,),
            participants=(Participant(actor, requestor=True), self._agent()),
            objects=(ParticipantObject(device, ID_NODE, role=ROLE_SECURITY_RESOURCE),),
        )
        self.log(event)
        return event

    def auth_refused(
        self,
        *,
        now: datetime,
        identity: str | None,
        peer: str | None,
        reason: str,
        reporter: str,
        outcome: Outcome = Outcome.MINOR_FAILURE,
    ) -> AuditEvent:
        """A gateway refused a link (Security Alert / Node Authentication). The gateway
        reports only reason, identity and address: no payload ever reaches here."""
        event = AuditEvent(
            kind="auth_refused",
            event_id=EV_SECURITY_ALERT,
            action="E",
            at=now,
            outcome=outcome,
            description=reason,
            type_codes=(TYPE_NODE_AUTHENTICATION,),
            participants=(
                Participant(identity or "unknown", requestor=True, address=peer),
                Participant(reporter, requestor=False, role=ROLE_APPLICATION),
            ),
            objects=(ParticipantObject(identity or peer or "unknown", ID_NODE),),
        )
        self.log(event)
        return event

    def query(
        self,
        *,
        now: datetime,
        device: str,
        sop_class_uid: str,
        outcome: Outcome,
        query: bytes | None = None,
        details: Mapping[str, object] | None = None,
        description: str = "",
    ) -> AuditEvent:
        """A C-FIND by `device` (the agent performs it at the PACS).

        `query` is the encoded identifier dataset (stored base64, as PS3.15 asks);
        `details` e.g. {"QueryRetrieveLevel": "STUDY", "Matches": 12}.
        """
        event = AuditEvent(
            kind="query",
            event_id=EV_QUERY,
            action="E",
            at=now,
            outcome=outcome,
            description=description,
            participants=(
                Participant(device, requestor=True, role=ROLE_SOURCE),
                self._agent(ROLE_DESTINATION),
            ),
            objects=(
                ParticipantObject(
                    sop_class_uid,
                    ID_SOP_CLASS_UID,
                    role=ROLE_REPORT,
                    query=query,
                    details=dict(details or {}),
                ),
            ),
        )
        self.log(event)
        return event

    def transfer_begin(
        self,
        *,
        now: datetime,
        device: str,
        study_uid: str,
        to_device: bool = True,
        patient_id: str | None = None,
        details: Mapping[str, object] | None = None,
    ) -> AuditEvent:
        """Instances of one study start moving between the PACS and `device`."""
        event = AuditEvent(
            kind="transfer_begin",
            event_id=EV_BEGIN_TRANSFER,
            action="E",
            at=now,
            outcome=Outcome.SUCCESS,
            participants=self._transfer_participants(device, to_device),
            objects=_study_objects(study_uid, patient_id, details),
        )
        self.log(event)
        return event

    def transfer_end(
        self,
        *,
        now: datetime,
        device: str,
        study_uid: str,
        outcome: Outcome,
        completed: int,
        failed: int = 0,
        warning: int = 0,
        to_device: bool = True,
        patient_id: str | None = None,
        description: str = "",
    ) -> AuditEvent:
        """The end of a transfer, with counts. Action R: the agent is not the receiver."""
        counts = {"Completed": completed, "Failed": failed, "Warning": warning}
        event = AuditEvent(
            kind="transfer_end",
            event_id=EV_INSTANCES_TRANSFERRED,
            action="R",
            at=now,
            outcome=outcome,
            description=description,
            participants=self._transfer_participants(device, to_device),
            objects=_study_objects(study_uid, patient_id, counts),
        )
        self.log(event)
        return event

    def _transfer_participants(self, device: str, to_device: bool) -> tuple[Participant, ...]:
        dev_role, agent_role = (
            (ROLE_DESTINATION, ROLE_SOURCE) if to_device else (ROLE_SOURCE, ROLE_DESTINATION)
        )
        return (
            Participant(device, requestor=True, role=dev_role),
            self._agent(agent_role),
        )


def _certificate_object(
    serial: str, device: str, details: Mapping[str, object] | None = None
) -> ParticipantObject:
    return ParticipantObject(
        serial,
        ID_CERTIFICATE_SERIAL,
        role=ROLE_SECURITY_RESOURCE,
        name=device,
        details=dict(details or {}),
    )


def _study_objects(
    study_uid: str, patient_id: str | None, details: Mapping[str, object] | None
) -> tuple[ParticipantObject, ...]:
    study = ParticipantObject(
        study_uid, ID_STUDY_UID, role=ROLE_REPORT, details=dict(details or {})
    )
    if patient_id is None:
        return (study,)
    patient = ParticipantObject(
        patient_id, ID_PATIENT_NUMBER, type_code=OBJ_PERSON, role=ROLE_PATIENT
    )
    return (study, patient)


def read_events(path: Path, *, limit: int = 100_000) -> list[dict[str, Any]]:
    """The events of `path` and its rotated files, oldest first (for tests and tools).

    A line that is not JSON (a torn write after a crash) is skipped.
    """
    path = Path(path)
    numbered = sorted(
        (p for p in path.parent.glob(f"{path.name}.*") if p.suffix[1:].isdigit()),
        key=lambda p: int(p.suffix[1:]),
        reverse=True,
    )
    events: list[dict[str, Any]] = []
    for file in [*numbered, path]:
        try:
            text = file.read_text("utf-8")
        except FileNotFoundError:
            continue
        for line in text.splitlines():
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                events.append(value)
                if len(events) >= limit:
                    return events
    return events


# --- configuration ---------------------------------------------------------------------


@dataclass(frozen=True)
class SyslogSettings:
    """Where a copy of each event goes as RFC 5424 syslog over TLS (RFC 5425)."""

    address: Address
    ca: Path
    cert: Path | None = None
    key: Path | None = None
    queue: int = 1000


@dataclass(frozen=True)
class AuditSettings:
    """The agent's `audit:` config section (all optional)."""

    max_bytes: int = DEFAULT_MAX_BYTES
    keep: int = DEFAULT_KEEP
    syslog: SyslogSettings | None = None


def read_audit_settings(r: Reader) -> AuditSettings:
    """Read the `audit:` section of an agent config (for relay.agent.config to call).

    ```yaml
    audit:
      max_size: 10MiB        # rotate audit.jsonl at this size
      keep: 10               # rotated files kept
      syslog:                # optional: also send RFC 5424 over TLS
        address: siem.hospital.local:6514
        ca: siem-ca.crt
        cert: agent-syslog.crt   # optional client certificate
        key: agent-syslog.key
        queue: 1000              # events buffered while the collector is away
    ```
    """
    s = r.optional_section("audit")
    if s is None:
        return AuditSettings()

    def max_size(value: object) -> int:
        from relay.ops.config import parse_size

        size = parse_size(value)
        if not MAX_LINE_BYTES <= size <= 1 << 40:
            raise ValueError(f"expected a size of at least {MAX_LINE_BYTES} bytes, got {size}")
        return size

    settings_max = s.get("max_size", max_size, DEFAULT_MAX_BYTES)
    keep = s.integer("keep", DEFAULT_KEEP, lo=1, hi=1000)
    syslog = None
    sys_section = s.optional_section("syslog")
    if sys_section is not None:
        cert = sys_section.existing_file("cert") if sys_section.has("cert") else None
        key = sys_section.existing_file("key") if sys_section.has("key") else None
        if (cert is None) != (key is None):
            raise sys_section.error("cert" if cert is None else "key", "cert and key go together")
        syslog = SyslogSettings(
            address=sys_section.address("address"),
            ca=sys_section.existing_file("ca"),
            cert=cert,
            key=key,
            queue=sys_section.integer("queue", 1000, lo=1, hi=1_000_000),
        )
    return AuditSettings(max_bytes=settings_max, keep=keep, syslog=syslog)
