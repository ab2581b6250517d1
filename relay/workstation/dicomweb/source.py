"""DICOM operations for the DICOMweb server: C-FIND, retrieve and C-STORE through the relay.

Each operation is one stream to the agent over the sealed session, spoken with the
relay's DICOM message codec directly on the event loop (as the cache's StudyFetcher does;
no pynetdicom on this side). Every wait is bounded by `timeout` without progress. With
the link down, C-FIND is answered from the cache's index (as the DICOM node does).

Failures become `UpstreamError` with the HTTP status to answer: 502 when the PACS or the
relay path failed (with the reason), 504 when nothing came in time, 404 for no match.
A retrieve whose final response does not vouch for every instance (a failed
sub-operation, or a count of them missing: 0xB000 so, 0xA702 after some completed) fails
with 502 after the instances that came (`retrieve_failure`): nothing half-received is
served as complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from relay.dicom import rawds
from relay.dicom import status as st
from relay.dicom.codec import (
    VERSION,
    ErrorMessage,
    FinalResponse,
    Instance,
    MessageCodec,
    Pending,
    PixelMismatchError,
    Request,
    read_message,
    write_message,
)
from relay.dicom.offer import CodecOffer
from relay.dicom.session import OpenStream, end_stream
from relay.net.bytestream import ByteStream, StreamResetError
from relay.proto import Priority
from relay.wire import (
    DICOM_CONTENT_HEADERS,
    HEADER_DICOM_CONTENT,
    HEADER_DICOM_VERSION,
    HEADER_PRIORITY,
    HEADER_TARGET,
    TARGET_DICOM,
)
from relay.workstation import priorities
from relay.workstation.cache.serve import CacheServer
from relay.workstation.tunnel import TunnelOffline

__all__ = [
    "MAX_AGENT_FINDS",
    "MAX_AGENT_STORES",
    "DicomSource",
    "FindResult",
    "UpstreamError",
    "retrieve_failure",
]

log = logging.getLogger(__name__)

CALLING_AE: Final = "RELAYWEB"  # the audit trail's name for the browser's requests
_REASONS: Final = {
    st.PACS_UNREACHABLE: "the PACS is unreachable",
    st.PACS_REFUSED: "the PACS refused the association",
    st.PACS_NO_RESPONSE: "the PACS did not answer",
    st.LINK_LOST: "the relay link was lost",
    st.RELAY_UNSUPPORTED: "the agent cannot do this",
    st.AGENT_BUSY: "the agent is busy",
}


# Operations towards the agent at once (each is a relay stream and a PACS association):
# a burst of browser requests waits AGENT_QUEUE_WAIT for a slot, then is refused (503).
# Retrievals are bounded by the retriever's flights (retrieve.MAX_FLIGHTS).
MAX_AGENT_FINDS: Final = 8
MAX_AGENT_STORES: Final = 4
AGENT_QUEUE_WAIT: Final = 5.0  # s


class UpstreamError(Exception):
    """An operation failed; `http_status` says how to answer, `reason` why (no patient data);
    `retry_after`: a 503's Retry-After when it is known (offline: the next reconnect)."""

    def __init__(self, http_status: int, reason: str, retry_after: int | None = None) -> None:
        super().__init__(reason)
        self.http_status = http_status
        self.reason = reason
        self.retry_after = retry_after


@dataclass
class FindResult:
    matches: list[Dataset]
    from_cache: bool = False
    truncated: bool = False


def _failure(final: FinalResponse, what: str) -> UpstreamError:
    """502 (the PACS or the path failed), or 503 when the agent refused the operation for
    its limits (st.AGENT_BUSY): the viewer may try again shortly (Retry-After)."""
    reason = _REASONS.get(final.status, f"{what} failed with status 0x{final.status:04X}")
    if final.comment:
        reason = f"{reason}: {final.comment}"
    return UpstreamError(503 if final.status == st.AGENT_BUSY else 502, reason)


def retrieve_failure(final: FinalResponse) -> UpstreamError | None:
    """None when a retrieve's final response vouches for every instance (success with no
    failed sub-operation, or 0xB000 that counts none failed: warnings only); else the 502
    to end the retrieval with, after the instances that came."""
    if final.status == st.SUCCESS and not final.failed:
        return None
    if final.status == st.WARNING_SUBOPS and final.failed == 0:
        return None  # every sub-operation completed, some with warnings
    if final.status in (st.SUCCESS, st.WARNING_SUBOPS) or (
        final.status == st.SUBOPS_FAILED and final.completed
    ):
        told = (("completed", final.completed), ("failed", final.failed),
                ("with warnings", final.warning))  # fmt: skip
        counts = ", ".join(f"{n} {name}" for name, n in told if n is not None)
        reason = f"the retrieve ended incomplete (status 0x{final.status:04X}"
        reason += f"; {counts})" if counts else ")"
        if final.comment:
            reason = f"{reason}: {final.comment}"
        return UpstreamError(502, reason)
    return _failure(final, "the retrieve")


def _fewer_came(final: FinalResponse, came: int) -> UpstreamError | None:
    """The 502 for a final response that vouches for more instances than came (a PACS
    that counts what it did not send): the viewer must not take the rest as all."""
    if final.completed is None or came >= final.completed:
        return None
    return UpstreamError(
        502,
        f"the retrieve ended incomplete (status 0x{final.status:04X}; "
        f"{came} of {final.completed} completed instances came)",
    )


class DicomSource:
    """The relay's DICOM operations as coroutines; `cache` answers C-FIND offline."""

    def __init__(
        self,
        open_stream: OpenStream,
        codec: MessageCodec,
        *,
        timeout: float,
        cache: CacheServer | None = None,
        offer: CodecOffer | None = None,
    ) -> None:
        """`offer`: the pixel codecs to announce (the workstation's, shared by its paths)."""
        self.open_stream = open_stream
        self.codec = codec
        self.timeout = timeout
        self.cache = cache
        self.offer = offer or CodecOffer()
        self.offer.load()  # now, not in the browser's first request (numpy: ~60 ms)
        self.finds = asyncio.Semaphore(MAX_AGENT_FINDS)
        self.stores = asyncio.Semaphore(MAX_AGENT_STORES)
        self.queue_wait = AGENT_QUEUE_WAIT
        # A browser viewer's request is a viewer's own: the default urgency, ahead of prefetch.
        self.headers = {
            HEADER_TARGET: TARGET_DICOM,
            HEADER_DICOM_VERSION: str(VERSION),
            HEADER_PRIORITY: priorities.VIEWER.field(),
        }

    def offline(self) -> bool:
        return self.cache is not None and self.cache.offline()

    @contextlib.asynccontextmanager
    async def _slot(self, slots: asyncio.Semaphore, what: str) -> AsyncIterator[None]:
        """One of `slots` for the operation's time, waited for at most `queue_wait`."""
        try:
            async with asyncio.timeout(self.queue_wait):
                await slots.acquire()
        except TimeoutError:
            raise UpstreamError(503, f"too many {what} under way; try again") from None
        try:
            yield
        finally:
            slots.release()

    @contextlib.asynccontextmanager
    async def _stream(
        self, request: Request, headers_only: bool = False, priority: Priority | None = None
    ) -> AsyncIterator[tuple[ByteStream, list[bool]]]:
        """An open stream with `request` written; the flag list's [0] marks a clean end."""
        headers = {**self.offer.header(), **self.headers}
        if headers_only:
            headers[HEADER_DICOM_CONTENT] = DICOM_CONTENT_HEADERS
        if priority is not None:
            headers[HEADER_PRIORITY] = priority.field()
        try:
            async with asyncio.timeout(self.timeout):
                stream = await self.open_stream(headers)
                await write_message(stream, self.codec, request)
        except TimeoutError:
            raise UpstreamError(504, "no relay stream within the timeout") from None
        except TunnelOffline as exc:  # the link is known down: 503 and Retry-After, at once
            raise UpstreamError(503, str(exc), exc.retry_after) from None
        except (StreamResetError, OSError, ConnectionError) as exc:
            raise UpstreamError(502, f"relay link unavailable: {type(exc).__name__}") from None
        except Exception as exc:  # TunnelUnavailable and kin
            raise UpstreamError(502, f"relay link unavailable: {exc}") from None
        clean = [False]
        try:
            yield stream, clean
        finally:
            await end_stream(stream, clean[0])

    async def _next(self, stream: ByteStream) -> object:
        try:
            async with asyncio.timeout(self.timeout):
                msg = await read_message(stream, self.codec, offload=True)
        except TimeoutError:
            raise UpstreamError(504, "no answer from the agent within the timeout") from None
        except StreamResetError as exc:
            raise UpstreamError(502, f"relay stream reset (code {exc.code})") from None
        except PixelMismatchError as exc:
            self.offer.distrust(exc.codec)  # asked again, it comes without the codec
            raise UpstreamError(502, f"an instance failed its pixel check ({exc.codec})") from None
        except Exception as exc:
            raise UpstreamError(502, f"bad message from the agent: {type(exc).__name__}") from None
        if msg is None:
            raise UpstreamError(502, "the relay stream ended before the final response")
        if isinstance(msg, ErrorMessage):
            raise UpstreamError(502, f"the agent refused: {msg.reason}")
        return msg

    async def find(self, identifier: Dataset, max_matches: int, *, skip: int = 0) -> FindResult:
        """A study-root C-FIND: the matches after the first `skip` (counted, not decoded or
        kept), at most `max_matches` of them (`truncated`: more came); the link down and a
        cache: the cache's index answers."""
        if self.offline():
            assert self.cache is not None
            found = await asyncio.to_thread(self.cache.find, identifier)
            page = found[skip : skip + max_matches]
            return FindResult(page, True, len(found) > skip + max_matches)
        request = Request(
            op="find",
            root="study",
            transfer_syntax=ExplicitVRLittleEndian,
            dataset=rawds.encode_dataset(identifier),
            calling_ae=CALLING_AE,
        )
        result = FindResult([])
        passed = 0
        async with self._slot(self.finds, "queries"), self._stream(request) as (stream, clean):
            while True:
                msg = await self._next(stream)
                if isinstance(msg, Pending) and msg.dataset:
                    if passed < skip:
                        passed += 1
                    elif len(result.matches) < max_matches:
                        ds = rawds.decode_dataset(msg.dataset, msg.transfer_syntax)
                        result.matches.append(ds)
                    else:
                        result.truncated = True
                elif isinstance(msg, FinalResponse):
                    clean[0] = True
                    if msg.status not in (st.SUCCESS, st.CANCEL):
                        raise _failure(msg, "C-FIND")
                    return result

    async def retrieve(
        self,
        identifier: Dataset,
        outcome: list[FinalResponse] | None = None,
        *,
        headers_only: bool = False,
        priority: Priority | None = None,
    ) -> AsyncIterator[Instance]:
        """The instances of a retrieve identifier as they arrive (the PACS's bytes); the
        final response is appended to `outcome` (its counts decide cache completeness), then
        one that does not vouch for every instance raises (`retrieve_failure`).
        `headers_only`: ask the agent to leave each Pixel Data value out (headfirst.py);
        `priority`: the stream's, when not a viewer's default (priorities.py)."""
        request = Request(
            op="retrieve",
            root="study",
            transfer_syntax=ExplicitVRLittleEndian,
            dataset=rawds.encode_dataset(identifier),
            calling_ae=CALLING_AE,
        )
        came = 0
        async with self._stream(request, headers_only, priority) as (stream, clean):
            while True:
                msg = await self._next(stream)
                if isinstance(msg, Instance):
                    came += 1
                    yield msg
                elif isinstance(msg, FinalResponse):
                    clean[0] = True
                    if outcome is not None:
                        outcome.append(msg)
                    failure = retrieve_failure(msg) or _fewer_came(msg, came)
                    if failure is not None:
                        raise failure
                    return

    async def store(
        self, sop_class: str, sop_instance: str, transfer_syntax: str, data: bytes
    ) -> FinalResponse:
        """One C-STORE to the PACS; the final response (failures included) or UpstreamError
        when the relay path failed."""
        request = Request(
            op="store",
            transfer_syntax=transfer_syntax,
            dataset=data,
            sop_class=sop_class,
            sop_instance=sop_instance,
            calling_ae=CALLING_AE,
        )
        async with self._slot(self.stores, "stores"), self._stream(request) as (stream, clean):
            while True:
                msg = await self._next(stream)
                if isinstance(msg, FinalResponse):
                    clean[0] = True
                    return msg
