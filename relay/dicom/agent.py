"""Agent side of DICOM through the relay: serve one stream against the PACS.

`serve_dicom_stream()` reads the one request on a stream, runs it as a `PacsOperation` on a
thread (pynetdicom blocks), and writes what that thread produces to the stream as it comes.
Meanwhile it listens to the stream: a Cancel message sends C-CANCEL to the PACS; a reset or
an early end of the stream aborts the PACS association. Every wait is bounded: the PACS by
`pacs.timeout`, the workstation reading our output by `pacs.stall_timeout`.

`DicomAgent` bundles that with the long-lived C-MOVE receiver for `retrieve: move`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from relay.codecs.choice import ZSTD
from relay.dicom import contexts, headers_only, rawds
from relay.dicom import status as st
from relay.dicom.bridge import Channel, ChannelClosed
from relay.dicom.codec import (
    Cancel,
    DicomLimits,
    DicomProtocolError,
    ErrorMessage,
    FinalResponse,
    IdentifierTooLarge,
    Instance,
    Message,
    MessageCodec,
    MessageType,
    Pending,
    Request,
    Skip,
    UnexpectedMessage,
    read_message,
    write_message,
)
from relay.dicom.encoder import (
    MIN_PIXELS_BYTES,
    Encoded,
    RateBook,
    StreamEncoder,
    offered_codecs,
    shared_pool,
)
from relay.dicom.ending import ABORT_LINGER, OpenAssociations
from relay.dicom.intake import MoveReceiver, MoveSenders
from relay.dicom.pace import MIN_REQUEST_RATE, PacedReader
from relay.dicom.pacs_echo import end_echoes
from relay.dicom.pacs_ops import PacsOperation
from relay.dicom.pacs_target import PacsTarget
from relay.dicom.spare import SpareAssociation
from relay.dicom.stats import DicomStats, NullStats
from relay.dicom.survey import StorageMemory
from relay.dicom.uidset import UidSet
from relay.dicom.uploads import UploadBudget, UploadBudgetFull, inflated_size
from relay.net.bytestream import ByteStream, StreamResetError
from relay.proto.errors import ErrorCode
from relay.wire import DICOM_CONTENT_HEADERS, HEADER_DICOM_CONTENT, HEADER_DICOM_PIXELS

log = logging.getLogger(__name__)

RESET_CANCEL = int(ErrorCode.CANCEL)  # how we abandon a stream
_AUDIT_KEYS = (
    "QueryRetrieveLevel", "PatientID", "AccessionNumber",
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
)  # fmt: skip
# Bodies at least this big are encoded on a worker thread (zstd takes ~0.1 ms per 64 KiB);
# an instance that may get a pixel codec (`_heavy`) is from encoder.MIN_PIXELS_BYTES on.
_OFFLOAD = 64 * 1024


class RequestKeys:
    """A request's audit keys, worked out once (at its begin) for every summary of it,
    within the codec's limits: a device's deflated dataset is inflated at most to
    `max_dataset` (an instance) or `max_identifier` (an identifier)."""

    def __init__(self, request: Request, limits: DicomLimits) -> None:
        self.request = request
        self.limits = limits
        self._keys: dict[str, str] | None = None
        self._lock = threading.Lock()

    def get(self) -> dict[str, str]:
        with self._lock:
            if self._keys is None:
                self._keys = _request_keys(self.request, self.limits)
            return dict(self._keys)


def _request_keys(req: Request, limits: DicomLimits) -> dict[str, str]:
    """What the request was about: level and UIDs (see `OperationSummary.keys`)."""
    if req.op == "store":
        keys = {"SOPClassUID": req.sop_class, "SOPInstanceUID": req.sop_instance}
        try:
            found = rawds.check_dataset(
                req.dataset, req.transfer_syntax, capture=rawds.AUDIT_TAGS,
                max_inflated=limits.max_dataset,
            )  # fmt: skip
        except rawds.MalformedDataset:
            return keys
        return {**{k: v[:1024] for k, v in found.items() if v}, **keys}
    if req.op == "echo" or not req.dataset:
        return {}
    try:
        data, ts = rawds.readable(req.dataset, req.transfer_syntax, limits.max_identifier)
        ds = rawds.decode_dataset(data, ts)
        return {kw: str(ds.get(kw, ""))[:1024] for kw in _AUDIT_KEYS if ds.get(kw)}
    except Exception:
        return {}


@dataclass(frozen=True)
class OperationSummary:
    """What happened on one stream, for the audit trail (PS3.15) and logs."""

    op: str  # echo, find, get, move, store, "invalid", or "refused" (no slot free)
    status: int
    comment: str
    seconds: float
    instances: int = 0  # completed: sent to the workstation, or (store) stored by the PACS
    calling_ae: str = ""
    cancelled: bool = False
    request: Request | None = None
    failed: int = 0
    warning: int = 0
    request_keys: RequestKeys | None = None  # the agent's: shared by the stream's summaries

    def keys(self) -> dict[str, str]:
        """What the request was about, for the audit trail (PS3.15): level and UIDs.

        Patient identifiers appear here; they belong in the agent's audit log only.
        """
        if self.request is None:
            return {}
        if self.request_keys is not None:
            return self.request_keys.get()
        return _request_keys(self.request, DicomLimits())


@dataclass(frozen=True)
class Refused:
    """What a stream that did not start with what it must got: status and reason."""

    status: int
    reason: str


_First = TypeVar("_First", Request, Skip)
_TYPES: dict[type[Message], MessageType] = {Request: MessageType.REQUEST, Skip: MessageType.SKIP}


async def _expect(
    stream: PacedReader, codec: MessageCodec, kind: type[_First], what: str
) -> _First | Refused:
    """The next message, which must be a `kind` (the request, the skip list), at the
    stream's pace (pace.py: a stall limit and a minimum rate); anything else is refused
    on the stream (where it can still be heard) from its first bytes, its body unread: a
    device's message is decoded only once it is what may come (and an upload's big body
    off the loop)."""
    try:
        msg = await read_message(stream, codec, offload=True, expect=(_TYPES[kind],))
    except IdentifierTooLarge as exc:  # not the stream's fault: the viewer's request's
        await _refuse(stream, codec, str(exc), st.BAD_IDENTIFIER)
        return Refused(st.BAD_IDENTIFIER, str(exc))
    except (DicomProtocolError, TimeoutError) as exc:
        if isinstance(exc, UnexpectedMessage):
            reason = f"expected the {what}, got {exc.got.name.title()}"
        else:
            reason = str(exc) or f"no {what} within the timeout"
        await _refuse(stream, codec, reason)
        return Refused(st.RELAY_PROTOCOL, reason)
    except StreamResetError:
        return Refused(st.LINK_LOST, f"stream reset before the {what}")
    except UploadBudgetFull as exc:  # the agent's limit: "busy", as the dispatcher's caps
        log.warning("DICOM request refused: %s", exc)
        stream.reset(ErrorCode.LIMIT_EXCEEDED)
        return Refused(st.AGENT_BUSY, str(exc))
    if msg is None:
        with contextlib.suppress(StreamResetError):
            await stream.write_eof()
        return Refused(st.LINK_LOST, f"stream closed before the {what}")
    if not isinstance(msg, kind):
        reason = f"expected the {what}, got {type(msg).__name__}"
        await _refuse(stream, codec, reason)
        return Refused(st.RELAY_PROTOCOL, reason)
    return msg


async def _skip_list(stream: PacedReader, codec: MessageCodec) -> UidSet | Refused:
    """A resumed retrieve's skip list, as the digests the retrieve holds (uidset.py): its
    message (up to `max_skip` UIDs as strings, ~8 MiB) is let go once read, not held for
    as long as the retrieve runs; hashed off the loop (~1 us a UID)."""
    got = await _expect(stream, codec, Skip, "skip list")
    if isinstance(got, Refused):
        return got
    return await asyncio.to_thread(UidSet.of, got.uids)


async def serve_dicom_stream(
    stream: ByteStream,
    pacs: PacsTarget,
    *,
    stats: DicomStats | None = None,
    limits: DicomLimits | None = None,
    move_receiver: MoveReceiver | None = None,
    on_request: Callable[[OperationSummary], None] | None = None,
    rates: RateBook | None = None,
    memory: StorageMemory | None = None,
    spare: SpareAssociation | None = None,
    associations: OpenAssociations | None = None,
    admit: Callable[[], bool] | None = None,
    min_rate: float = MIN_REQUEST_RATE,
    uploads: UploadBudget | None = None,
    device: str = "",
) -> OperationSummary:
    """Serve the DICOM request on `stream` against `pacs`; returns once the stream is done.

    `rates`: what earlier streams learned about the pixel codecs (the agent keeps one);
    `memory`: the SOP classes and syntaxes earlier surveys found at the PACS (likewise);
    `spare`: the association left open by an earlier request (likewise);
    `associations`: every association with the PACS open, ended at the agent's stop
    (likewise).

    `on_request` sees the request as soon as it is read, before the PACS is contacted
    (the audit trail's "transfer begins").

    The request (and a resumed retrieve's skip list) is read at a pace: no read waits
    more than `pacs.timeout`, and the bytes keep `min_rate` after that (pace.py). Only
    once it is wholly read does `admit` (the dispatcher's `admit_request`) take one of
    the site's operation slots; refused (False: it has reset the stream with
    LIMIT_EXCEEDED), the PACS is not contacted. `uploads`: the bytes of requests the
    agent holds, charged for `device` as they come and given back when this returns
    (past it, the stream is reset with LIMIT_EXCEEDED).
    """
    paced = PacedReader(stream, pacs.timeout, min_rate, budget=uploads, device=device)
    try:
        return await _serve(
            stream, paced, pacs, stats=stats, limits=limits, move_receiver=move_receiver,
            on_request=on_request, rates=rates, memory=memory, spare=spare,
            associations=associations, admit=admit,
        )  # fmt: skip
    finally:
        paced.release()


async def _serve(
    stream: ByteStream,
    paced: PacedReader,
    pacs: PacsTarget,
    *,
    stats: DicomStats | None,
    limits: DicomLimits | None,
    move_receiver: MoveReceiver | None,
    on_request: Callable[[OperationSummary], None] | None,
    rates: RateBook | None,
    memory: StorageMemory | None,
    spare: SpareAssociation | None,
    associations: OpenAssociations | None,
    admit: Callable[[], bool] | None,
) -> OperationSummary:
    """serve_dicom_stream, its request read through `paced`."""
    stats = stats or NullStats()
    codec = MessageCodec(limits, level=pacs.compression_level, stats=stats)
    started = time.monotonic()

    def summary(op: str, status: int, comment: str, **kw: object) -> OperationSummary:
        return OperationSummary(op, status, comment, time.monotonic() - started, **kw)  # type: ignore[arg-type]

    msg = await _expect(paced, codec, Request, "request")
    if isinstance(msg, Refused):
        return summary("refused" if msg.status == st.AGENT_BUSY else "invalid", msg.status,
                       msg.reason)  # fmt: skip
    try:
        paced.hold(len(msg.dataset))  # decoded, it may be far more than came
        deflated = msg.op == "store" and rawds.ts_encoding(msg.transfer_syntax)[2]
        if deflated and paced.budget is not None:
            # ...and a deflated one its inflated copy besides, while it is checked
            limit = codec.limits.max_dataset
            inflated = await asyncio.to_thread(inflated_size, msg.dataset, limit)
            paced.hold(len(msg.dataset) + inflated)
    except UploadBudgetFull as exc:
        log.warning("DICOM request refused: %s", exc)
        stream.reset(ErrorCode.LIMIT_EXCEEDED)
        return summary("refused", st.AGENT_BUSY, str(exc))
    keys = RequestKeys(msg, codec.limits)
    skip: UidSet | None = None
    if msg.resume:
        # A resumed retrieve: the instances the viewer already has come next.
        got = await _skip_list(paced, codec)
        if isinstance(got, Refused):
            return summary("refused" if got.status == st.AGENT_BUSY else "invalid",
                           got.status, got.reason)  # fmt: skip
        skip = got
        log.info("resuming a retrieve: %d instances already delivered", len(skip))
    if admit is not None and not admit():
        return summary("refused", st.AGENT_BUSY, "the agent's PACS operations are all taken")
    if on_request is not None:
        # The audit keys it will ask for, worked out off the loop: a store's are read from
        # its dataset (a deflated one inflated: 512 MiB of zeros held the loop seconds).
        await asyncio.to_thread(keys.get)

    loop = asyncio.get_running_loop()
    out: Channel[Message] = Channel(loop, codec.limits.queue_depth)
    strip = stream.headers.get(HEADER_DICOM_CONTENT) == DICOM_CONTENT_HEADERS
    op = PacsOperation(
        pacs, msg, codec, out, stats=stats, move_receiver=move_receiver, skip=skip,
        memory=memory, estimate=not strip, spare=spare, associations=associations,
    )  # fmt: skip
    if on_request is not None:
        on_request(summary(op.op_name, 0xFF00, "started", calling_ae=msg.calling_ae,
                           request=msg, request_keys=keys))  # fmt: skip
    thread = threading.Thread(target=op.run, name=f"dicom-{op.op_name}", daemon=True)
    thread.start()
    watcher = asyncio.create_task(_watch(stream, codec, op, out))
    try:
        offered = offered_codecs(stream.headers.get(HEADER_DICOM_PIXELS), pacs.allowed_codecs)
        encoder = StreamEncoder(
            codec, offered, pacs.codec_workers, rates, adaptive=pacs.pixel_codecs == "auto",
        )  # fmt: skip
        taken = await _pump(stream, codec, out, op, pacs.stall_timeout, encoder, strip=strip)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        if op.final is None:
            op.abort()
        out.abort("stream finished")
        await asyncio.to_thread(thread.join, pacs.timeout + pacs.stall_timeout)
    final = op.final or FinalResponse(st.LINK_LOST, "operation did not finish")
    instances = op.instances
    if taken is not None:
        # The workstation did not take every answer (it stopped reading, or reset): what
        # the PACS finished is not what the device got, and the audit trail says so.
        final = FinalResponse(st.LINK_LOST, f"the stream ended early: {taken.why}")
        instances = min(instances, taken.instances)
    return summary(
        op.op_name,
        final.status,
        final.comment,
        instances=instances,
        calling_ae=msg.calling_ae,
        cancelled=op.cancel_sent.is_set(),
        request=msg,
        failed=op.failed,
        warning=op.warnings,
        request_keys=keys,
    )


@dataclass(frozen=True)
class _Cut:
    """How a pump that did not write everything ended: why, and the instances written."""

    why: str
    instances: int


async def _pump(  # noqa: PLR0917  (one stream's parts, all needed)
    stream: ByteStream,
    codec: MessageCodec,
    out: Channel[Message],
    op: PacsOperation,
    stall_timeout: float,
    encoder: StreamEncoder,
    *,
    strip: bool = False,
) -> _Cut | None:
    """Encode and write what the operation produces, in order; end the stream after it.
    None once all is written, else how it was cut.

    `strip`: instances go without their Pixel Data value (`dicom-content: headers`).

    Big messages are encoded on the encoder's pool, up to `encoder.choice.workers` at a
    time, while earlier ones are written: the pump holds at most `encoder.workers + 1`
    messages (being encoded, encoded and waiting, being written); before, it held one.
    """
    loop = asyncio.get_running_loop()
    pool = shared_pool(encoder.workers)
    # each encoding, and whether it is an instance (counted once written)
    ready: asyncio.Queue[tuple[asyncio.Future[Encoded], bool] | None] = asyncio.Queue()
    slots = asyncio.Semaphore(encoder.workers + 1)

    async def produce() -> None:
        running: set[asyncio.Future[Encoded]] = set()
        while True:
            await slots.acquire()
            try:
                msg = await out.get()
            except ChannelClosed:
                break
            if strip and isinstance(msg, Instance):
                msg = headers_only.strip_instance(msg)
            if _heavy(msg, encoder):
                # zstd and the pixel codecs release the GIL: encode off the loop,
                # alongside the PACS transfer and the writes of earlier instances, with
                # as many workers as the current choice wants.
                running = {f for f in running if not f.done()}
                while len(running) >= encoder.choice.workers:
                    _, pending = await asyncio.wait(running, return_when="FIRST_COMPLETED")
                    running = set(pending)
                fut = loop.run_in_executor(pool, encoder.encode, msg)
                running.add(fut)
            else:
                fut = loop.create_future()
                try:
                    fut.set_result(encoder.encode(msg))
                except DicomProtocolError as exc:
                    fut.set_exception(exc)
            await ready.put((fut, isinstance(msg, Instance)))
        await ready.put(None)

    producer = asyncio.create_task(produce())
    written, every = 0, False  # instances written; whether every answer was
    try:
        while True:
            item = await ready.get()
            if item is None:
                break
            fut, instance = item
            result = await fut
            encoder.encoded(result)
            started = time.monotonic()
            async with asyncio.timeout(stall_timeout):
                await stream.write(result.frame)
            encoder.written(result, time.monotonic() - started)
            written += instance
            slots.release()
        every = True  # every answer is written: a failing half-close takes nothing away
        async with asyncio.timeout(stall_timeout):
            await stream.write_eof()
    except (StreamResetError, TimeoutError, DicomProtocolError) as exc:
        log.info("DICOM stream ended early (%s): aborting the PACS operation", type(exc).__name__)
        op.abort()
        out.abort("stream lost")
        if not isinstance(exc, StreamResetError):
            stream.reset(RESET_CANCEL)
        why = {
            StreamResetError: "the workstation reset it",
            TimeoutError: f"the workstation took nothing for {stall_timeout:g} s",
        }.get(type(exc), "an answer could not be encoded")
        return None if every else _Cut(why, written)
    finally:
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await producer
        encoder.finish()
        if encoder.counts:
            log.info("instances sent per codec: %s", encoder.counts)
    return None


def _heavy(msg: Message, encoder: StreamEncoder) -> bool:
    """Whether encoding `msg` may take long enough to hold up the event loop: a big
    body, or an instance the encoder's current choice would encode with an image codec
    (3-5 ms for 16-64 KiB of pixels). Small messages stay inline: a thread hop costs
    more than their zstd."""
    if not isinstance(msg, (Instance, Pending)):
        return False
    size = len(msg.dataset)
    if size >= _OFFLOAD:
        return True
    return isinstance(msg, Instance) and size >= MIN_PIXELS_BYTES and encoder.choice.codec != ZSTD


async def _watch(
    stream: ByteStream, codec: MessageCodec, op: PacsOperation, out: Channel[Message]
) -> None:
    """Read what the workstation sends during the operation: only Cancel is expected
    (anything else is refused from its first bytes, unread, and abandons the operation)."""
    try:
        while True:
            msg = await read_message(stream, codec, expect=(MessageType.CANCEL,))
            if isinstance(msg, Cancel):
                await asyncio.to_thread(op.cancel)
                continue
            if msg is None and op.final is not None:
                return  # the workstation closed after our final: normal end
            # An early end, or anything but Cancel: the workstation has given up.
            log.info("workstation abandoned the DICOM operation")
            op.abort()
            out.abort("workstation gone")
            return
    except (StreamResetError, DicomProtocolError):
        op.abort()
        out.abort("stream lost")


async def _refuse(
    stream: ByteStream, codec: MessageCodec, reason: str, status: int = st.RELAY_PROTOCOL
) -> None:
    """Tell the workstation why, then close; never raises. A protocol error comes with
    an ERROR message first; any other `status` is the operation's own failure."""
    reason = reason[: codec.limits.max_text]
    try:
        async with asyncio.timeout(5):
            if status == st.RELAY_PROTOCOL:
                await write_message(stream, codec, ErrorMessage(reason))
            await write_message(stream, codec, FinalResponse(status, reason))
            await stream.write_eof()
    except (StreamResetError, TimeoutError, DicomProtocolError):
        stream.reset(RESET_CANCEL)


class DicomAgent:
    """The agent's DICOM service: serves streams, owns the C-MOVE receiver if configured."""

    def __init__(
        self,
        pacs: PacsTarget,
        *,
        stats: DicomStats | None = None,
        limits: DicomLimits | None = None,
    ) -> None:
        self.pacs = pacs
        self.stats = stats or NullStats()
        self.limits = limits or DicomLimits()
        self.move_receiver: MoveReceiver | None = None
        self.rates = RateBook()
        self.memory = StorageMemory()
        self.associations = OpenAssociations()  # with the PACS, ended at stop
        self.spare = SpareAssociation(pacs.spare_association, associations=self.associations)
        self.uploads = UploadBudget()  # the bytes of devices' requests held

    async def start(self) -> None:
        contexts.prepare_pynetdicom()
        if self.pacs.retrieve == "move" and self.move_receiver is None:
            listen = self.pacs.move_listen
            assert listen is not None  # PacsTarget sets it for retrieve: move
            receiver = MoveReceiver(
                self.pacs.move_ae_title,
                (listen.host, listen.port),
                timeout=self.pacs.timeout,
                stall_timeout=self.pacs.stall_timeout,
                senders=MoveSenders.for_pacs(self.pacs),  # the PACS only (intake.py)
                max_dataset=self.limits.max_dataset,
            )
            await asyncio.to_thread(receiver.start)
            self.move_receiver = receiver

    async def stop(self) -> None:
        """End every association with the PACS within a bound, whatever the PACS does:
        the spare is released (given `ABORT_LINGER` for the PACS's answer), then what is
        left, an operation the drain cut, one being requested or still connecting, the
        C-MOVE receiver's, the readiness C-ECHO's, is aborted and cut, together
        (`ending.end_all`). pynetdicom's connection threads are not daemons: one left
        to a PACS that does not let go, or does not answer the connect, held the
        process's exit."""
        releasing = threading.Thread(target=self.spare.close, name="pacs-spare-close", daemon=True)
        releasing.start()
        await asyncio.to_thread(releasing.join, ABORT_LINGER)
        if self.move_receiver is not None:
            await asyncio.to_thread(self.move_receiver.stop)
            self.move_receiver = None
        ended = sum(
            await asyncio.gather(
                asyncio.to_thread(self.associations.end_all), asyncio.to_thread(end_echoes)
            )
        )
        if ended:
            log.info("ended %d PACS associations still open at stop", ended)

    async def __aenter__(self) -> DicomAgent:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def serve(
        self,
        stream: ByteStream,
        on_request: Callable[[OperationSummary], None] | None = None,
        admit: Callable[[], bool] | None = None,
        device: str = "",
    ) -> OperationSummary:
        return await serve_dicom_stream(
            stream,
            self.pacs,
            stats=self.stats,
            limits=self.limits,
            move_receiver=self.move_receiver,
            on_request=on_request,
            rates=self.rates,
            memory=self.memory,
            spare=self.spare,
            associations=self.associations,
            admit=admit,
            uploads=self.uploads,
            device=device,
        )
