"""The study survey: C-FIND down to image level, run beside a retrieve, not before it.

A survey tells the agent how many instances a retrieve will bring (the viewer's fallback
count when a PACS gives none) and which SOP classes and transfer syntaxes they have. A
C-GET needs the latter up front: its instances come back as C-STORE sub-operations on the
same association, which can only carry what its presentation contexts cover, and 128
contexts cannot cover every SOP class in every syntax.

Surveying first cost the first image a whole study's C-FIND (0.4 s for 200 instances
against a pynetdicom PACS). So the retrieve starts at once with contexts from
`StorageMemory` (what this PACS's recent studies held, then the common classes) while the
survey runs on its own association. Only when the retrieve then reports failed
sub-operations and the survey shows something those contexts did not cover does the
agent retrieve again with the study's own (`uncovered`), passing over what already came.
A retrieve that needs no estimate (headers only, one instance) is surveyed only then, and
so is one from a PACS whose retrieves have been giving their counts (`StorageMemory`
remembers): the estimate is only the viewer's fallback, and the C-FIND costs both ends
CPU. Should such a retrieve come without a count after all, its survey starts then.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from pydicom.dataset import Dataset
from pynetdicom.association import Association

from relay.dicom.codec import MAX_COUNT
from relay.dicom.contexts import next_message_id
from relay.dicom.uids import is_conformant_uid

__all__ = ["MAX_QUERIES", "QueryGate", "StorageMemory", "Survey", "uncovered", "walk"]

MAX_QUERIES: Final = 2000  # C-FINDs one survey may send (a patient with many studies)
_PENDING: Final = (0xFF00, 0xFF01)
_LEVELS: Final = ("PATIENT", "STUDY", "SERIES", "IMAGE")
_KINDS: Final = frozenset({"get", "move"})


@dataclass
class Survey:
    """What a retrieve will bring, as the PACS's C-FIND told it."""

    count: int = 0
    sop_classes: list[str] = field(default_factory=list)
    transfer_syntaxes: list[str] = field(default_factory=list)
    # (SOP class, transfer syntax) of instances whose syntax the PACS named
    pairs: set[tuple[str, str]] = field(default_factory=set)


class QueryGate:
    """The C-FIND a walk has in flight, for another thread to C-CANCEL (`stop`); once
    stopped, the walk sends no more. Only the walk's own thread ends its association:
    pynetdicom's state machine fails a C-FIND sent after another thread's A-ABORT (Evt9
    in Sta13), and a C-CANCEL sent under this lock always precedes the walk's end."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stopped = False
        self._in_flight: int | None = None  # message ID

    def begin(self, msg_id: int) -> bool:
        """The walk is about to send C-FIND `msg_id`; False: stopped, send none."""
        with self._lock:
            if self._stopped:
                return False
            self._in_flight = msg_id
            return True

    def end(self) -> None:
        with self._lock:
            self._in_flight = None

    def stop(self, assoc: Association | None, model: str) -> None:
        """No more C-FINDs; the one in flight on `assoc` (if any) is cancelled."""
        with self._lock:
            self._stopped = True
            if assoc is None or self._in_flight is None:
                return
            with contextlib.suppress(Exception):  # the association is ending anyway
                assoc.send_c_cancel(self._in_flight, query_model=model)


def uncovered(survey: Survey, accepted: Iterable[tuple[str, str]]) -> bool:
    """Whether the survey found instances no accepted (class, syntax) context can carry.

    A PACS that does not name the syntaxes it holds is judged by SOP class alone."""
    accepted = set(accepted)
    classes = {sop for sop, _ in accepted}
    if any(sop not in classes for sop in survey.sop_classes):
        return True
    return any(pair not in accepted for pair in survey.pairs)


class StorageMemory:
    """What one PACS's recent studies held (SOP classes and syntaxes, most recent first),
    and whether its retrieves report their counts.

    Bounded (a PACS that holds everything cannot grow it) and thread-safe: operations
    finish on their own threads. The agent keeps one per PACS; its contents are UIDs of
    SOP classes and transfer syntaxes, which identify no patient."""

    def __init__(self, max_classes: int = 32, max_syntaxes: int = 12) -> None:
        self.max_classes = max_classes
        self.max_syntaxes = max_syntaxes
        self._classes: OrderedDict[str, None] = OrderedDict()
        self._syntaxes: OrderedDict[str, None] = OrderedDict()
        self._counting: set[str] = set()  # retrieve kinds ("get", "move")
        self._lock = threading.Lock()

    def remember(self, survey: Survey) -> None:
        self.remember_seen(survey.sop_classes, survey.transfer_syntaxes)

    def remember_seen(self, classes: Iterable[str], syntaxes: Iterable[str]) -> None:
        """Classes and syntaxes a survey found, or a retrieve brought (first: most used).

        Only UIDs are taken (what `restore` accepts): every C-GET's presentation contexts
        are built from them, and pynetdicom refuses a context with anything else."""
        classes = [uid for uid in classes if is_conformant_uid(uid)]
        syntaxes = [uid for uid in syntaxes if is_conformant_uid(uid)]
        with self._lock:
            _touch(self._classes, classes, self.max_classes)
            _touch(self._syntaxes, syntaxes, self.max_syntaxes)

    def note_counts(self, kind: str, *, given: bool) -> None:
        """Whether the last `kind` retrieve's first pending response counted its
        sub-operations (then the next ones need no survey for the viewer's count)."""
        with self._lock:
            if given:
                self._counting.add(kind)
            else:
                self._counting.discard(kind)

    def counts_given(self, kind: str) -> bool:
        with self._lock:
            return kind in self._counting

    def classes(self) -> list[str]:
        with self._lock:
            return list(reversed(self._classes))

    def syntaxes(self) -> list[str]:
        with self._lock:
            return list(reversed(self._syntaxes))

    def snapshot(self) -> dict[str, list[str]]:
        """What an agent keeps across restarts (relay.agent.pacs_memory): the UIDs, least
        recent first, and the retrieve kinds that count. No patient data."""
        with self._lock:
            return {
                "classes": list(self._classes),
                "syntaxes": list(self._syntaxes),
                "counting": sorted(self._counting),
            }

    def restore(self, saved: Mapping[str, object]) -> None:
        """Take back a `snapshot()` (the most recent within the bounds); raises ValueError,
        changing nothing, for anything else."""
        classes = _uid_list(saved.get("classes"), "classes")[-self.max_classes :]
        syntaxes = _uid_list(saved.get("syntaxes"), "syntaxes")[-self.max_syntaxes :]
        counting = saved.get("counting")
        if not isinstance(counting, list) or not all(k in _KINDS for k in counting):
            raise ValueError("counting: expected a list of 'get' and 'move'")
        with self._lock:
            self._classes = OrderedDict.fromkeys(classes)
            self._syntaxes = OrderedDict.fromkeys(syntaxes)
            self._counting = set(counting)


def _uid_list(value: object, what: str) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_COUNT:
        raise ValueError(f"{what}: expected a list of UIDs")
    if not all(is_conformant_uid(uid) for uid in value):
        raise ValueError(f"{what}: an entry is not a UID")
    return value


def _values(value: Any) -> list[str]:
    """The values of an element: pydicom gives several (VM 1-n) as a list, whose str()
    is no value at all; a string it did not split may still hold backslashes."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [str(u) for part in items for u in str(part).split("\\") if str(u).strip()]


def _uids(value: Any) -> list[str]:
    """The UIDs among an element's values; anything else a PACS put there is left out."""
    return [u for u in (v.strip(" \0") for v in _values(value)) if is_conformant_uid(u)]


def _touch(seen: OrderedDict[str, None], items: Iterable[str], limit: int) -> None:
    for item in reversed(list(items)):  # the survey's first ends up most recent
        seen[item] = None
        seen.move_to_end(item)
    while len(seen) > limit:
        seen.popitem(last=False)


def walk(
    assoc: Association,
    model: str,
    identifier: Dataset,
    *,
    timeout: float,
    stopped: threading.Event,
    gate: QueryGate | None = None,
) -> Survey | None:
    """Walk the retrieve's identifier down to image level with C-FIND; None if not possible.

    `stopped` is looked at before each query and each answer (the retrieve ended, or the
    viewer cancelled); `gate` is told of each C-FIND, for another thread to cancel it."""
    gate = gate if gate is not None else QueryGate()
    level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
    if level not in _LEVELS:
        return None
    deadline = time.monotonic() + timeout
    budget = [MAX_QUERIES]
    patient_id = str(identifier.get("PatientID", "") or "")

    def query(lvl: str, keys: dict[str, str]) -> list[Dataset] | None:
        if stopped.is_set() or time.monotonic() > deadline or budget[0] <= 0:
            return None
        budget[0] -= 1
        q = Dataset()
        q.QueryRetrieveLevel = lvl
        for kw, value in keys.items():
            setattr(q, kw, value)
        msg_id = next_message_id()
        if not gate.begin(msg_id):
            return None
        try:
            return answers(assoc.send_c_find(q, model, msg_id=msg_id))
        finally:
            gate.end()

    def answers(responses: Iterable[tuple[Dataset, Dataset | None]]) -> list[Dataset] | None:
        out: list[Dataset] = []
        for status, match in responses:
            if not status or stopped.is_set():
                return None
            code = int(status.Status)
            if code in _PENDING:
                if match is not None:
                    out.append(match)
                    if len(out) > MAX_COUNT:
                        return None
                continue
            return out if code == 0 else None
        return None

    def with_patient(keys: dict[str, str]) -> dict[str, str]:
        return {"PatientID": patient_id, **keys} if patient_id else keys

    studies: list[str]
    if level == "PATIENT":
        if not patient_id:
            return None
        found = query("STUDY", {"PatientID": patient_id, "StudyInstanceUID": ""})
        if found is None:
            return None
        studies = [uid for m in found for uid in _values(m.get("StudyInstanceUID"))]
    else:
        studies = _values(identifier.get("StudyInstanceUID"))
    series: list[tuple[str, str]] = []
    if level in ("PATIENT", "STUDY"):
        for study in studies:
            found = query("SERIES", with_patient({"StudyInstanceUID": study,
                                                  "SeriesInstanceUID": ""}))  # fmt: skip
            if found is None:
                return None
            series += [(study, uid) for m in found
                       for uid in _values(m.get("SeriesInstanceUID"))]  # fmt: skip
    elif level == "SERIES":
        if len(studies) != 1:
            return None
        series = [(studies[0], s) for s in _values(identifier.get("SeriesInstanceUID"))]
    survey = Survey()
    classes: dict[str, None] = {}
    syntaxes: dict[str, None] = {}
    image_keys = {"SOPInstanceUID": "", "SOPClassUID": "", "AvailableTransferSyntaxUID": ""}
    if level == "IMAGE":
        if len(studies) != 1:
            return None
        found_series = _values(identifier.get("SeriesInstanceUID"))
        if len(found_series) != 1:
            return None
        wanted = "\\".join(_values(identifier.get("SOPInstanceUID")))
        groups = [(studies[0], found_series[0], wanted)]
    else:
        groups = [(study, s, "") for study, s in series]
    for study, s, wanted in groups:
        keys = with_patient({"StudyInstanceUID": study, "SeriesInstanceUID": s, **image_keys})
        if wanted:
            keys["SOPInstanceUID"] = wanted
        found = query("IMAGE", keys)
        if found is None:
            return None
        survey.count += len(found)
        for m in found:
            # Each value on its own (AvailableTransferSyntaxUID is VM 1-n), UIDs only:
            # they go into the estimate (the codec takes UIDs) and the StorageMemory.
            sops = _uids(m.get("SOPClassUID"))
            classes.update(dict.fromkeys(sops))
            for ts in _uids(m.get("AvailableTransferSyntaxUID")):
                syntaxes.setdefault(ts, None)
                survey.pairs.update((sop, ts) for sop in sops)
    survey.sop_classes = list(classes)
    survey.transfer_syntaxes = list(syntaxes)
    return survey
