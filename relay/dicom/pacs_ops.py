"""One DICOM operation against the PACS, run on its own thread with pynetdicom.

`PacsOperation.run()` performs what a `Request` asks and turns every result into encoded
stream messages put into a bounded `Channel`: C-FIND matches as they arrive, retrieved
instances one at a time as the PACS sends them (through an `Intake`, which blocks the
PACS's C-STORE while the channel is full: backpressure, not buffering), progress counts,
and always one final response. It never raises: every failure becomes a DIMSE status
with a reason.

A retrieve starts at once; the study's survey (relay.dicom.survey: C-FIND down to image
level, for the viewer's fallback count and the study's SOP classes and syntaxes) runs
beside it on a second association, once the retrieve's own association is up (the two
would otherwise compete for the PACS's attention before the first image). A PACS whose
retrieves have reported their counts is not surveyed for the count: only when a retrieve
brings none (then at once) or fails sub-operations. A C-GET proposes storage contexts
from what this PACS's recent studies held plus the common classes; if sub-operations then
fail and the survey shows the study holds something those contexts could not carry, it
retrieves again with the study's own contexts, passing over what already came. A PACS
that refuses the survey is retrieved from anyway.

A query or retrieve takes the agent's spare association when there is one
(relay.dicom.spare: opened after the previous request, `spare_contexts`), and leaves the next
one behind when it ends; a spare the PACS had closed is replaced by a new association.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import build_context, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from relay.dicom import contexts, rawds
from relay.dicom import status as st
from relay.dicom import survey as survey_mod
from relay.dicom.bridge import Channel, ChannelClosed
from relay.dicom.codec import (
    MAX_COUNT,
    DicomProtocolError,
    FinalResponse,
    Message,
    MessageCodec,
    Pending,
    Request,
)
from relay.dicom.ending import STOP_JOIN, OpenAssociations, abort_within
from relay.dicom.intake import Intake, MoveReceiver, MoveRoutesFull
from relay.dicom.pacs_assoc import allow_move_stalls, associate, scp_roles
from relay.dicom.pacs_target import PacsTarget
from relay.dicom.rawds import encode_dataset
from relay.dicom.spare import SpareAssociation
from relay.dicom.stats import DicomStats, NullStats, status_category
from relay.dicom.survey import StorageMemory, Survey
from relay.dicom.uids import is_uid
from relay.dicom.uidset import UidSet

log = logging.getLogger(__name__)

_PENDING: Final = (0xFF00, 0xFF01)
FIRST_CONTEXTS: Final = 64  # storage contexts of a C-GET once the PACS's studies are known
# C-FIND matches the PACS has sent that wait, unread, at pynetdicom (whose DIMSE queue has
# no bound: the PACS streams on while the viewer's channel is full). Past this many, the
# query is cancelled at the PACS and ends with FIND_BACKLOG_STATUS: a viewer that reads
# nothing (or far slower than the PACS answers) would otherwise hold the whole result set
# in the agent's memory for up to `stall_timeout`, on each of its streams. A match is a
# few hundred bytes to a few KiB there: 2,000 hold a few MiB. An honest viewer reads its
# matches as they come (the workstation's own C-FINDs take up to 10,000).
MAX_FIND_BACKLOG: Final = 2000
FIND_BACKLOG_STATUS: Final = 0xA700  # C-FIND "Refused: Out of resources"
_BACKLOG_LOOK: Final = 0.05  # seconds between looks at that backlog while the channel is full


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
        skip: UidSet | None = None,
        memory: StorageMemory | None = None,
        estimate: bool = True,
        spare: SpareAssociation | None = None,
        associations: OpenAssociations | None = None,
    ) -> None:
        """`skip`: SOP Instance UIDs the viewer already has (a resumed retrieve), as
        digests (uidset.py); they are taken from the PACS (which counts them as done) but
        not sent on. `memory`: what this PACS's recent studies held (the agent keeps
        one), for a C-GET's contexts.
        `estimate`: survey beside the retrieve, for the viewer's fallback count; without
        it (a headers-only retrieve, whose reader uses the final counts) the study is
        surveyed only when a C-GET's contexts may have missed something. `spare`: the
        agent's spare association, taken if it suits and refilled at the end.
        `associations`: the agent's, which ends ours at its stop."""
        self.pacs = pacs
        self.request = request
        self.codec = codec
        self.out = out
        self.stats: DicomStats = stats or NullStats()
        self.move_receiver = move_receiver
        self.memory = memory
        self.estimate = estimate
        self.spare = spare
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
        self._msg_id = contexts.next_message_id()
        self._model = ""  # the request sent on `_assoc` (a C-CANCEL may follow it)
        self._aborting: Association | None = None  # handed to a thread to A-ABORT
        self._abort_sent = threading.Event()  # that thread is done
        self.survey: Survey | None = None
        self._beside: _Beside | None = None
        self._survey_for: tuple[str, Dataset] | None = None  # (find model, identifier)
        # A C-MOVE: its C-STOREs come on other associations, past the first count refused
        self._move_announces = False
        self._took_spare = False  # the main association is the spare
        self._answered = False  # the PACS answered the main association's request
        # The PACS accepted the association but none of the presentation contexts proposed
        # (pynetdicom then aborts it): what was asked is not supported there.
        self._contexts_refused = False
        self.associations = associations
        self._own = OpenAssociations()  # ours: abort() cuts those still being requested

    @property
    def instances(self) -> int:
        """Completed sub-operations: instances sent on, or (a store) 1 once the PACS took it."""
        return self.intake.instances + self._stored

    # -- control (any thread) -------------------------------------------------------

    def cancel(self) -> None:
        """The viewer cancelled: send C-CANCEL to the PACS (once), stop the survey."""
        self._cancel.set()
        with self._lock:
            if self._beside is not None:
                self._beside.stop.set()
            assoc = self._assoc
            if assoc is None or not self._model or self.cancel_sent.is_set():
                return
            if assoc is self._aborting:
                return  # an A-ABORT ends it: nothing may follow that
            if self.request.op not in ("find", "retrieve"):
                return
            try:
                if assoc.is_established:
                    assoc.send_c_cancel(self._msg_id, query_model=self._model)
                    self.cancel_sent.set()
            except Exception as exc:  # the association may be ending under us
                log.debug("C-CANCEL not sent: %s", exc)

    def abort(self) -> None:
        """The stream is gone: abort the PACS association and stop producing.

        Returns at once (the agent calls it on its event loop): pynetdicom's A-ABORT
        blocks, stopping the association's thread and sleeping 0.1 s, and longer while
        the PACS keeps the connection, so it runs on a thread of its own, which always
        runs to the end. An association established after this is aborted by
        `_associate`, which looks at the flag once it has published the association."""
        with self._lock:
            assoc = self._assoc
            beside = self._beside
            if assoc is not None and assoc is not self._aborting:
                self._aborting = assoc  # set first: what sees the flags sees this too
            else:
                assoc = None  # none, or already being aborted
            self._aborted.set()
            self._cancel.set()
        if beside is not None:
            beside.stop.set()  # its association ends when the operation's final is queued
        self._own.cut_requests()  # a PACS that never answers them must not hold us
        if assoc is not None:
            threading.Thread(
                target=self._abort_aside, args=(assoc,), name="pacs-abort", daemon=True
            ).start()

    def _abort_aside(self, assoc: Association) -> None:
        try:
            _abort(assoc)
        finally:
            self._abort_sent.set()

    def _on_store(self, event: Any) -> int:
        """A C-GET's C-STORE sub-operation, for the intake. Its answer waits while abort()
        aborts this association on its own thread: pynetdicom's state machine raises (in
        the association's thread) on a message sent after the A-ABORT was."""
        status = self.intake.on_store(event)
        if self._aborting is event.assoc:
            self._abort_sent.wait(self.pacs.timeout)
        return status

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
        final = self._encodable(final)
        self.final = final
        self._count_final(final)
        self.stats.operation_done(self.op_name, final.status, time.monotonic() - started)
        with contextlib.suppress(ChannelClosed, TimeoutError):
            self._emit(final)
        self.out.close("operation finished")
        self._refill(final)

    def _encodable(self, final: FinalResponse) -> FinalResponse:
        """`final`, or its status and counts alone if the stream could not carry the rest:
        the viewer always gets the operation's status (a FINAL that fails to encode
        resets the stream, and the status is lost)."""
        try:
            self.codec.validate(final)
        except DicomProtocolError as exc:
            log.warning("final response cut to its status: %s", exc)
            return dataclasses.replace(final, comment="", failed_instances=())
        return final

    def _refill(self, final: FinalResponse) -> None:
        """Leave a spare association for the next query or retrieve (viewers ask in
        bursts), unless this one could not reach the PACS or was cut. Never raises: it runs after
        the final response, and a spare is only a head start."""
        if self.spare is None or self.request.op not in ("find", "retrieve"):
            return
        if self._aborted.is_set():
            return  # the stream was cut: by its viewer, or by the agent's stop (no more)
        if final.status in (st.PACS_UNREACHABLE, st.PACS_REFUSED) or not self.spare.vacant():
            return  # (the contexts cost building: not for a spare held, or none wanted)
        try:
            self.spare.refill(self.pacs, *spare_contexts(self.pacs, self.memory))
        except Exception:
            log.exception("no spare association left for the next request")

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

    def _associate(
        self,
        cxs: Sequence[Any],
        *,
        storage: Callable[[], list[Any]] | None = None,
        handlers: list[Any] | None = None,
        main: bool = True,
        spare_for: str = "",
    ) -> Association | FinalResponse:
        """`main`: the operation's association, the one cancel() and abort() act on.
        `spare_for`: take the spare association if it accepted this abstract syntax.
        `storage`: a C-GET's storage contexts (we take the SCP role), built only when
        associating afresh: a spare has its own, and building ~60 costs a millisecond
        before the first instance."""
        assoc = self.spare.take(spare_for) if spare_for and self.spare is not None else None
        if assoc is not None:
            for event, handler in handlers or []:
                assoc.bind(event, handler)
            if not assoc.is_established:  # the PACS ended it just now: associate afresh
                assoc = None
        if main:
            self._took_spare = assoc is not None
        if assoc is None:
            try:
                extra = storage() if storage is not None else []
            except Exception as exc:  # nothing asked of the PACS yet
                log.exception("cannot build the C-GET's storage contexts")
                return FinalResponse(
                    st.PACS_NO_RESPONSE,
                    f"agent error: cannot build the storage contexts ({type(exc).__name__})",
                )
            try:
                assoc = associate(
                    self.pacs,
                    [*cxs, *extra],
                    ext_neg=scp_roles(extra),
                    handlers=handlers or (),
                    keep=(self._own, self.associations),
                )
            except Exception as exc:
                return FinalResponse(st.PACS_UNREACHABLE, f"cannot reach the PACS: {exc}"[:200])
        if assoc.is_established:
            with self._lock:
                if main:
                    self._assoc = assoc
                aborted = self._aborted.is_set()
                handed = self._aborting is assoc  # abort() saw it: its thread aborts it
            if aborted:
                if not handed:
                    abort_within(assoc)
                return FinalResponse(st.LINK_LOST, "relay stream closed")
            return assoc
        if self._aborted.is_set():  # abort() cut it while it was being requested
            return FinalResponse(st.LINK_LOST, "relay stream closed")
        where = f"{self.pacs.ae_title}@{self.pacs.host}:{self.pacs.port}"
        if assoc.is_rejected:
            return FinalResponse(st.PACS_REFUSED, f"PACS {where} rejected the association")
        if assoc.rejected_contexts and not assoc.accepted_contexts:
            self._contexts_refused = True
            return FinalResponse(
                st.PACS_REFUSED, f"PACS {where} does not accept the presentation contexts"
            )
        if assoc.is_aborted and getattr(assoc.dul.socket, "_is_connected", False):
            return FinalResponse(st.PACS_NO_RESPONSE, f"PACS {where} aborted the association")
        return FinalResponse(st.PACS_UNREACHABLE, f"PACS {where} unreachable")

    def _release(self, assoc: Association) -> None:
        with self._lock:
            self._assoc = None
            self._model = ""  # a cancel now waits for the next request (`_sent`)
            if self._aborting is assoc:
                return  # abort() has it aborted on a thread of its own
        try:
            if self._aborted.is_set():
                abort_within(assoc)
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
        identifier = self._identifier()
        if isinstance(identifier, FinalResponse):
            return identifier
        if op == "find":
            return self._find(identifier)
        return self._retrieve(identifier)

    def _identifier(self) -> Dataset | FinalResponse:
        """The request's identifier, decoded, or why not (0xC007). A deflated one is
        inflated once, at most to `max_identifier` (the codec bounded the others)."""
        req = self.request
        limit = self.codec.limits.max_identifier
        try:
            data, ts = rawds.readable(req.dataset, req.transfer_syntax, limit)
            rawds.check_dataset(data, ts, max_inflated=limit)
            identifier = rawds.decode_dataset(data, ts, max_inflated=limit)
            _ = list(identifier)  # force decoding of every element now
        except rawds.InflatedTooLarge:
            return FinalResponse(st.BAD_IDENTIFIER, f"identifier inflates past {limit} bytes")
        except rawds.MalformedDataset as exc:  # (our texts name offsets, never values)
            return FinalResponse(st.BAD_IDENTIFIER, f"malformed identifier: {exc}"[:200])
        except Exception as exc:
            # Only the type: pydicom's texts may quote the identifier's values.
            why = type(exc).__name__
            return FinalResponse(st.BAD_IDENTIFIER, f"cannot decode the identifier ({why})")
        return identifier

    # -- C-ECHO -----------------------------------------------------------------------

    def _echo(self) -> FinalResponse:
        assoc = self._associate([build_context(Verification)])
        if isinstance(assoc, FinalResponse):
            return assoc
        try:
            status = assoc.send_c_echo(msg_id=self._msg_id)
            if not status:
                return FinalResponse(st.PACS_NO_RESPONSE, "PACS did not answer C-ECHO")
            return FinalResponse(int(status.Status), self._comment(status))
        finally:
            self._release(assoc)

    # -- C-STORE ----------------------------------------------------------------------

    def _store(self) -> FinalResponse:
        req = self.request
        limit = self.codec.limits.max_dataset
        try:
            rawds.check_instance(
                req.dataset, req.transfer_syntax, req.sop_class, req.sop_instance,
                max_inflated=limit,
            )  # fmt: skip
        except rawds.MalformedDataset as exc:
            code = (
                st.STORE_DATASET_MISMATCH
                if isinstance(exc, rawds.SopClassMismatch)
                else st.STORE_CANNOT_UNDERSTAND
            )
            return FinalResponse(code, f"malformed dataset: {exc}"[:200])
        syntaxes = [req.transfer_syntax] + [
            ts for ts in contexts.UNCOMPRESSED[:2] if ts != req.transfer_syntax
        ]
        cxs = [build_context(req.sop_class, [ts]) for ts in syntaxes]
        assoc = self._associate(cxs)
        if isinstance(assoc, FinalResponse):
            if self._contexts_refused:  # will be every time: not "out of resources"
                return FinalResponse(st.STORE_SOP_CLASS_NOT_SUPPORTED, assoc.comment)
            return assoc
        try:
            refused = _syntax_refused(assoc, req)
            if refused is not None:
                return refused
            ds = rawds.EncodedDataset(
                req.sop_class, req.sop_instance, req.transfer_syntax, req.dataset,
                max_inflated=limit,
            )  # fmt: skip
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
            return FinalResponse(int(status.Status), self._comment(status))
        finally:
            self._release(assoc)

    # -- C-FIND -----------------------------------------------------------------------

    def _find(self, identifier: Dataset) -> FinalResponse:
        model = contexts.MODELS[(self.request.root, "find")]
        final = self._find_on(self._associate([build_context(model)], spare_for=model), model,
                              identifier)  # fmt: skip
        if self._spare_was_stale(final):
            final = self._find_on(self._associate([build_context(model)]), model, identifier)
        return final

    def _find_on(
        self, assoc: Association | FinalResponse, model: str, identifier: Dataset
    ) -> FinalResponse:
        if isinstance(assoc, FinalResponse):
            return assoc
        try:
            # pynetdicom sends the request here; a C-CANCEL may only follow it.
            responses = assoc.send_c_find(
                identifier, model, msg_id=self._msg_id, priority=self.request.priority
            )
            self._sent(model)
            garbled = False  # a match pynetdicom could not decode (it gives None for it)
            for status, match in responses:
                if not status:
                    return FinalResponse(st.PACS_NO_RESPONSE, "PACS stopped answering C-FIND")
                self._answered = True
                code = int(status.Status)
                if code in _PENDING:
                    if match is None:
                        garbled = True
                        continue
                    pending = Pending(
                        transfer_syntax=ExplicitVRLittleEndian,
                        dataset=encode_dataset(match, ExplicitVRLittleEndian),
                        status=code,  # 0xFF01: optional keys the PACS did not support
                    )
                    if not self._emit_match(assoc, pending):
                        return self._cancel_backlog(assoc, model, responses)
                    continue
                if garbled and status_category(code) in ("success", "warning"):
                    # Not a complete result set: say so rather than pass on its Success.
                    return FinalResponse(st.PACS_GARBLED, "PACS matches could not be decoded")
                return FinalResponse(code, self._comment(status))
            return FinalResponse(st.PACS_NO_RESPONSE, "C-FIND ended without a final response")
        except (ChannelClosed, TimeoutError):
            self.abort()
            return FinalResponse(st.LINK_LOST, "relay stream closed")
        except RuntimeError:  # pynetdicom: the association ended before the request went
            return FinalResponse(st.PACS_NO_RESPONSE, "the PACS ended the association")
        finally:
            self._release(assoc)

    def _emit_match(self, assoc: Association, match: Pending) -> bool:
        """Queue a C-FIND match like `_emit` (TimeoutError after `stall_timeout`), looking
        at pynetdicom's backlog while the channel is full: False (not queued) once more
        than MAX_FIND_BACKLOG of the PACS's responses wait there."""
        deadline = time.monotonic() + self.pacs.stall_timeout
        while True:
            if self._aborted.is_set():
                raise ChannelClosed("aborted")
            try:
                self.out.put_sync(match, max(0.0, min(_BACKLOG_LOOK, deadline - time.monotonic())))
                return True
            except TimeoutError:
                if backlog(assoc) > MAX_FIND_BACKLOG:
                    return False
                if time.monotonic() >= deadline:
                    raise

    def _cancel_backlog(
        self, assoc: Association, model: str, responses: Iterator[tuple[Dataset, Any]]
    ) -> FinalResponse:
        """The viewer is not taking the matches the PACS sends: C-CANCEL, then take the
        responses still coming (dropped, so that nothing piles up) until the PACS's
        final, within `pacs.timeout`; a PACS that answers on past that is aborted."""
        log.info("C-FIND: more than %d matches unread; cancelling at the PACS", MAX_FIND_BACKLOG)
        final = FinalResponse(
            FIND_BACKLOG_STATUS,
            f"out of resources: more than {MAX_FIND_BACKLOG} matches waited for the viewer",
        )
        try:
            assoc.send_c_cancel(self._msg_id, query_model=model)
        except Exception as exc:  # the association may be ending under us
            log.debug("C-CANCEL not sent: %s", type(exc).__name__)
        deadline = time.monotonic() + self.pacs.timeout
        with contextlib.suppress(Exception):  # pynetdicom's own errors end it too
            for status, _ in responses:
                if not status or int(status.Status) not in _PENDING:
                    return final
                if time.monotonic() > deadline or self._aborted.is_set():
                    break
        _abort(assoc)
        return final

    def _comment(self, status: Dataset) -> str:
        """The PACS's Error Comment as a stream message can carry it (`clean_text`)."""
        return clean_text(status.get("ErrorComment", ""), self.codec.limits.max_text)

    # -- retrieve -----------------------------------------------------------------------

    def _retrieve(self, identifier: Dataset) -> FinalResponse:
        root = self.request.root
        kind = self.pacs.retrieve
        model = contexts.MODELS[(root, kind)]
        find_model = contexts.MODELS[(root, "find")]
        base = [build_context(model), build_context(find_model)]
        self._survey_for = (find_model, identifier)
        try:
            if kind == "move":
                return self._move(base, model, identifier)
            storage = functools.partial(remembered_storage, self.memory, len(base))
            final, accepted = self._get(base, model, identifier, storage, spare=True)
            if self._spare_was_stale(final):
                final, accepted = self._get(base, model, identifier, storage)
            if not _retry_worthy(final) or not self.pacs.survey:
                return final
            beside = self._beside or self._survey_beside(find_model, identifier)
            survey = beside.finish(wait=True) if beside is not None else None
            if survey is None or not survey_mod.uncovered(survey, accepted):
                return final
            if self._cancel.is_set() or self._aborted.is_set():
                return final
            if not self.intake.pass_over_delivered():
                return final  # too many to pass over: a second retrieve would repeat them
            # Some of the study is in SOP classes or syntaxes the first association could
            # not carry: again, with the study's own, passing over what already came.
            log.info("retrieving again with the study's own storage contexts")
            own = functools.partial(
                contexts.storage_proposals, survey.sop_classes, survey.transfer_syntaxes,
                budget=contexts.MAX_CONTEXTS - len(base),
            )  # fmt: skip
            return self._get(base, model, identifier, own)[0]
        finally:
            if self.memory is not None:
                self.memory.remember_seen(self.intake.seen_classes(), self.intake.seen_syntaxes())
            if self._beside is not None:
                self._beside.finish(wait=False)

    def _get(
        self,
        base: list[Any],
        model: str,
        identifier: Dataset,
        storage: Callable[[], list[Any]],
        *,
        spare: bool = False,
    ) -> tuple[FinalResponse, set[tuple[str, str]]]:
        """One C-GET; its final response and the (class, syntax) pairs it could carry.
        `spare`: on the spare association if there is one (its own storage contexts)."""
        assoc = self._associate(
            base,
            storage=storage,
            handlers=[(evt.EVT_C_STORE, self._on_store)],
            spare_for=model if spare else "",
        )
        if isinstance(assoc, FinalResponse):
            return assoc, set()
        self.intake.limit_to(identifier)  # what the PACS sends must be what was asked for
        if self._wants_estimate():
            self._survey_now()
        accepted = {
            (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
            for cx in assoc.accepted_contexts
            if cx.transfer_syntax
        }
        try:
            final = self._follow(
                model,
                assoc.send_c_get(
                    identifier, model, msg_id=self._msg_id, priority=self.request.priority
                ),
            )
        except RuntimeError:  # pynetdicom: the association ended before the request went
            final = FinalResponse(st.PACS_NO_RESPONSE, "the PACS ended the association")
        finally:
            self._release(assoc)
        return final, accepted

    def _move(self, base: list[Any], model: str, identifier: Dataset) -> FinalResponse:
        receiver = self.move_receiver
        if receiver is None:
            return FinalResponse(st.RELAY_UNSUPPORTED, "agent has no C-MOVE receiver")
        final = self._move_on(self._associate(base, spare_for=model), model, identifier, receiver)
        if self._spare_was_stale(final):
            final = self._move_on(self._associate(base), model, identifier, receiver)
        return final

    def _move_on(
        self,
        assoc: Association | FinalResponse,
        model: str,
        identifier: Dataset,
        receiver: MoveReceiver,
    ) -> FinalResponse:
        if isinstance(assoc, FinalResponse):
            return assoc
        allow_move_stalls(assoc, self.pacs)
        if self._wants_estimate():
            self._survey_now()
        # The sub-operations reach our storage SCP on associations of their own: only
        # instances of what was asked for, and (move_announces) no more than announced.
        self.intake.limit_to(identifier)
        self._move_announces = True
        try:
            try:
                receiver.register(self._msg_id, self.intake)
            except MoveRoutesFull as exc:
                return FinalResponse(st.SUBOPS_FAILED, str(exc))
            try:
                return self._follow(
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
        except RuntimeError:  # pynetdicom: the association ended before the request went
            return FinalResponse(st.PACS_NO_RESPONSE, "the PACS ended the association")
        finally:
            self._release(assoc)

    def _follow(self, model: str, responses: Iterator[tuple[Dataset, Any]]) -> FinalResponse:
        """Relay the PACS's C-GET/C-MOVE responses (their request has just been sent);
        sub-operations go to the intake."""
        self._sent(model)
        counts: Counts = (None, None, None, None)
        counted = False  # the workstation has the PACS's count of sub-operations
        try:
            for status, ident in responses:
                if self._aborted.is_set():
                    return FinalResponse(st.LINK_LOST, "relay stream closed")
                if not status:
                    return _final(
                        st.PACS_NO_RESPONSE,
                        "PACS aborted or stopped answering the retrieve",
                        _carry(counts, self.instances),
                    )
                self._answered = True
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
                        self._counted(counted)
                        if counted and self._move_announces:
                            self.intake.announce(sum(n or 0 for n in counts))
                    continue
                return self._retrieve_final(code, status, ident, counts)
            return _final(
                st.PACS_NO_RESPONSE, "retrieve ended without a final response",
                _carry(counts, self.instances),
            )  # fmt: skip
        except (ChannelClosed, TimeoutError):
            self.abort()
            return FinalResponse(st.LINK_LOST, "relay stream closed")

    def _retrieve_final(
        self, code: int, status: Dataset, ident: Dataset | None, counts: Counts
    ) -> FinalResponse:
        """The PACS's final C-GET/C-MOVE response as a FINAL that always encodes: what
        would not (a Failed SOP Instance UID that is no UID, more UIDs than the header
        holds, an over-long comment) is left out, never the status or its counts."""
        failed_uids: tuple[str, ...] = ()
        if ident is not None:
            try:
                value = ident.get("FailedSOPInstanceUIDList")
            except Exception:  # a value pydicom cannot decode: the list is left out
                value = None
            failed_uids = clean_uids(value, self.codec.limits.max_list)
        final = _final(code, self._comment(status), counts, failed_uids)
        try:
            return self.codec.fit_final(final)
        except DicomProtocolError:  # (not expected: every part was made to fit)
            return _final(code, "", counts)

    def _sent(self, model: str) -> None:
        """The request has gone on the main association: a C-CANCEL may follow it now.
        A cancel that came while no request was in flight (before this one, or between
        a request and its retry) sent nothing (`cancel()` looks at `_model`): it goes now.
        """
        with self._lock:
            self._model = model
        if self._cancel.is_set():
            self.cancel()

    def _spare_was_stale(self, final: FinalResponse) -> bool:
        """The spare association had ended at the PACS before our request reached it: no
        answer and nothing received. Then the request goes again on a new association."""
        stale = (
            self._took_spare
            and not self._answered
            and final.status == st.PACS_NO_RESPONSE
            and self.intake.instances == 0
            and not self._cancel.is_set()
            and not self._aborted.is_set()
        )
        self._took_spare = False
        if stale:
            log.info("the spare association had ended; associating again")
        return stale

    def _counted(self, given: bool) -> None:
        """The PACS's first pending response had a count, or not: remember which, and
        without one, start the survey for the viewer's fallback at once."""
        if self.memory is not None:
            self.memory.note_counts(self.pacs.retrieve, given=given)
        if not given and self._estimate_useful():
            self._survey_now()

    # -- survey -------------------------------------------------------------------------

    def _wants_estimate(self) -> bool:
        """Whether to survey beside the retrieve from its start, for the viewer's fallback
        count: worth a study's C-FIND (0.4 s of CPU for 200 instances, at the PACS and
        here) unless this PACS's retrieves have been reporting their counts."""
        if self.memory is not None and self.memory.counts_given(self.pacs.retrieve):
            return False
        return self._estimate_useful()

    def _estimate_useful(self) -> bool:
        """Not for a headers-only retrieve (its reader uses the final counts) or one
        instance (a viewport's, retrieved ahead)."""
        if not self.estimate or self._survey_for is None:
            return False
        level = str(self._survey_for[1].get("QueryRetrieveLevel", "")).strip().upper()
        return level != "IMAGE"

    def _survey_now(self) -> None:
        """Start the survey beside the retrieve, unless one has started."""
        if self._beside is None and self._survey_for is not None:
            self._survey_beside(*self._survey_for)

    def _survey_beside(self, find_model: str, identifier: Dataset) -> _Beside | None:
        """Start the study's survey on its own association and thread, if configured."""
        if not self.pacs.survey:
            return None
        beside = _Beside(self, find_model, identifier)
        with self._lock:
            self._beside = beside
        beside.start()
        return beside

    def _survey(
        self,
        assoc: Association,
        find_model: str,
        identifier: Dataset,
        stopped: threading.Event,
        gate: survey_mod.QueryGate,
    ) -> Pending | None:
        """Survey the study, if the PACS lets us; what to tell the workstation of it."""
        try:
            survey = survey_mod.walk(
                assoc,
                find_model,
                identifier,
                timeout=self.pacs.timeout,
                stopped=stopped,
                gate=gate,
            )
        except Exception as exc:
            # Only the type: pydicom's and pynetdicom's texts may quote the query's values.
            log.info("survey failed, retrieving without it: %s", type(exc).__name__)
            survey = None
        if survey is None or stopped.is_set():
            return None
        self.survey = survey
        if self.memory is not None:
            self.memory.remember(survey)
        if survey.count == 0:
            return None
        limit = self.codec.limits.max_list
        return Pending(
            remaining=min(survey.count, MAX_COUNT),
            completed=0,
            failed=0,
            warning=0,
            sop_classes=tuple(survey.sop_classes[:limit]),
            transfer_syntaxes=tuple(survey.transfer_syntaxes[:limit]),
            estimate=True,
        )


class _Beside:
    """One survey running beside its retrieve; `finish()` ends it and returns its result.

    Its estimate cannot follow the operation's final response: `finish` (always called
    before that is queued) stops it under the lock the estimate is queued with. Only the
    survey's own thread ends its association (survey.QueryGate): `finish` C-CANCELs the
    C-FIND in flight instead.
    """

    def __init__(self, op: PacsOperation, find_model: str, identifier: Dataset) -> None:
        self.op = op
        self.find_model = find_model
        self.identifier = identifier
        self.stop = threading.Event()
        self.gate = survey_mod.QueryGate()
        self._assoc: Association | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="dicom-survey", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        assoc = self.op._associate([build_context(self.find_model)], main=False)
        if isinstance(assoc, FinalResponse):
            log.info("survey skipped: %s", assoc.comment)
            return
        with self._lock:
            self._assoc = assoc
        try:
            estimate = None
            if not self.stop.is_set():
                estimate = self.op._survey(
                    assoc, self.find_model, self.identifier, self.stop, self.gate
                )
            if estimate is not None:
                try:  # the estimate is only a fallback: one the stream cannot carry is left out
                    self.op.codec.validate(estimate)
                except DicomProtocolError as exc:  # (its text names no UID)
                    log.info("survey estimate left out: %s", exc)
                    estimate = None
            with self._lock:  # finish() stops us under it: nothing is queued after that
                if estimate is not None and not self.stop.is_set():
                    self.op.out.put_sync(estimate, 0)  # an estimate never waits for room
        except (ChannelClosed, TimeoutError):
            pass  # the stream is gone or full: the estimate is only a fallback
        finally:
            with self._lock:
                self._assoc = None
            _end(assoc, abort=self.stop.is_set())

    def finish(self, *, wait: bool) -> Survey | None:
        """With `wait`, the survey once done (None if it failed or took longer than the
        PACS timeout). Without, stopped at once and not waited for: a C-FIND in flight is
        cancelled (one with thousands of matches would otherwise run on) and the survey's
        thread ends its association; one still associating must not hold up the
        operation's end."""
        if wait:
            self._thread.join(self.op.pacs.timeout + 1)
        with self._lock:  # nothing is queued once stopped
            self.stop.set()
            assoc = self._assoc
        self.gate.stop(None if wait else assoc, self.find_model)  # no more C-FINDs
        return self.op.survey if wait else None


def remembered_storage(memory: StorageMemory | None, used: int) -> list[Any]:
    """Storage contexts for a C-GET that starts before its survey: what this PACS's
    recent studies held first, then the common classes and syntaxes.

    Once those studies are known, at most FIRST_CONTEXTS: each proposed context costs
    association time at both ends (127 took 40-60 ms against a pynetdicom PACS, before
    the first instance), and a study that needs one not proposed is retrieved again
    with its own (`PacsOperation._retrieve`)."""
    known = memory.classes() if memory else []
    classes = [*known, *contexts.COMMON_STORAGE] if known else []
    syntaxes = memory.syntaxes() if memory else []
    budget = contexts.MAX_CONTEXTS - used
    if known:
        budget = min(budget, FIRST_CONTEXTS)
    return contexts.storage_proposals(classes, syntaxes, budget=budget)


def spare_contexts(pacs: PacsTarget, memory: StorageMemory | None) -> tuple[list[Any], list[Any]]:
    """Contexts (and role selections) of a spare association for whatever query or
    retrieve comes next: both roots' find and retrieve models and, for C-GET, the storage
    contexts a retrieve would propose now."""
    base = [build_context(contexts.MODELS[(root, op)])
            for root in ("study", "patient") for op in (pacs.retrieve, "find")]  # fmt: skip
    storage = remembered_storage(memory, len(base)) if pacs.retrieve == "get" else []
    return [*base, *storage], scp_roles(storage)


def backlog(assoc: Association) -> int:
    """DIMSE messages received on `assoc` that pynetdicom holds, not yet taken."""
    try:
        return int(assoc.dimse.msg_queue.qsize())
    except Exception:  # (an association without its DIMSE provider: nothing held)
        return 0


def clean_text(value: object, limit: int) -> str:
    """A PACS's free text (an Error Comment) as a FINAL can carry it: printable
    characters only (no control characters, no lone surrogates that would not encode),
    at most `limit` of them."""
    text = str(value) if value is not None else ""
    return "".join(ch for ch in text if ch.isprintable())[:limit]


def clean_uids(values: object, limit: int) -> tuple[str, ...]:
    """A PACS's Failed SOP Instance UID List as a FINAL can carry it: values that are
    not DICOM UIDs (over 64 characters, not digits and dots) dropped (the failed count
    stays the PACS's), at most `limit` of them."""
    items = [values] if isinstance(values, str) else list(values or ())  # type: ignore[call-overload]
    return tuple(u for u in (str(v).strip("\x00 ") for v in items) if is_uid(u))[:limit]


def _abort(assoc: Association) -> None:
    """A-ABORT `assoc` (blocking, for at most about `ending.ABORT_LINGER`: a PACS that
    keeps the connection is cut), then wake a thread waiting on it for the next message:
    pynetdicom does not when *we* abort; (None, None) is what it returns for an aborted
    association."""
    try:
        abort_within(assoc)
    except Exception as exc:
        log.debug("A-ABORT failed: %s", exc)
    _wake_waiter(assoc)


def _wake_waiter(assoc: Association) -> None:
    """Put the (None, None) that ends a wait for `assoc`'s next message, once its reactor
    thread has ended. pynetdicom's kill() (the abort's end) restarts that paused reactor
    for one last turn, which takes a waiting message without blocking and drops a
    (None, None): when it was scheduled late, it took our wake-up, and the operation's
    thread (a C-GET or C-MOVE awaiting its next response) waited out the whole DIMSE
    timeout (pacs.timeout + stall_timeout), holding its stream, before ending."""
    with contextlib.suppress(Exception):  # (never started, or it is our own thread)
        if assoc is not threading.current_thread():
            assoc.join(STOP_JOIN)
    with contextlib.suppress(Exception):
        assoc.dimse.msg_queue.put((None, None))


def _end(assoc: Association, *, abort: bool) -> None:
    """Release (or abort) an association that is not the operation's main one."""
    if abort or not assoc.is_established:
        _abort(assoc)
        return
    try:
        assoc.release()
    except Exception as exc:
        log.debug("survey association not ended cleanly: %s", exc)


def _syntax_refused(assoc: Association, req: Request) -> FinalResponse | None:
    """An upload that no context the PACS accepted for its SOP class can carry (it took
    another: an uncompressed one, proposed beside the upload's): 0xC0F2, which a viewer
    does not retry, as it would "out of resources" (the PACS would refuse it every
    time). pynetdicom converts between uncompressed syntaxes of one byte order (deflated
    too); a compressed one goes only as it is: the relay does not transcode pixels."""
    taken = [
        UID(str(cx.transfer_syntax[0]))
        for cx in assoc.accepted_contexts
        if str(cx.abstract_syntax) == req.sop_class and cx.transfer_syntax
    ]
    ts = UID(req.transfer_syntax)
    if not taken or any(_carries(cx, ts) for cx in taken):
        return None  # (none at all: the SOP class is refused, 0x0122)
    return FinalResponse(st.STORE_SYNTAX_NOT_ACCEPTED, f"PACS does not accept transfer syntax {ts}")


def _carries(context: UID, ts: UID) -> bool:
    """Whether pynetdicom sends a dataset in `ts` on a context of syntax `context`
    (its Association._get_valid_context: the same, or both uncompressed and of one
    byte order)."""
    if context == ts:
        return True
    if context.is_compressed or ts.is_compressed:
        return False
    return bool(context.is_little_endian == ts.is_little_endian)


def _retry_worthy(final: FinalResponse) -> bool:
    """A retrieve some of whose sub-operations failed: maybe for want of a context."""
    return bool(final.failed) and final.status not in (st.LINK_LOST, st.CANCEL)


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
