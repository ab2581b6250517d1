"""One relayed DICOM operation at the workstation: stream I/O on the loop, consumed by a thread.

pynetdicom calls the workstation's handlers on its own threads and expects them to block;
the relay stream lives on the event loop. A `Session` opens the stream and writes the
request on the loop, then copies each received message payload into a bounded `Channel`.
The handler thread takes payloads out and decodes them (zstd work stays off the loop). When
the handler is slow (the viewer is slow), the channel fills, the loop stops reading, tunnel
credit stops, and the agent and then the PACS wait: memory stays at a few instances.

Everything the workstation writes on the stream (the request, a resumed retrieve's Skip,
a Cancel, the half-close) goes under one lock, so that no frame lands inside another
while a large one waits for credit. A viewer's cancel that comes before the request is
out (the tunnel may wait for the link, above all for a resumed retrieve) is remembered
and written right after it.

Time limits follow progress, not size: opening the stream has `open_timeout`; writing the
request has it per step (each `WRITE_STEP` bytes must find credit within it, however long
a large upload over a slow uplink takes in all); the final answer's deadline
(`next_final`) starts once the request is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Final

from relay.dicom import status as st
from relay.dicom.bridge import Channel, ChannelClosed
from relay.dicom.codec import (
    Cancel,
    DicomProtocolError,
    ErrorMessage,
    FinalResponse,
    Message,
    MessageCodec,
    MessageType,
    PixelMismatchError,
    Request,
    read_payload,
)
from relay.net.bytestream import ByteStream, StreamResetError
from relay.proto.errors import ErrorCode

log = logging.getLogger(__name__)

OpenStream = Callable[[Mapping[str, str]], Awaitable[ByteStream]]
RESET_CANCEL = int(ErrorCode.CANCEL)  # how we abandon a stream
# How long a retrieve whose stream broke may look for a new one (the workstation's
# dicom.resume_window), by default and at most.
RESUME_WINDOW: Final = 30.0
MAX_RESUME_WINDOW: Final = 3600.0
# The request is written in steps of this many bytes, each within the session's timeout:
# a stall fails it, a slow uplink does not.
WRITE_STEP: Final = 64 * 1024


# Resets that say something about the request or the device, not about the path: a
# retrieve is not resumed after these (CANCEL is also what the agent sends when it gives up).
# SHUTDOWN is not among them: an agent that drains (a restart, an upgrade) resets with it,
# and the retrieve carries on once an agent takes the stream again.
NOT_RESUMABLE: Final = frozenset(
    {
        ErrorCode.CANCEL,
        ErrorCode.FORBIDDEN,
        ErrorCode.REVOKED,
        ErrorCode.UNSUPPORTED_VERSION,
        ErrorCode.HEADERS_TOO_LARGE,
        ErrorCode.LIMIT_EXCEEDED,
    }
)


AGENT_BUSY_REASON: Final = "the agent is busy (its limit for this device); try again later"
# Why an operation the node cut short when it stopped failed (the node's own operations
# that have no session, such as those served from the cache, say the same).
STOPPING_REASON: Final = "the workstation is stopping"


class SessionEnded(Exception):
    """The stream ended without a final response: `status` and `reason` say why.

    `resumable` is True when the relay path failed (the link dropped, a stream reset with
    a link-level code, no stream could be opened): trying again may succeed. It is also
    True when an instance's pixels failed to decode exactly (`failed_codec` names the
    codec): trying again without that codec will. `unopened` is True when no stream was
    opened at all (the link is down): nothing was carried, so a resume that ends so has not
    used up one of the retrieve's tries (relay.dicom.node.MAX_RESUMES).
    """

    def __init__(
        self,
        status: int,
        reason: str,
        *,
        resumable: bool = False,
        failed_codec: str = "",
        unopened: bool = False,
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.resumable = resumable
        self.failed_codec = failed_codec
        self.unopened = unopened


class Session:
    """A request on its own stream; thread-side `next()`, `cancel()` and `close()`."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        open_stream: OpenStream,
        headers: Mapping[str, str],
        request: Request,
        codec: MessageCodec,
        *,
        open_timeout: float,
        follow: Sequence[Message] = (),
    ) -> None:
        """`follow`: messages written right after the request (a resumed retrieve's Skip);
        `open_timeout` bounds opening the stream, then each step of writing (no credit for
        that long is a stall), not the whole write."""
        self.loop = loop
        self._follow = tuple(follow)
        self.codec = codec
        self.request = request
        self.inbox: Channel[bytearray] = Channel(loop, codec.limits.queue_depth)
        self._open_stream = open_stream
        self._headers = dict(headers)
        self._open_timeout = open_timeout
        self._stream: ByteStream | None = None
        self._end: SessionEnded | None = None
        self._final_seen = False
        self._closed = False
        self._task: asyncio.Future[None] | None = None
        self._writing = asyncio.Lock()  # one writer at a time: frames never interleave
        self._sent_at: float | None = None  # when the request (and `follow`) were written
        self._cancel_wanted = False  # set by cancel(), from the handler's thread
        self._cancel_sent = False
        self.error_reason = ""

    # -- loop side ----------------------------------------------------------------

    def start(self) -> None:
        """Schedule the stream on the loop (callable from any thread)."""
        self._task = asyncio.run_coroutine_threadsafe(self._run(), self.loop)  # type: ignore[assignment]

    async def _run(self) -> None:
        reason = SessionEnded(st.LINK_LOST, "relay stream ended before the final response")
        opened: ByteStream | None = None
        try:
            try:
                async with asyncio.timeout(self._open_timeout):
                    opened = await self._open_stream(self._headers)
                stream = self._stream = opened
                async with self._writing:
                    for msg in (self.request, *self._follow):
                        await self._write(stream, msg)
                    self._sent_at = time.monotonic()
                    self.inbox.wake()  # next_final's deadline starts now
                    if self._cancel_wanted:  # the viewer cancelled while we opened
                        self._cancel_sent = True
                        await self._write(stream, Cancel())
            except StreamResetError as exc:
                reason = _reset_ended(exc, f"relay link unavailable: {_why(exc)}")
                return
            except TimeoutError:
                if opened is None:
                    why = f"relay link unavailable: no stream within {self._open_timeout:g} s"
                else:
                    opened.reset(RESET_CANCEL)  # a message cut short: the stream is unusable
                    why = f"relay stream stalled: no credit for {self._open_timeout:g} s"
                reason = SessionEnded(st.LINK_LOST, why, resumable=True, unopened=opened is None)
                return
            except (OSError, ConnectionError) as exc:
                reason = SessionEnded(
                    st.LINK_LOST,
                    f"relay link unavailable: {_why(exc)}",
                    resumable=True,
                    unopened=opened is None,
                )
                return
            except Exception as exc:  # the tunnel refused the stream, or similar
                reason = SessionEnded(st.LINK_LOST, f"relay link unavailable: {_why(exc)}")
                return
            if self._closed:
                stream.reset(RESET_CANCEL)
                return
            while True:
                payload = await read_payload(stream, self.codec)
                if payload is None:
                    return
                if len(payload) > 1 and payload[1] == MessageType.FINAL:
                    self._final_seen = True
                await self.inbox.put(payload)
                if self._final_seen:
                    return
        except StreamResetError as exc:
            reason = _reset_ended(exc, f"relay stream reset (code {exc.code})")
        except DicomProtocolError as exc:
            reason = SessionEnded(st.RELAY_PROTOCOL, f"bad message from the agent: {exc}")
            if self._stream is not None:
                self._stream.reset(RESET_CANCEL)
        except ChannelClosed:
            pass  # the handler is gone; close() resets the stream
        except Exception as exc:
            log.exception("DICOM session failed")
            reason = SessionEnded(st.LINK_LOST, f"relay error: {_why(exc)}")
        finally:
            if self._end is None:  # abort_now() may have said why first
                self._end = reason
            self.inbox.close("stream ended")

    async def _write(self, stream: ByteStream, msg: Message) -> None:
        """Write `msg` (the caller holds `_writing`) within the timeout per `WRITE_STEP`
        bytes: bounded by progress, so a large upload over a slow uplink goes through
        and a stream that gets no credit fails."""
        data = self.codec.encode(msg)
        limit = self._open_timeout
        async with asyncio.timeout(limit) as deadline:
            if len(data) <= WRITE_STEP:
                await stream.write(data)
                return
            view = memoryview(data)
            for start in range(0, len(data), WRITE_STEP):
                await stream.write(bytes(view[start : start + WRITE_STEP]))
                deadline.reschedule(self.loop.time() + limit)

    async def _send_cancel(self) -> None:
        """Write the Cancel, once; until the request is out, `_run` writes it after."""
        stream = self._stream
        if stream is None or self._sent_at is None or self._cancel_sent or self._closed:
            return
        async with self._writing:
            if self._cancel_sent or self._closed:
                return
            self._cancel_sent = True
            try:
                await self._write(stream, Cancel())
            except TimeoutError:
                stream.reset(RESET_CANCEL)  # a frame cut short: the stream is unusable
            except (StreamResetError, DicomProtocolError):
                pass  # the stream ended anyway: `_run` reports it

    async def _finish(self, clean: bool) -> None:
        stream = self._stream
        if stream is not None:
            if clean:
                try:
                    async with asyncio.timeout(self._open_timeout), self._writing:
                        await stream.write_eof()
                except (StreamResetError, TimeoutError):
                    stream.reset(RESET_CANCEL)
            else:
                stream.reset(RESET_CANCEL)
        if self._task is not None:
            self._task.cancel()
        self.inbox.abort("session closed")

    # -- thread side ----------------------------------------------------------------

    def next(self, timeout: float) -> Message:
        """The next message; TimeoutError if none within `timeout` or if woken (`wake()`);
        SessionEnded at the end."""
        try:
            payload = self.inbox.get_sync(timeout)
        except ChannelClosed:
            raise self._end or SessionEnded(st.LINK_LOST, "relay stream ended") from None
        try:
            msg = self.codec.decode(payload)
        except PixelMismatchError as exc:
            raise SessionEnded(
                st.RELAY_PROTOCOL, str(exc), resumable=True, failed_codec=exc.codec
            ) from None
        except DicomProtocolError as exc:
            raise SessionEnded(st.RELAY_PROTOCOL, f"bad message from the agent: {exc}") from None
        if isinstance(msg, ErrorMessage):
            self.error_reason = msg.reason
        return msg

    def next_final(self, timeout: float) -> FinalResponse:
        """Skip to the final response (for echo and store), within `timeout` of the request
        being written: the write has its own bound (by progress, in `_run`), so an upload
        is not cut for taking long to send."""
        while True:
            sent = self._sent_at
            left = timeout if sent is None else sent + timeout - time.monotonic()
            if left <= 0:
                raise SessionEnded(st.LINK_LOST, "no response from the agent in time")
            try:
                msg = self.next(left)  # woken when the request is out: the deadline starts
            except TimeoutError:
                continue
            if isinstance(msg, FinalResponse):
                return msg

    def wake(self) -> None:
        """From any thread: make the handler waiting in `next()` look around now."""
        self.inbox.wake()

    def cancel(self) -> None:
        """Ask the agent to C-CANCEL at the PACS: now, or right after the request if the
        stream is still opening (the flag is never lost, whatever the timing)."""
        self._cancel_wanted = True
        with contextlib.suppress(RuntimeError):
            asyncio.run_coroutine_threadsafe(self._send_cancel(), self.loop)

    def close(self) -> None:
        """End the session: a clean half-close after the final, a reset otherwise."""
        if self._closed:
            return
        self._closed = True
        clean = self._final_seen and len(self.inbox) == 0
        with contextlib.suppress(RuntimeError):  # loop closed: nothing left to clean
            asyncio.run_coroutine_threadsafe(self._finish(clean), self.loop)

    def abort_now(self) -> None:
        """From the loop, or from any thread before `start()` (node shutdown): reset at
        once; the handler's wait ends with a failure that says why."""
        self._closed = True
        if self._end is None:
            self._end = SessionEnded(st.LINK_LOST, STOPPING_REASON)
        if self._stream is not None:
            self._stream.reset(RESET_CANCEL)
        self.inbox.abort("node stopping")


END_TIMEOUT: Final = 5.0  # seconds a half-close may wait for window credit


async def end_stream(stream: ByteStream, clean: bool) -> None:
    """After the final response, a half-close: the agent takes an early end (a reset) as
    the workstation giving up, so anything else resets."""
    if clean:
        with contextlib.suppress(StreamResetError, OSError, TimeoutError):
            async with asyncio.timeout(END_TIMEOUT):
                await stream.write_eof()
                return
    stream.reset(RESET_CANCEL)


def _reset_ended(exc: StreamResetError, reason: str) -> SessionEnded:
    """How a reset stream ends the operation. LIMIT_EXCEEDED is the agent's own refusal
    for its limits (relay.agent.dispatch): out of resources, try again later; anything
    else is the path failing (resumable unless it says something about the request)."""
    if exc.code == ErrorCode.LIMIT_EXCEEDED:
        return SessionEnded(st.AGENT_BUSY, AGENT_BUSY_REASON, resumable=False)
    return SessionEnded(st.LINK_LOST, reason, resumable=exc.code not in NOT_RESUMABLE)


def _why(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
