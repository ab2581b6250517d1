"""One DICOM operation against the PACS, run on its own thread with pynetdicom.

`PacsOperation.run()` performs what a `Request` asks and turns every result into encoded
stream messages put into a bounded `Channel`: C-FIND matches as they arrive, retrieved
instances one at a time as the PACS sends them (through an `Intake`, which blocks the
PACS's C-STORE while the channel is full: backpressure, not buffering), progress counts,
and always one final response. It never raises: every failure becomes a DIMSE status
with a reason.

Before a retrieve it surveys the study with C-FIND down to image level, which tells it the
number of instances (so the viewer sees counts at once) and their SOP classes (so the
storage contexts it proposes for C-GET are the right ones; 128 contexts cannot cover every
SOP class in every transfer syntax). A PACS that refuses the survey is retrieved from anyway,
with common SOP classes proposed.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_context, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from relay.dicom import contexts, rawds
from relay.dicom import status as st
from relay.dicom.bridge import Channel, ChannelClosed
from relay.dicom.codec import (
    MAX_COUNT,
    FinalResponse,
    Message,
    MessageCodec,
    Pending,
    Request,
)
from relay.dicom.intake import Intake, MoveReceiver
from relay.dicom.pacs_target import PacsTarget
from relay.dicom.rawds import encode_dataset
from relay.dicom.stats import DicomStats, NullStats, status_category

log = logging.getLogger(__name__)

_PENDING: Final = (0xFF00, 0xFF01)
_MAX_SURVEY_QUERIES: Final = 2000


_ids = itertools.count(1)
_ids_lock = threading.Lock()


def next_message_id() -> int:
    """Message IDs unique across concurrent operations (C-MOVE sub-operations name them)."""
    with _ids_lock:
        return (next(_ids) - 1) % 0xFFFF + 1


@dataclass
class Survey:
    count: int = 0
    sop_classes: list[str] = field(default_factory=list)
    transfer_syntaxes: list[str] = field(default_factory=list)


class PacsOperation:
    """One request against the PACS; `run()` on a thread, `cancel()`/`abort()` from anywhere."""

    def __init__(
        self,
        pacs: PacsTarget,
        request: Request,
        codec: MessageCodec,
        out: Channel[Message],
        *,
        stats: DicomStats | None = None,
        move_receiver: MoveReceiver | None = None,
        skip: frozenset[str] = frozenset(),
    ) -> None:
        """`skip`: SOP Instance UIDs the viewer already has (a resumed retrieve); they are
        taken from the PACS (which counts them as done) but not sent on."""
        self.pacs = pacs
        self.request = request
        self.codec = codec
        self.out = out
        self.stats: DicomStats = stats or NullStats()
        self.move_receiver = move_receiver
        self.op_name = request.op if request.op != "retrieve" else pacs.retrieve
        self.final: FinalResponse | None = None
        self._stored = 0  # a store: 1 once the PACS took it
        self.failed = 0  # failed sub-operations, as the PACS finally counts them
        self.warnings = 0
        self.cancel_sent = threading.Event()
        self._cancel = threading.Event()
        self._aborted = threading.Event()
        self.intake = Intake(
            out,
            codec,
            self.stats,
            stall_timeout=pacs.stall_timeout,
            aborted=self._aborted,
            cancel=self._cancel,
            skip=skip,
        )
        self._lock = threading.Lock()
        self._assoc: Association | None = None
        self._msg_id = next_message_id()
        self._model = ""
        self.survey: Survey | None = None

    @property
    def instances(self) -> int:
        """Completed sub-operations: instances sent on, or (a store) 1 once the PACS took it."""
        return self.intake.instances + self._stored

    # -- control (any thread) -------------------------------------------------------

    def cancel(self) -> None:
        """The viewer cancelled: send C-CANCEL to the PACS (once)."""
        self._cancel.set()
        with self._lock:
            assoc = self._assoc
            if assoc is None or not self._model or self.cancel_sent.is_set():
                return
            if self.request.op not in ("find", "retrieve"):
                return
            try:
                if assoc.is_established:
                    assoc.send_c_cancel(self._msg_id, query_model=self._model)
                    self.cancel_sent.set()
            except Exception as exc:  # the association may be ending under us
                log.debug("C-CANCEL not sent: %s", exc)

    def abort(self) -> None:
        """The stream is gone: abort the PACS association and stop producing."""
        self._aborted.set()
        self._cancel.set()
        with self._lock:
            assoc = self._assoc
        if assoc is not None and assoc.is_established:
            try:
                assoc.abort()
            except Exception as exc:
                log.debug("A-ABORT failed: %s", exc)
        if assoc is not None:
            # pynetdicom does not wake a thread blocked waiting for the next DIMSE message
            # when *we* abort; (None, None) is what it returns for an aborted association.
            with contextlib.suppress(Exception):
                assoc.dimse.msg_queue.put((None, None))

    # -- thread body ----------------------------------------------------------------

    def run(self) -> None:
        started = time.monotonic()
        try:
            final = self._run()
        except Exception as exc:  # never let the thread die silently
            log.exception("DICOM operation failed")
            final = FinalResponse(st.PACS_NO_RESPONSE, f"agent error: {type(exc).__name__}")
        if self.request.op == "store":
            final = FinalResponse(st.for_store(final.status), final.comment)
        elif self.request.op == "echo":
            final = FinalResponse(st.for_echo(final.status), final.comment)
        self.final = final
        self._count_final(final)
        self.stats.operation_done(self.op_name, final.status, time.monotonic() - started)
        with contextlib.suppress(ChannelClosed, TimeoutError):
            self._emit(final)
        self.out.close("operation finished")

    def _count_final(self, final: FinalResponse) -> None:
        """Failed and warning counts for the audit trail; a store is one sub-operation."""
        if self.request.op == "store":
            category = status_category(final.status)
            self._stored = int(category == "success")
            self.warnings = int(category == "warning")
            self.failed = int(category not in ("success", "warning"))
        elif self.request.op == "retrieve":
            self.failed = final.failed or 0
            self.warnings = final.warning or 0

    def _emit(self, msg: Message) -> None:
        """Queue `msg` for the stream, blocking while the channel is full.

        Messages are encoded (compressed) on the stream side, so that compressing one
        instance overlaps with the PACS sending the next.
        """
        if self._aborted.is_set():
            raise ChannelClosed("aborted")
        self.out.put_sync(msg, self.pacs.stall_timeout)

    def _ae(self) -> AE:
        ae = AE(ae_title=self.pacs.calling_ae_title)
        ae.acse_timeout = self.pacs.timeout
        ae.dimse_timeout = self.pacs.timeout
        ae.connection_timeout = self.pacs.timeout
        # While a full channel blocks us, the PACS is silent by design: idle up to the stall.
        ae.network_timeout = self.pacs.timeout + self.pacs.stall_timeout
        ae.maximum_pdu_size = 0
        return ae

    def _associate(
        self,
        cxs: Sequence[Any],
        *,
        ext_neg: list[Any] | None = None,
        handlers: list[Any] | None = None,
    ) -> Association | FinalResponse:
        ae = self._ae()
        try:
            assoc = ae.associate(
                self.pacs.host,
                self.pacs.port,
                contexts=list(cxs),
                ae_title=self.pacs.ae_title,
                max_pdu=0,
                ext_neg=ext_neg,
                evt_handlers=[contexts.NODELAY, *(handlers or [])],
            )
        except Exception as exc:
            return FinalResponse(st.PACS_UNREACHABLE, f"cannot reach the PACS: {exc}"[:200])
        if assoc.is_established:
            with self._lock:
                self._assoc = assoc
            if self._aborted.is_set():
                assoc.abort()
                return FinalResponse(st.LINK_LOST, "relay stream closed")
            return assoc
        where = f"{self.pacs.ae_title}@{self.pacs.host}:{self.pacs.port}"
        if assoc.is_rejected:
            return FinalResponse(st.PACS_REFUSED, f"PACS {where} rejected the association")
        if assoc.is_aborted and getattr(assoc.dul.socket, "_is_connected", False):
            return FinalResponse(st.PACS_NO_RESPONSE, f"PACS {where} aborted the association")
        return FinalResponse(st.PACS_UNREACHABLE, f"PACS {where} unreachable")

    def _release(self, assoc: Association) -> None:
        with self._lock:
            self._assoc = None
        try:
            if self._aborted.is_set():
                assoc.abort()
            elif assoc.is_established:
                assoc.release()
        except Exception as exc:
            log.debug("release failed: %s", exc)

    def _run(self) -> FinalResponse:
        op = self.request.op
        if op == "echo":
            return self._echo()
        if op == "store":
            return self._store()
        try:
            rawds.check_dataset(self.request.dataset, self.request.transfer_syntax)
            identifier = rawds.decode_dataset(self.request.dataset, self.request.transfer_syntax)
            _ = list(identifier)  # force decoding of every element now
        except Exception as exc:
            return FinalResponse(st.BAD_IDENTIFIER, f"cannot decode the identifier: {exc}"[:200])
        if op == "find":
            return self._find(identifier)
        return self._retrieve(identifier)

    # -- C-ECHO -----------------------------------------------------------------------

    def _echo(self) -> FinalResponse:
        assoc = self._associate([build_context(Verification)])
        if isinstance(assoc, FinalResponse):
            return assoc
        try:
            status = assoc.send_c_echo(msg_id=self._msg_id)
            if not status:
                return FinalResponse(st.PACS_NO_RESPONSE, "PACS did not answer C-ECHO")
            return FinalResponse(int(status.Status), str(status.get("ErrorComment", "")))
        finally:
            self._release(assoc)

    # -- C-STORE ----------------------------------------------------------------------

    def _store(self) -> FinalResponse:
        req = self.request
        try:
            rawds.check_instance(req.dataset, req.transfer_syntax, req.sop_class, req.sop_instance)
        except rawds.MalformedDataset as exc:
            return FinalResponse(st.STORE_CANNOT_UNDERSTAND, f"malformed dataset: {exc}"[:200])
        syntaxes = [req.transfer_syntax] + [
            ts for ts in contexts.UNCOMPRESSED[:2] if ts != req.transfer_syntax
        ]
        cxs = [build_context(req.sop_class, [ts]) for ts in syntaxes]
        assoc = self._associate(cxs)
        if isinstance(assoc, FinalResponse):
            return assoc
        try:
            ds = rawds.EncodedDataset(
                req.sop_class, req.sop_instance, req.transfer_syntax, req.dataset
            )
            try:
                status = assoc.send_c_store(
                    ds,
                    msg_id=self._msg_id,
                    priority=req.priority,
                    originator_aet=req.move_originator_ae or None,
                    originator_id=req.move_originator_id,
                )
            except ValueError as exc:  # no accepted context for this SOP class/syntax
                return FinalResponse(st.PACS_REFUSED, f"PACS does not accept it: {exc}"[:200])
            if not status:
                return FinalResponse(st.PACS_NO_RESPONSE, "PACS did not answer C-STORE")
            self.stats.instance_relayed(len(req.dataset))
            return FinalResponse(int(status.Status), str(status.get("ErrorComment", "")))
        finally:
            self._release(assoc)

    # -- C-FIND -----------------------------------------------------------------------

    def _find(self, identifier: Dataset) -> FinalResponse:
        model = contexts.MODELS[(self.request.root, "find")]
        assoc = self._associate([build_context(model)])
        if isinstance(assoc, FinalResponse):
            return assoc
        try:
            # pynetdicom sends the request here; a C-CANCEL may only follow it.
            responses = assoc.send_c_find(
                identifier, model, msg_id=self._msg_id, priority=self.request.priority
            )
            self._model = model
            if self._cancel.is_set():
                self.cancel()
            for status, match in responses:
                if not status:
                    return FinalResponse(st.PACS_NO_RESPONSE, "PACS stopped answering C-FIND")
                code = int(status.Status)
                if code in _PENDING:
                    if match is not None:
                        self._emit(
                            Pending(
                                transfer_syntax=ExplicitVRLittleEndian,
                                dataset=encode_dataset(match, ExplicitVRLittleEndian),
                            )
                        )
                    continue
                return FinalResponse(code, str(status.get("ErrorComment", "")))
            return FinalResponse(st.PACS_NO_RESPONSE, "C-FIND ended without a final response")
        except (ChannelClosed, TimeoutError):
            self.abort()
            return FinalResponse(st.LINK_LOST, "relay stream closed")
        finally:
            self._release(assoc)

    # -- retrieve -----------------------------------------------------------------------

    def _retrieve(self, identifier: Dataset) -> FinalResponse:
        root = self.request.root
        kind = self.pacs.retrieve
        model = contexts.MODELS[(root, kind)]
        find_model = contexts.MODELS[(root, "find")]
        base = [build_context(model), build_context(find_model)]
        if kind == "move":
            receiver = self.move_receiver
            if receiver is None:
                return FinalResponse(st.RELAY_UNSUPPORTED, "agent has no C-MOVE receiver")
            assoc = self._associate(base)
            if isinstance(assoc, FinalResponse):
                return assoc
            try:
                self._announce(assoc, find_model, identifier)
                receiver.register(self._msg_id, self.intake)
                try:
                    return self._follow(
                        assoc,
                        model,
                        assoc.send_c_move(
                            identifier,
                            self.pacs.move_ae_title,
                            model,
                            msg_id=self._msg_id,
                            priority=self.request.priority,
                        ),
                    )
                finally:
                    receiver.unregister(self._msg_id)
            finally:
                self._release(assoc)
        # C-GET: the survey must come first, it decides the storage contexts.
        survey = None
        if self.pacs.survey:
            probe = self._associate([build_context(find_model)])
            if isinstance(probe, FinalResponse):
                return probe
            try:
                survey = self._announce(probe, find_model, identifier)
            finally:
                self._release(probe)
        storage = contexts.storage_proposals(
            survey.sop_classes if survey else (),
            survey.transfer_syntaxes if survey else (),
            budget=contexts.MAX_CONTEXTS - len(base),
        )
        classes = sorted({str(cx.abstract_syntax) for cx in storage})
        roles = [build_role(sop, scp_role=True) for sop in classes]
        assoc = self._associate(
            [*base, *storage], ext_neg=roles, handlers=[(evt.EVT_C_STORE, self.intake.on_store)]
        )
        if isinstance(assoc, FinalResponse):
            return assoc
        try:
            return self._follow(
                assoc,
                model,
                assoc.send_c_get(
                    identifier, model, msg_id=self._msg_id, priority=self.request.priority
                ),
            )
        finally:
            self._release(assoc)

    def _follow(
        self, assoc: Association, model: str, responses: Iterator[tuple[Dataset, Any]]
    ) -> FinalResponse:
        """Relay the PACS's C-GET/C-MOVE responses; sub-operations go to the intake."""
        self._model = model
        counts: Counts = (None, None, None, None)
        counted = False  # the workstation has the PACS's count of sub-operations
        try:
            if self._cancel.is_set():
                self.cancel()
            for status, ident in responses:
                if self._aborted.is_set():
                    return FinalResponse(st.LINK_LOST, "relay stream closed")
                if not status:
                    return _final(
                        st.PACS_NO_RESPONSE,
                        "PACS aborted or stopped answering the retrieve",
                        _carry(counts, self.instances),
                    )
                code = int(status.Status)
                counts = (
                    _count(status, "NumberOfRemainingSuboperations"),
                    _count(status, "NumberOfCompletedSuboperations"),
                    _count(status, "NumberOfFailedSuboperations"),
                    _count(status, "NumberOfWarningSuboperations"),
                )
                if code in _PENDING:
                    # The first count is all the workstation uses (it counts deliveries
                    # itself, the final response has the PACS's final counts): later
                    # pending responses would only double the messages per instance.
                    if not counted:
                        self._emit(_pending(counts))
                        counted = counts[0] is not None
                    continue
                failed_uids: tuple[str, ...] = ()
                if ident is not None and "FailedSOPInstanceUIDList" in ident:
                    value = ident.FailedSOPInstanceUIDList
                    uids = [value] if isinstance(value, str) else list(value)
                    failed_uids = tuple(str(u) for u in uids if u)[: self.codec.limits.max_list]
                comment = str(status.get("ErrorComment", ""))[: self.codec.limits.max_text]
                return _final(code, comment, counts, failed_uids)
            return _final(
                st.PACS_NO_RESPONSE, "retrieve ended without a final response",
                _carry(counts, self.instances),
            )  # fmt: skip
        except (ChannelClosed, TimeoutError):
            self.abort()
            return FinalResponse(st.LINK_LOST, "relay stream closed")

    # -- survey -------------------------------------------------------------------------

    def _announce(self, assoc: Association, find_model: str, identifier: Dataset) -> Survey | None:
        """Survey the study and tell the workstation what will come, if the PACS lets us."""
        if not self.pacs.survey:
            return None
        try:
            survey = _survey(assoc, find_model, identifier, self.pacs.timeout, self._cancel)
        except Exception as exc:
            # Only the type: pydicom's and pynetdicom's texts may quote the query's values.
            log.info("survey failed, retrieving without it: %s", type(exc).__name__)
            survey = None
        self.survey = survey
        if survey is not None and survey.count > 0:
            limit = self.codec.limits.max_list
            self._emit(
                Pending(
                    remaining=min(survey.count, MAX_COUNT),
                    completed=0,
                    failed=0,
                    warning=0,
                    sop_classes=tuple(survey.sop_classes[:limit]),
                    transfer_syntaxes=tuple(survey.transfer_syntaxes[:limit]),
                    estimate=True,
                )
            )
        return survey


def _count(status: Dataset, keyword: str) -> int | None:
    value = status.get(keyword)
    if value is None or value == "":
        return None
    return max(0, min(MAX_COUNT, int(value)))


Counts = tuple[int | None, int | None, int | None, int | None]


def _pending(counts: Counts) -> Pending:
    rem, ok, fail, warn = counts
    return Pending(remaining=rem, completed=ok, failed=fail, warning=warn)


def _final(code: int, comment: str, counts: Counts, failed: tuple[str, ...] = ()) -> FinalResponse:
    rem, ok, fail, warn = counts
    return FinalResponse(code, comment, rem, ok, fail, warn, failed_instances=failed)


def _carry(counts: Counts, delivered: int) -> Counts:
    """Counts for a failure mid-retrieve: what the PACS said, or what we delivered."""
    remaining, completed, failed, warning = counts
    if completed is None:
        return (remaining, delivered, failed, warning)
    return counts


_SURVEY_LEVELS: Final = ("PATIENT", "STUDY", "SERIES", "IMAGE")


def _survey(
    assoc: Association,
    model: str,
    identifier: Dataset,
    timeout: float,
    cancelled: threading.Event,
) -> Survey | None:
    """Walk the retrieve's identifier down to image level with C-FIND; None if not possible."""
    level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
    if level not in _SURVEY_LEVELS:
        return None
    deadline = time.monotonic() + timeout
    budget = [_MAX_SURVEY_QUERIES]
    patient_id = str(identifier.get("PatientID", "") or "")

    def query(lvl: str, keys: dict[str, str]) -> list[Dataset] | None:
        if cancelled.is_set() or time.monotonic() > deadline or budget[0] <= 0:
            return None
        budget[0] -= 1
        q = Dataset()
        q.QueryRetrieveLevel = lvl
        for kw, value in keys.items():
            setattr(q, kw, value)
        out: list[Dataset] = []
        for status, match in assoc.send_c_find(q, model, msg_id=next_message_id()):
            if not status:
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

    def uids(value: Any) -> list[str]:
        if value is None:
            return []
        items = [value] if isinstance(value, str) else list(value)
        return [str(u) for part in items for u in str(part).split("\\") if str(u).strip()]

    def with_patient(keys: dict[str, str]) -> dict[str, str]:
        return {"PatientID": patient_id, **keys} if patient_id else keys

    studies: list[str]
    if level == "PATIENT":
        if not patient_id:
            return None
        found = query("STUDY", {"PatientID": patient_id, "StudyInstanceUID": ""})
        if found is None:
            return None
        studies = [str(m.StudyInstanceUID) for m in found if m.get("StudyInstanceUID")]
    else:
        studies = uids(identifier.get("StudyInstanceUID"))
    series: list[tuple[str, str]] = []
    if level in ("PATIENT", "STUDY"):
        for study in studies:
            found = query("SERIES", with_patient({"StudyInstanceUID": study,
                                                  "SeriesInstanceUID": ""}))  # fmt: skip
            if found is None:
                return None
            series += [(study, str(m.SeriesInstanceUID)) for m in found
                       if m.get("SeriesInstanceUID")]  # fmt: skip
    elif level == "SERIES":
        if len(studies) != 1:
            return None
        series = [(studies[0], s) for s in uids(identifier.get("SeriesInstanceUID"))]
    survey = Survey()
    classes: dict[str, None] = {}
    syntaxes: dict[str, None] = {}
    image_keys = {"SOPInstanceUID": "", "SOPClassUID": "", "AvailableTransferSyntaxUID": ""}
    if level == "IMAGE":
        if len(studies) != 1:
            return None
        found_series = uids(identifier.get("SeriesInstanceUID"))
        if len(found_series) != 1:
            return None
        wanted = "\\".join(uids(identifier.get("SOPInstanceUID")))
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
            if m.get("SOPClassUID"):
                classes.setdefault(str(m.SOPClassUID), None)
            ts = m.get("AvailableTransferSyntaxUID")
            if ts:
                syntaxes.setdefault(str(ts), None)
    survey.sop_classes = list(classes)
    survey.transfer_syntaxes = list(syntaxes)
    return survey
