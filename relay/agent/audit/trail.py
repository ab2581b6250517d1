"""The agent's audit trail on disk: JSON lines in rotated sets, safe for several writers.

The security and administrative events (enrollment, renewal, codes, revocation, refused
links, IT logins, a device set pruned) go to `audit.jsonl`; each device's DICOM events
(query, transfers) to a set of its own under `audit-devices/` (see `files`), so that no
device's traffic rotates another's records or the security events away. Several
processes append (the agent and the `relay token` / `relay device` commands): each event
is one write() under an flock, which also serializes rotation, so lines never interleave
and none is lost at a rotation. Files are mode 0600 and stay inside the hospital: patient
identifiers may appear in them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

from relay.agent.audit.budget import (
    MAX_RECALL_LINES,
    RECALL_WINDOW,
    RefusalBudget,
    budgeted,
    written_refusal,
)
from relay.agent.audit.events import (
    EV_BEGIN_TRANSFER,
    EV_INSTANCES_TRANSFERRED,
    EV_QUERY,
    EV_SECURITY_ALERT,
    EV_USER_AUTHENTICATION,
    ID_AUDIT_SET,
    ID_CERTIFICATE_SERIAL,
    ID_ENROLLMENT_TOKEN,
    ID_NODE,
    ID_PATIENT_NUMBER,
    ID_SOP_CLASS_UID,
    ID_STUDY_UID,
    MAX_LINE_BYTES,
    MAX_QUERY_DETAIL,
    OBJ_PERSON,
    ROLE_APPLICATION,
    ROLE_DESTINATION,
    ROLE_PATIENT,
    ROLE_REPORT,
    ROLE_SECURITY_RESOURCE,
    ROLE_SOURCE,
    TYPE_AUDIT_RECORDING_STOPPED,
    TYPE_LOGIN,
    TYPE_LOGOUT,
    TYPE_NODE_AUTHENTICATION,
    TYPE_USER_SECURITY_ATTRIBUTES,
    AuditEvent,
    Code,
    Outcome,
    Participant,
    ParticipantObject,
    encode_event,
    iso_time,
)
from relay.agent.audit.files import (
    DEFAULT_MAX_DEVICES,
    DeviceSets,
    PrunedSet,
    RotatedFile,
    device_dir,
    event_time,
    flocked,
    merged_events,
    trail_sets,
)

log = logging.getLogger(__name__)


def _short(value: object) -> object:
    """A query detail cut to MAX_QUERY_DETAIL characters (numbers kept as they are)."""
    if isinstance(value, int | float):
        return value
    text = str(value)
    return text if len(text) <= MAX_QUERY_DETAIL else text[: MAX_QUERY_DETAIL - 1] + "…"


AUDIT_FILE: Final = "audit.jsonl"
DEFAULT_MAX_BYTES: Final = 10 * 1024 * 1024
DEFAULT_KEEP: Final = 10

# kind -> (EventID, EventActionCode, EventTypeCodes): the one table every event follows.
_KINDS: Final[dict[str, tuple[Code, str, tuple[Code, ...]]]] = {
    "enrollment": (EV_USER_AUTHENTICATION, "E", (TYPE_LOGIN,)),
    "renewal": (EV_SECURITY_ALERT, "E", (TYPE_USER_SECURITY_ATTRIBUTES,)),
    "token_created": (EV_SECURITY_ALERT, "E", (TYPE_USER_SECURITY_ATTRIBUTES,)),
    "revocation": (EV_SECURITY_ALERT, "E", (TYPE_USER_SECURITY_ATTRIBUTES,)),
    "auth_refused": (EV_SECURITY_ALERT, "E", (TYPE_NODE_AUTHENTICATION,)),
    "it_login": (EV_USER_AUTHENTICATION, "E", (TYPE_LOGIN,)),
    "it_logout": (EV_USER_AUTHENTICATION, "E", (TYPE_LOGOUT,)),
    "audit_pruned": (EV_SECURITY_ALERT, "E", (TYPE_AUDIT_RECORDING_STOPPED,)),
    "query": (EV_QUERY, "E", ()),
    "transfer_begin": (EV_BEGIN_TRANSFER, "E", ()),
    # Action R: the agent is not the receiver of the instances.
    "transfer_end": (EV_INSTANCES_TRANSFERRED, "R", ()),
}
EVENT_KINDS: Final = tuple(_KINDS)
"""Every kind of event the trail writes, in the table's order (the IT pages' filter)."""
DEVICE_KINDS: Final = frozenset({"query", "transfer_begin", "transfer_end"})
"""Caused by one device's DICOM traffic: written to that device's own set. Every other
kind is a security/administrative event, in the security set no device traffic rotates."""


class AuditSink(Protocol):
    """Somewhere else each event goes (the syslog sender). Must not block."""

    def emit(self, event: AuditEvent, line: str) -> None: ...


class AuditLog:
    """Appends events to rotated sets of JSON lines: the security set `path` and one set
    per device for its DICOM events (DEVICE_KINDS) in `device_dir(path)`, each rotating
    at `max_bytes` and keeping `keep` older files (path.1 newest ... path.KEEP oldest),
    at most `max_devices` device sets (the one idle longest is pruned for a new device,
    and that is audited: `set_pruned`).

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
        max_devices: int = DEFAULT_MAX_DEVICES,
        sink: AuditSink | None = None,
        user_of: Callable[[str], str | None] | None = None,
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
        #: device SPIFFE ID -> its directory user (the registry's), for every event.
        self.user_of = user_of
        self.written = 0
        self.failures = 0
        self._security = RotatedFile(self.path, max_bytes, keep)
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self.devices = DeviceSets(
            device_dir(self.path), max_bytes=max_bytes, keep=keep, max_sets=max_devices
        )
        #: Refusals bound for the security set beyond their source's budget are counted
        #: into aggregates (see `budget`), so that no sender can rotate it away.
        self.budget = RefusalBudget()
        self._recalled = False  # the budget has been charged with the file's refusals
        self._recall_lock = threading.Lock()
        self._timers: set[datetime] = set()  # due times a timer is set for (a few)

    # -- writing

    def log(self, event: AuditEvent) -> bool:
        """Append one event to its set (a refusal over its source's budget: counted into
        an aggregate, written later); True if it reached the file or an aggregate."""
        self.flush_aggregates(event.at)
        if device_of(event) is None and budgeted(event):
            self.recall_budget(event.at)
            due = self.budget.admit(event)
            if due is not None:
                self._flush_at(due, event.at)
                return True
        return self._write(event)

    def recall_budget(self, now: datetime) -> None:
        """Once per process, before its first refusal: charge the budget with those the
        security set got in full in the last RECALL_WINDOW, so that a restart does not
        give every sender a new burst (budget's docstring). A file that cannot be read
        leaves the budget as it is (logged): the trail must not fail for it.

        Reads up to MAX_RECALL_LINES (~0.2 s): the agent calls it in a worker thread at
        start (`authority.open_authority`), so that no refusal reads it on the event
        loop; a CLI process leaves it to its first refusal (`log`). A refusal logged
        while it reads waits on the lock for it, then is admitted against the charged
        budget; a second call does nothing."""
        with self._recall_lock:
            if self._recalled:
                return
            self._recalled = True
            since = now - RECALL_WINDOW
            oldest = now  # the time of the oldest line read in the window
            written: list[tuple[str, str, datetime]] = []
            try:
                sets = trail_sets(self.path, devices=False)
                for n, line in enumerate(merged_events(sets, newest_first=True)):
                    if n >= MAX_RECALL_LINES:  # every line read counts, skipped ones too
                        since = oldest  # read no further: the window starts here
                        break
                    at = event_time(line)
                    if line is None or at is None or at > now:
                        continue  # torn, or from a clock ahead of ours: charged by neither
                    if at < since:
                        break
                    oldest = at
                    refusal = written_refusal(line)
                    if refusal is not None and line.get("kind") not in DEVICE_KINDS:
                        written.append((*refusal, at))
            except OSError as exc:
                log.warning(
                    "audit: cannot read the security set back for the refusal budget",
                    extra={"file": str(self.path), "error": str(exc)},
                )
                return
            written.reverse()
            self.budget.recall(written, since)

    def flush_aggregates(self, now: datetime) -> None:
        """Write the aggregates due at `now` (each later event calls this, and a timer
        set when an aggregate opens)."""
        for record in self.budget.due(now):
            self._write(record)

    def close(self) -> None:
        """Write every aggregate not yet due (at shutdown): counted refusals are never
        lost with the process."""
        for record in self.budget.drain():
            self._write(record)

    def _flush_at(self, due: datetime, now: datetime) -> None:
        """Have `flush_aggregates(due)` called when `due` comes, if an event loop runs
        here (the agent); without one (a CLI), the next event or close() writes it."""
        if due in self._timers:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._timers.add(due)
        loop.call_later(max(0.0, (due - now).total_seconds()), self._on_timer, due)

    def _on_timer(self, due: datetime) -> None:
        self._timers.discard(due)
        self.flush_aggregates(due)

    def _write(self, event: AuditEvent) -> bool:
        line = encode_event(event, self.source_id, self.site)
        pruned: list[PrunedSet] = []
        ok = self._append(device_of(event), (line + "\n").encode("utf-8"), pruned)
        if self.sink is not None:
            try:
                self.sink.emit(event, line)
            except Exception:  # a sink must never break auditing to the file
                log.exception("audit sink failed")
        for gone in pruned:  # the device sets' flock is released by now
            self.set_pruned(now=event.at, pruned=gone)
        return ok

    def _append(self, device: str | None, data: bytes, pruned: list[PrunedSet]) -> bool:
        """To `device`'s set (device sets pruned for it: into `pruned`), or the security
        set if None."""
        try:
            if device is None:
                with flocked(self._lock_path):
                    self._security.append(data)
            else:
                self.devices.append(device, data, pruned)
        except OSError as exc:
            return self._failed(exc)
        self.written += 1
        return True

    def _failed(self, exc: OSError) -> bool:
        self.failures += 1
        log.error("cannot write the audit trail", extra={"file": str(self.path), "error": str(exc)})
        return False

    def _record(
        self,
        kind: str,
        now: datetime,
        outcome: Outcome,
        *,
        participants: Sequence[Participant],
        objects: Sequence[ParticipantObject] = (),
        description: str = "",
        user: str | None = None,
        refusals: int = 1,
    ) -> AuditEvent:
        """Build the event of `kind` from the table, append it, and return it.

        `user` (else the one `user_of` finds for a device in the event) is the device's
        directory user: the event's `user`, and the UserName of the device participant.
        """
        event_id, action, type_codes = _KINDS[kind]
        if user is None:
            user = self._user_in(participants, objects)
        if user is not None:
            participants = [
                replace(p, name=user) if _is_device(p.user_id) and p.name is None else p
                for p in participants
            ]
        event = AuditEvent(
            kind=kind,
            event_id=event_id,
            action=action,
            at=now,
            outcome=outcome,
            description=description,
            type_codes=type_codes,
            participants=tuple(participants),
            objects=tuple(objects),
            user=user,
            refusals=refusals,
        )
        self.log(event)
        return event

    def _user_in(
        self, participants: Sequence[Participant], objects: Sequence[ParticipantObject]
    ) -> str | None:
        if self.user_of is None:
            return None
        ids = [p.user_id for p in participants] + [
            o.object_id for o in objects if o.id_type == ID_NODE
        ]
        for uri in ids:
            if _is_device(uri):
                try:
                    return self.user_of(uri)
                except Exception:  # the audit trail must not fail for a lookup
                    log.exception("cannot look up the user of a device")
                    return None
        return None

    # -- the agent's events

    def _agent(self, role: Code | None = None) -> Participant:
        return Participant(self.source_id, requestor=False, role=role or ROLE_APPLICATION)

    def set_pruned(self, *, now: datetime, pruned: PrunedSet) -> AuditEvent:
        """A device's set was deleted to make room for a new device (Security Alert /
        Audit Recording Stopped), written to the security set (and the sink): which set,
        whose, how many files, why. A success (the deletion was done), so never a
        refusal the budget counts; and a security event, so it can prune nothing."""
        whose = f" of {pruned.device}" if pruned.device else ""
        details: dict[str, object] = {"Files": pruned.files, "MaxDevices": self.devices.max_sets}
        if pruned.last_write is not None:
            details["LastWrite"] = iso_time(datetime.fromtimestamp(pruned.last_write, UTC))
        return self._record(
            "audit_pruned",
            now,
            Outcome.SUCCESS,
            description=(
                f"audit set {pruned.name}{whose} deleted ({pruned.files} files): "
                f"audit.max_devices ({self.devices.max_sets}) reached, a new device's set "
                "replaced the one idle longest"
            ),
            participants=(Participant(self.source_id, requestor=True, role=ROLE_APPLICATION),),
            objects=(
                ParticipantObject(
                    pruned.name,
                    ID_AUDIT_SET,
                    role=ROLE_SECURITY_RESOURCE,
                    name=pruned.device,
                    details=details,
                ),
            ),
        )

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
        user: str | None = None,
    ) -> AuditEvent:
        """A PC presented an enrollment code (User Authentication / Login); `user` is
        the directory user the code was for."""
        objects = []
        if serial is not None:
            objects.append(_certificate_object(serial, device))
        if token_id:
            objects.append(
                ParticipantObject(token_id, ID_ENROLLMENT_TOKEN, role=ROLE_SECURITY_RESOURCE)
            )
        return self._record(
            "enrollment",
            now,
            outcome,
            description=description,
            participants=(Participant(device, requestor=True, address=peer), self._agent()),
            objects=tuple(objects),
            user=user,
        )

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
            details = {"NotAfter": iso_time(not_after)} if not_after is not None else {}
            objects = (_certificate_object(serial, device, details),)
        return self._record(
            "renewal",
            now,
            outcome,
            description=description,
            participants=(Participant(device, requestor=True), self._agent()),
            objects=objects,
        )

    def token_created(
        self,
        *,
        now: datetime,
        device: str,
        token_id: str,
        expires_at: datetime,
        actor: str,
        user: str | None = None,
    ) -> AuditEvent:
        """IT created an enrollment code for `device` (for directory user `user`)."""
        return self._record(
            "token_created",
            now,
            Outcome.SUCCESS,
            description=f"enrollment code for {device}",
            participants=(Participant(actor, requestor=True), self._agent()),
            objects=(
                ParticipantObject(
                    token_id,
                    ID_ENROLLMENT_TOKEN,
                    role=ROLE_SECURITY_RESOURCE,
                    name=device,
                    details={"ExpiresAt": iso_time(expires_at)},
                ),
            ),
            user=user,
        )

    def revocation(
        self,
        *,
        now: datetime,
        device: str,
        actor: str,
        outcome: Outcome = Outcome.SUCCESS,
        description: str = "",
        user: str | None = None,
    ) -> AuditEvent:
        """A device was revoked (by `actor`: a CLI user, or the agent pushing it)."""
        return self._record(
            "revocation",
            now,
            outcome,
            description=description or f"device {device} revoked",
            participants=(Participant(actor, requestor=True), self._agent()),
            objects=(ParticipantObject(device, ID_NODE, role=ROLE_SECURITY_RESOURCE),),
            user=user,
        )

    def it_login(
        self,
        *,
        now: datetime,
        admin: str,
        peer: str | None,
        outcome: Outcome,
        description: str,
        refusals: int = 1,
    ) -> AuditEvent:
        """An IT admin logged in to the IT pages, or was refused (User Authentication);
        `refusals`: how many refused logins this event stands for (a limiter's count)."""
        return self._record(
            "it_login",
            now,
            outcome,
            description=description,
            participants=(Participant(f"it:{admin}", requestor=True, address=peer), self._agent()),
            refusals=refusals,
        )

    def it_logout(
        self, *, now: datetime, admin: str, peer: str | None, description: str
    ) -> AuditEvent:
        """An IT admin's session ended (logout; expiry is not an event)."""
        return self._record(
            "it_logout",
            now,
            Outcome.SUCCESS,
            description=description,
            participants=(Participant(f"it:{admin}", requestor=True, address=peer), self._agent()),
        )

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
        return self._record(
            "auth_refused",
            now,
            outcome,
            description=reason,
            participants=(
                Participant(identity or "unknown", requestor=True, address=peer),
                Participant(reporter, requestor=False, role=ROLE_APPLICATION),
            ),
            objects=(ParticipantObject(identity or peer or "unknown", ID_NODE),),
        )

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

        `query` is the encoded identifier dataset (its first MAX_QUERY_BYTES stored
        base64, as PS3.15 asks, with the SHA-256 and length of the whole); `details` e.g.
        {"QueryRetrieveLevel": "STUDY", "Matches": 12}, each at most MAX_QUERY_DETAIL
        characters: a device's queries are many, and small events keep more of them in
        its own set.
        """
        return self._record(
            "query",
            now,
            outcome,
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
                    details={k: _short(v) for k, v in (details or {}).items()},
                ),
            ),
        )

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
        return self._record(
            "transfer_begin",
            now,
            Outcome.SUCCESS,
            participants=self._transfer_participants(device, to_device),
            objects=_study_objects(study_uid, patient_id, details),
        )

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
        return self._record(
            "transfer_end",
            now,
            outcome,
            description=description,
            participants=self._transfer_participants(device, to_device),
            objects=_study_objects(study_uid, patient_id, counts),
        )

    def _transfer_participants(self, device: str, to_device: bool) -> tuple[Participant, ...]:
        dev_role, agent_role = (
            (ROLE_DESTINATION, ROLE_SOURCE) if to_device else (ROLE_SOURCE, ROLE_DESTINATION)
        )
        return (
            Participant(device, requestor=True, role=dev_role),
            self._agent(agent_role),
        )


def _is_device(uri: str) -> bool:
    return uri.startswith("spiffe://") and "/device/" in uri


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


def device_of(event: AuditEvent) -> str | None:
    """The device whose set `event` goes to (its requestor), or None: the security set.
    A DICOM event without a device (no peer identity) goes to the set "unknown"."""
    if event.kind not in DEVICE_KINDS:
        return None
    for p in event.participants:
        if p.requestor:
            return p.user_id or "unknown"
    return "unknown"


def read_events(path: Path, *, limit: int = 100_000) -> list[dict[str, Any]]:
    """The events of the trail whose security set is `path` (its rotated files and every
    device set), oldest first across the sets (for tests and tools).

    A line that is not JSON (a torn write after a crash) is skipped. Lines end at "\n"
    only (a file written before events were all ASCII may hold raw U+2028 in text).
    """
    events: list[dict[str, Any]] = []
    for event in merged_events(trail_sets(Path(path)), newest_first=False):
        if event is not None:
            events.append(event)
            if len(events) >= limit:
                break
    return events
