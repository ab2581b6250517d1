"""The multiplexing state machine: bytes and time in, events and bytes out.

`Connection` knows nothing of sockets, asyncio or clocks (time is an argument), in the
manner of h2 and aioquic. The same class serves both ends of a link; `client=True` for the
side that dialled (odd stream ids), False for the side that accepted (even ids).

The application drives it with `receive_data(data, now)` and the `send_*`/`open_stream`
calls, and after each call writes `data_to_send()` to its transport. Received data
is credit the peer spent; it comes back only through `acknowledge_received_data`, so
an application that stops reading stops its peer, and a buffer never grows past a window.

A stream widened with `grow_window` holds link credit for at most one base stream window
of unread data; the link credit of its unread bytes beyond that is returned on arrival,
and `extra_window_limit` bounds what all widened streams may hold beyond it. So a few
stalled wide streams cannot take the whole link window from the others (see grow_window).
`hold_link_credit` lowers that hold below a base window for streams the application
keeps many of (the workstation's forwarded connections), for the same reason.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

from relay.proto import frames as fr
from relay.proto.errors import (
    ErrorCode,
    FlowControlError,
    LinkClosedError,
    ProtocolError,
    StreamStateError,
)
from relay.proto.events import (
    ConnectionTerminated,
    ControlReceived,
    CreditAvailable,
    DataReceived,
    Event,
    GoAwayReceived,
    PongReceived,
    StreamEnded,
    StreamOpened,
    StreamReset,
)
from relay.proto.flow import ReceiveWindow, SendWindow
from relay.proto.frames import Flags, FrameType, Setting
from relay.proto.priority import (
    HEADER_PRIORITY,
    MAX_PRIORITY_FIELD,
    Priority,
    Scheduler,
    parse_priority,
)
from relay.proto.settings import LinkSettings

__all__ = ["Connection", "LinkSettings", "Priority"]

_RESET_SIZE = fr.HEADER_SIZE + 4
_PING_SIZE = fr.HEADER_SIZE + 8


class _Stream:
    __slots__ = ("id", "local_closed", "priority", "recv", "remote_closed", "send", "unacked")

    def __init__(
        self, stream_id: int, send_credit: int, recv_window: int, priority: Priority
    ) -> None:
        self.id = stream_id
        self.priority = priority
        self.send = SendWindow(send_credit)
        self.recv = ReceiveWindow.of(recv_window)
        self.unacked = 0  # delivered to the application, not yet acknowledged
        self.local_closed = False
        self.remote_closed = False


class Connection:
    """One side of one link. Not thread-safe; owned by one task or callback chain."""

    def __init__(self, *, client: bool, settings: LinkSettings | None = None, now: float) -> None:
        self.settings = settings or LinkSettings()
        self.client = client
        self._next_id = 1 if client else 2
        self._highest_remote_id = 0
        self._streams: dict[int, _Stream] = {}
        self._remote_open = 0
        self._closed_unacked: dict[int, int] = {}
        self._peer_stream_window = fr.DEFAULT_STREAM_WINDOW
        self._peer_max_frame = fr.DEFAULT_MAX_FRAME
        self._peer_max_streams = fr.DEFAULT_MAX_STREAMS
        self._send_link = SendWindow(fr.DEFAULT_LINK_WINDOW)
        self._recv_link = ReceiveWindow.of(self.settings.link_window)
        # Extra receive window given with grow_window, per stream, until the stream can
        # hold no more than its base window unread (see _settle_extra); at most
        # extra_window_limit in all, so the memory of a link's unread data stays below
        # link_window + extra_window_limit.
        self._extra: dict[int, int] = {}
        self.extra_window_limit = self.settings.link_window
        # Streams whose unread bytes hold less link credit than a base window
        # (hold_link_credit), until the stream is forgotten with its unread bytes.
        self._holds: dict[int, int] = {}
        self._decoder = fr.FrameDecoder(self.settings.max_frame)
        self._settings_received = False
        # DATA waits here, per stream, until data_to_send() takes it in priority order.
        self._sched = Scheduler()
        self._opened = 0  # streams created so far: the FIFO order within an urgency
        self.goaway_sent = False
        self.goaway_received = False
        self.terminated: ConnectionTerminated | None = None
        self._last_received = now
        self._ping_sent_at: float | None = None
        self._ping_counter = 0
        self.rtt: float | None = None
        # Bytes of frames queued only in answer to the peer: PING ACKs and RESETs of
        # streams it opened. A counter the adapter watches, to bound what a peer that
        # asks and does not read can make us buffer (CVE-2019-9512/9514 for HTTP/2).
        self.replies_queued = 0
        self._out: list[bytes | memoryview] = [
            fr.encode_settings(
                {
                    Setting.STREAM_WINDOW: self.settings.stream_window,
                    Setting.LINK_WINDOW: self.settings.link_window,
                    Setting.MAX_FRAME: self.settings.max_frame,
                    Setting.MAX_STREAMS: self.settings.max_streams,
                }
            )
        ]

    # ------------------------------------------------------------------ inspection

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def peer_max_frame(self) -> int:
        return self._peer_max_frame

    def send_credit(self, stream_id: int) -> int:
        """Bytes the application may pass to send_data() on this stream right now."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_closed or self.terminated:
            return 0
        return min(stream.send.credit, self._send_link.credit)

    @property
    def extra_window_held(self) -> int:
        """Extra window (grow_window) of the streams that may still hold more than their
        base window unread: what extra_window_limit is measured against."""
        return sum(self._extra.values())

    @property
    def free_local_streams(self) -> int:
        """Streams this side may still open now: the peer's MAX_STREAMS less ours open."""
        local_open = len(self._streams) - self._remote_open
        return max(0, self._peer_max_streams - local_open)

    def can_open_stream(self) -> bool:
        local_open = len(self._streams) - self._remote_open
        return (
            self.terminated is None
            and not self.goaway_sent
            and not self.goaway_received
            and local_open < self._peer_max_streams
            and self._next_id <= fr.MAX_STREAM_ID
        )

    def is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def priority(self, stream_id: int) -> Priority | None:
        """The stream's current priority, or None for a stream that is not open."""
        stream = self._streams.get(stream_id)
        return stream.priority if stream is not None else None

    @property
    def queued_data(self) -> int:
        """DATA payload bytes accepted by send_data() and not yet taken by data_to_send()."""
        return self._sched.queued

    @property
    def data_pending(self) -> bool:
        """DATA frames wait for data_to_send() (a bare FIN counts, though it has no bytes)."""
        return self._sched.pending

    def queued_on(self, stream_id: int) -> int:
        """Of queued_data, the bytes of this stream."""
        return self._sched.queued_on(stream_id)

    def emitted(self, urgency: int) -> int:
        """DATA payload bytes data_to_send() has ever returned at this urgency: a counter
        the adapter watches to know which urgencies are busy."""
        return self._sched.emitted[urgency]

    @property
    def emitted_by_urgency(self) -> list[int]:
        """All of emitted(), indexed by urgency (the core's own list: read, do not keep)."""
        return self._sched.emitted

    def in_flight(self, stream_id: int) -> int:
        """Bytes of the stream sent (or queued) that the peer has not yet granted back:
        what it has on the way or unread, as far as the announced window tells."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        return max(0, self._peer_stream_window - stream.send.credit)

    def queued_ahead_of(self, urgency: int) -> int:
        """Of queued_data, the bytes that a new frame at `urgency` would wait behind."""
        return self._sched.queued_up_to(urgency)

    @property
    def queued_cost(self) -> int:
        """What the queued DATA holds in memory: payload bytes plus a per-frame cost
        (relay.proto.priority.frame_cost). Bounds on the queue count this, not bytes,
        or many small frames would hold many times the bound."""
        return self._sched.cost

    def queued_cost_on(self, stream_id: int) -> int:
        """Of queued_cost, this stream's frames."""
        return self._sched.cost_on(stream_id)

    def queued_cost_ahead_of(self, urgency: int) -> int:
        """Of queued_cost, the frames a new frame at `urgency` would wait behind."""
        return self._sched.cost_up_to(urgency)

    # ------------------------------------------------------------------ output

    def data_to_send(self, limit: int | None = None) -> bytes:
        """What is queued for the peer: every non-DATA frame, then DATA in priority order.

        With `limit`, DATA stops once `limit` bytes were taken in all (at most one frame
        over; none if control frames reach it), and the rest waits for the next call: a
        caller that asks only for what its transport can take at once keeps the sending
        order decided here, where all streams are seen, instead of in a buffer below.
        None takes everything.
        """
        out, self._out = self._out, []
        if self._sched.pending:
            room = None if limit is None else limit - sum(len(part) for part in out)
            self._sched.pop(room, out)
        return b"".join(out)

    # ------------------------------------------------------------------ app -> peer

    def open_stream(self, headers: Mapping[str, str], priority: Priority | None = None) -> int:
        """Open a stream. Its priority is `priority` (sent to the peer as the `priority`
        header) or else the one the headers carry, or else the default (u=3, i)."""
        if priority is not None:
            headers = {**headers, HEADER_PRIORITY: priority.field()}
        if self.terminated or self.goaway_sent or self.goaway_received:
            raise LinkClosedError("link is closing: no new streams")
        if not self.can_open_stream():
            raise StreamStateError(f"peer allows {self._peer_max_streams} concurrent streams")
        block = fr.encode_headers(headers)  # ValueError for bad headers, before any state
        if len(block) > self._peer_max_frame:
            raise ValueError("header block larger than the peer's frame limit")
        stream_id = self._next_id
        self._next_id += 2
        self._add_stream(stream_id, parse_priority(headers.get(HEADER_PRIORITY)))
        self._out.append(fr.encode(FrameType.OPEN, 0, stream_id, block))
        return stream_id

    def set_priority(self, stream_id: int, priority: Priority) -> None:
        """Change a stream's priority here and tell the peer (PRIORITY_UPDATE), so both
        directions of the stream follow it. A stream not open is ignored (it may have
        just ended); a peer that predates priorities ignores the frame."""
        stream = self._streams.get(stream_id)
        if stream is None or self.terminated:
            return
        self._apply_priority(stream, priority)
        self._out.append(
            fr.encode(FrameType.PRIORITY_UPDATE, 0, stream_id, priority.field().encode("ascii"))
        )

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """Queue data (split into frames); raises FlowControlError beyond send_credit()."""
        stream = self._sendable(stream_id)
        size = len(data)
        if size > stream.send.credit or size > self._send_link.credit:
            raise FlowControlError(
                f"stream {stream_id}: {size} bytes exceeds credit {self.send_credit(stream_id)}"
            )
        stream.send.spend(size)
        self._send_link.spend(size)
        step = self._peer_max_frame
        push = self._sched.push
        if size <= step:
            fin = Flags.FIN if end_stream else 0
            push(stream_id, fr.encode_header(FrameType.DATA, fin, stream_id, size), data)
        else:
            view = memoryview(data)
            for offset in range(0, size, step):
                chunk = view[offset : offset + step]
                last = offset + step >= size
                fin = Flags.FIN if (end_stream and last) else 0
                header = fr.encode_header(FrameType.DATA, fin, stream_id, len(chunk))
                push(stream_id, header, chunk)  # joined (copied) in data_to_send
        if end_stream:
            stream.local_closed = True
            self._forget_if_done(stream)

    def end_stream(self, stream_id: int) -> None:
        """Half-close: the peer sees StreamEnded after the data sent so far."""
        self.send_data(stream_id, b"", end_stream=True)

    def reset_stream(self, stream_id: int, code: int = ErrorCode.CANCEL) -> None:
        """Abort a stream. Idempotent; its unread data's credit goes back to the link."""
        if self.terminated:
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            # Closed both ways already: nothing to tell the peer, but unread data's
            # credit must still come back.
            unread = self._closed_unacked.pop(stream_id, 0)
            self._extra.pop(stream_id, None)
            if unread:
                self._return_link_credit(self._charged(stream_id, unread))
            self._holds.pop(stream_id, None)
            return
        self._drop(stream)
        self._out.append(fr.encode_u32(FrameType.RESET, stream_id, code))
        if not self._is_local(stream_id):
            self.replies_queued += _RESET_SIZE

    def grow_window(self, stream_id: int, extra: int) -> bool:
        """Widen one stream's receive window by `extra` bytes for good (WINDOW_UPDATE),
        so that a stream that must not wait on credit (a viewer's, behind a full link)
        has more in flight than the link's buffers hold. True if granted.

        The extra is the stream's own: link credit is held for at most one base stream
        window (`settings.stream_window`) of its unread bytes and returned on arrival for
        the rest, so a wide stream whose reader stalls takes no more of the link window
        than any other, and the others keep their share. What that lets the peer buffer
        here beyond the link window is bounded: all-or-nothing, only while the extra of
        the wide streams still open (or closed with more than a base window unread) stays
        within `extra_window_limit`. Refused (False) beyond it, beyond the protocol
        maximum, and for a stream not open or closed for receiving."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.remote_closed or self.terminated or extra <= 0:
            return False
        if extra > fr.MAX_WINDOW - stream.recv.size:
            return False
        if self.extra_window_held + extra > self.extra_window_limit:
            return False
        self._extra[stream_id] = self._extra.get(stream_id, 0) + extra
        stream.recv.size += extra
        stream.recv.available += extra
        self._out.append(fr.encode_u32(FrameType.WINDOW_UPDATE, stream_id, extra))
        return True

    def hold_link_credit(self, stream_id: int, at_most: int) -> bool:
        """Let the stream's unread bytes hold link credit for at most `at_most` bytes
        (less than a base window; link credit of the rest goes back on arrival), so that
        many such streams whose readers stall cannot take the link window from the
        others. True if set; only lowers, for a stream open for receiving.

        The stream still holds its own window of unread bytes, which then count against
        no link window: the application bounds how many such streams it keeps (the
        workstation's forwards: their connection limits and stall timeout)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.remote_closed or self.terminated or at_most < 0:
            return False
        before = self._charged(stream_id, stream.unacked)
        if at_most >= self._holds.get(stream_id, self.settings.stream_window):
            return False
        self._holds[stream_id] = at_most
        refund = before - self._charged(stream_id, stream.unacked)
        if refund:
            self._refund_link_credit(refund)
        return True

    def acknowledge_received_data(self, stream_id: int, size: int) -> None:
        """The application consumed `size` bytes of the stream: return that credit."""
        if size <= 0 or self.terminated:
            return
        stream = self._streams.get(stream_id)
        if stream is not None:
            left = stream.unacked
            size = min(size, left)
            stream.unacked -= size
            grant = stream.recv.consume(size)
            if grant and not stream.remote_closed:
                self._out.append(fr.encode_u32(FrameType.WINDOW_UPDATE, stream_id, grant))
            if stream.remote_closed:
                self._settle_extra(stream_id, stream.unacked)
        elif stream_id in self._closed_unacked:
            left = self._closed_unacked[stream_id]
            size = min(size, left)
            if left == size:
                del self._closed_unacked[stream_id]
            else:
                self._closed_unacked[stream_id] = left - size
            self._settle_extra(stream_id, left - size)
        else:
            return
        # Only the part that held link credit: the rest went back on arrival (_on_data).
        charged = self._charged(stream_id, left) - self._charged(stream_id, left - size)
        self._return_link_credit(charged)
        if stream is None and stream_id not in self._closed_unacked:
            self._holds.pop(stream_id, None)

    def send_control(self, kind: str, body: bytes) -> None:
        if self.terminated:
            raise LinkClosedError("link is closed")
        frame = fr.encode_control(kind, body)
        if len(frame) - fr.HEADER_SIZE > self._peer_max_frame:
            raise ValueError(f"control message larger than {self._peer_max_frame} bytes")
        self._out.append(frame)

    def goaway(self, code: int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Refuse new streams from now on; streams already open may finish."""
        if self.goaway_sent or self.terminated:
            return
        self.goaway_sent = True
        self._out.append(fr.encode_goaway(self._highest_remote_id, code, reason))

    # ------------------------------------------------------------------ time

    def next_timer(self) -> float | None:
        """When handle_timer() must next be called (absolute time), or None."""
        if self.terminated:
            return None
        dead = self._last_received + self.settings.keepalive_timeout
        if self._ping_sent_at is not None:
            return dead
        return min(dead, self._last_received + self.settings.keepalive_interval)

    def handle_timer(self, now: float) -> list[Event]:
        if self.terminated:
            return []
        if now >= self._last_received + self.settings.keepalive_timeout:
            return self._terminate(ErrorCode.KEEPALIVE_TIMEOUT, "peer silent", remote=False)
        idle_since = self._last_received + self.settings.keepalive_interval
        if self._ping_sent_at is None and now >= idle_since:
            self._ping_sent_at = now
            self._ping_counter += 1
            payload = self._ping_counter.to_bytes(8, "big")
            self._out.append(fr.encode(FrameType.PING, 0, 0, payload))
        return []

    # ------------------------------------------------------------------ peer -> app

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        """Feed bytes from the transport; returns what happened."""
        if self.terminated:
            return []
        self._last_received = now
        events: list[Event] = []
        try:
            with contextlib.closing(self._decoder.feed(data)) as frames:
                for frame in frames:
                    self._handle(frame, now, events)
        except ProtocolError as exc:
            events += self._terminate(exc.code, str(exc), remote=False)
        return events

    def close_locally(self, code: int, reason: str) -> list[Event]:
        """This side closed the transport on purpose (after its goaway): every stream is
        reset, and the link ends with the caller's code rather than as a lost link."""
        if self.terminated:
            return []
        return self._terminate(code, reason, remote=False, send_goaway=False)

    def receive_eof(self) -> list[Event]:
        """The transport closed. Every stream is reset; the link is over."""
        if self.terminated:
            return []
        code = ErrorCode.NO_ERROR if self.goaway_received else ErrorCode.INTERNAL_ERROR
        reason = "peer closed the link" if self.goaway_received else "link lost"
        return self._terminate(code, reason, remote=True, send_goaway=False)

    # ------------------------------------------------------------------ internals

    def _sendable(self, stream_id: int) -> _Stream:
        if self.terminated:
            raise LinkClosedError("link is closed")
        stream = self._streams.get(stream_id)
        if stream is None:
            raise StreamStateError(f"stream {stream_id} is not open")
        if stream.local_closed:
            raise StreamStateError(f"stream {stream_id} is half-closed")
        return stream

    def _is_local(self, stream_id: int) -> bool:
        return (stream_id % 2 == 1) == self.client

    def _was_open(self, stream_id: int) -> bool:
        """True for a stream id that existed once and is closed now."""
        if self._is_local(stream_id):
            return stream_id < self._next_id
        return stream_id <= self._highest_remote_id

    def _return_link_credit(self, size: int) -> None:
        if size <= 0:
            return
        grant = self._recv_link.consume(size)
        if grant:
            self._out.append(fr.encode_u32(FrameType.WINDOW_UPDATE, 0, grant))

    def _refund_link_credit(self, size: int) -> None:
        """Link credit for unread bytes that hold none (a widened stream's beyond its base
        window, a held stream's beyond its hold): at once, not batched, so that what
        stalled streams hold never waits here."""
        grant = self._recv_link.return_now(size)
        self._out.append(fr.encode_u32(FrameType.WINDOW_UPDATE, 0, grant))

    def _charged(self, stream_id: int, unacked: int) -> int:
        """Of a stream's unread bytes, those that hold link credit: at most one base
        stream window (only a stream widened by grow_window can hold more), or less
        (hold_link_credit)."""
        return min(unacked, self._holds.get(stream_id, self.settings.stream_window))

    def _settle_extra(self, stream_id: int, unacked: int) -> None:
        """A stream that receives no more: once its unread bytes fit its base window it
        can never again hold more than that, and its extra leaves extra_window_limit."""
        if unacked <= self.settings.stream_window:
            self._extra.pop(stream_id, None)

    def _drop(self, stream: _Stream) -> None:
        """Forget a reset stream; the application discards its unread data, and DATA not
        yet sent is dropped, its link credit kept (the peer never counted it)."""
        del self._streams[stream.id]
        unsent = self._sched.remove(stream.id)
        if unsent:
            self._send_link.credit += unsent
        if not self._is_local(stream.id):
            self._remote_open -= 1
        self._extra.pop(stream.id, None)
        if stream.unacked:
            self._return_link_credit(self._charged(stream.id, stream.unacked))
        self._holds.pop(stream.id, None)

    def _forget_if_done(self, stream: _Stream) -> None:
        """A stream closed in both directions: keep only its unread byte count."""
        if stream.local_closed and stream.remote_closed:
            del self._streams[stream.id]
            self._sched.finish(stream.id)
            if not self._is_local(stream.id):
                self._remote_open -= 1
            if stream.unacked:
                self._closed_unacked[stream.id] = stream.unacked
            else:
                self._holds.pop(stream.id, None)

    def _terminate(
        self, code: int, reason: str, *, remote: bool, send_goaway: bool = True
    ) -> list[Event]:
        if send_goaway and not self.goaway_sent:
            self.goaway_sent = True
            self._out.append(fr.encode_goaway(self._highest_remote_id, code, reason))
        events: list[Event] = [
            StreamReset(sid, code or ErrorCode.INTERNAL_ERROR, remote=False)
            for sid in self._streams
        ]
        self._streams.clear()
        self._sched.clear()
        self._closed_unacked.clear()
        self._extra.clear()
        self._holds.clear()
        self._remote_open = 0
        self.terminated = ConnectionTerminated(code, reason, remote)
        events.append(self.terminated)
        return events

    def _handle(self, frame: fr.Frame, now: float, events: list[Event]) -> None:
        ftype = frame.type
        if not self._settings_received and ftype != FrameType.SETTINGS:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "first frame must be SETTINGS")
        if ftype == FrameType.DATA:
            self._on_data(frame, events)
        elif ftype == FrameType.WINDOW_UPDATE:
            self._on_window_update(frame, events)
        elif ftype == FrameType.OPEN:
            self._on_open(frame, events)
        elif ftype == FrameType.RESET:
            self._on_reset(frame, events)
        elif ftype == FrameType.PING:
            self._on_ping(frame, now, events)
        elif ftype == FrameType.SETTINGS:
            self._on_settings(frame, events)
        elif ftype == FrameType.GOAWAY:
            self._on_goaway(frame, events)
        elif ftype == FrameType.PRIORITY_UPDATE:
            self._on_priority_update(frame)
        elif ftype == FrameType.CONTROL:
            if frame.stream_id:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "CONTROL on a stream")
            kind, body = fr.decode_control(frame.payload)
            events.append(ControlReceived(kind, body))
        # Unknown frame types are ignored, so that later versions can add optional ones.

    def _stream_frame(self, frame: fr.Frame) -> _Stream | None:
        """The open stream a frame is for; None if it was closed; error if never opened."""
        if frame.stream_id == 0:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"frame type {frame.type} on stream 0")
        stream = self._streams.get(frame.stream_id)
        if stream is None and not self._was_open(frame.stream_id):
            raise ProtocolError(
                ErrorCode.PROTOCOL_ERROR, f"frame for unopened stream {frame.stream_id}"
            )
        return stream

    def _on_data(self, frame: fr.Frame, events: list[Event]) -> None:
        size = len(frame.payload)
        if not self._recv_link.receive(size):
            raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "link window exceeded")
        stream = self._stream_frame(frame)
        if stream is None or stream.remote_closed:
            # Closed or reset meanwhile: the bytes are dropped, their link credit returned.
            if stream is not None:
                self.reset_stream(stream.id, ErrorCode.STREAM_CLOSED)
                events.append(StreamReset(stream.id, ErrorCode.STREAM_CLOSED, remote=False))
            self._return_link_credit(size)
            return
        if not stream.recv.receive(size):
            raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, f"stream {stream.id} window exceeded")
        if size:
            before = stream.unacked
            stream.unacked += size
            events.append(DataReceived(stream.id, frame.payload))
            charged = self._charged(stream.id, stream.unacked) - self._charged(stream.id, before)
            beyond = size - charged
            if beyond:  # a widened or held stream's own: its link credit goes back now
                self._refund_link_credit(beyond)
        if frame.flags & Flags.FIN:
            stream.remote_closed = True
            events.append(StreamEnded(stream.id))
            self._settle_extra(stream.id, stream.unacked)
            self._forget_if_done(stream)

    def _on_window_update(self, frame: fr.Frame, events: list[Event]) -> None:
        increment = fr.decode_u32(frame.payload, "WINDOW_UPDATE")
        if increment == 0:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
        if frame.stream_id == 0:
            if not self._send_link.grant(increment):
                raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "link window overflow")
            events.append(CreditAvailable(0))
            return
        stream = self._stream_frame(frame)
        if stream is None:
            return
        if not stream.send.grant(increment):
            raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, f"stream {stream.id} window overflow")
        if not stream.local_closed:
            events.append(CreditAvailable(stream.id))

    def _on_open(self, frame: fr.Frame, events: list[Event]) -> None:
        stream_id = frame.stream_id
        if stream_id == 0 or self._is_local(stream_id) or stream_id <= self._highest_remote_id:
            raise ProtocolError(
                ErrorCode.PROTOCOL_ERROR, f"OPEN with bad or reused stream id {stream_id}"
            )
        self._highest_remote_id = stream_id
        try:
            headers = fr.decode_headers(frame.payload)
        except (ValueError, UnicodeDecodeError):
            self._out.append(fr.encode_u32(FrameType.RESET, stream_id, ErrorCode.HEADERS_TOO_LARGE))
            self.replies_queued += _RESET_SIZE
            return
        if self.goaway_sent or self._remote_open >= self.settings.max_streams:
            self._out.append(fr.encode_u32(FrameType.RESET, stream_id, ErrorCode.REFUSED_STREAM))
            self.replies_queued += _RESET_SIZE
            return
        self._add_stream(stream_id, parse_priority(headers.get(HEADER_PRIORITY)))
        self._remote_open += 1
        events.append(StreamOpened(stream_id, headers))

    def _add_stream(self, stream_id: int, priority: Priority) -> None:
        self._streams[stream_id] = _Stream(
            stream_id, self._peer_stream_window, self.settings.stream_window, priority
        )
        self._opened += 1
        self._sched.add(stream_id, priority, self._opened)

    def _apply_priority(self, stream: _Stream, priority: Priority) -> None:
        stream.priority = priority
        self._sched.set_priority(stream.id, priority)

    def _on_priority_update(self, frame: fr.Frame) -> None:
        if len(frame.payload) > MAX_PRIORITY_FIELD:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "PRIORITY_UPDATE too long")
        stream = self._stream_frame(frame)
        if stream is None:
            return  # closed meanwhile
        # The whole priority is replaced; members missing take the defaults (RFC 9218).
        self._apply_priority(stream, parse_priority(frame.payload.decode("ascii", "replace")))

    def _on_reset(self, frame: fr.Frame, events: list[Event]) -> None:
        code = fr.decode_u32(frame.payload, "RESET")
        stream = self._stream_frame(frame)
        if stream is None:
            return
        self._drop(stream)
        events.append(StreamReset(stream.id, code, remote=True))

    def _on_ping(self, frame: fr.Frame, now: float, events: list[Event]) -> None:
        if frame.stream_id:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "PING on a stream")
        if len(frame.payload) != 8:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "PING payload must be 8 bytes")
        if not frame.flags & Flags.ACK:
            self._out.append(fr.encode(FrameType.PING, Flags.ACK, 0, frame.payload))
            self.replies_queued += _PING_SIZE
            return
        expected = self._ping_counter.to_bytes(8, "big")
        if self._ping_sent_at is not None and frame.payload == expected:
            self.rtt = now - self._ping_sent_at
            self._ping_sent_at = None
            events.append(PongReceived(self.rtt))

    def _on_settings(self, frame: fr.Frame, events: list[Event]) -> None:
        if frame.stream_id or self._settings_received:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "SETTINGS only once, on stream 0")
        self._settings_received = True
        values = fr.decode_settings(frame.payload)
        window = values.get(Setting.STREAM_WINDOW, fr.DEFAULT_STREAM_WINDOW)
        link = values.get(Setting.LINK_WINDOW, fr.DEFAULT_LINK_WINDOW)
        max_frame = values.get(Setting.MAX_FRAME, fr.DEFAULT_MAX_FRAME)
        max_streams = values.get(Setting.MAX_STREAMS, fr.DEFAULT_MAX_STREAMS)
        if not fr.DEFAULT_STREAM_WINDOW <= window <= fr.MAX_WINDOW:
            raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, f"bad STREAM_WINDOW {window}")
        if not fr.DEFAULT_LINK_WINDOW <= link <= fr.MAX_WINDOW:
            raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, f"bad LINK_WINDOW {link}")
        if not fr.MIN_MAX_FRAME <= max_frame <= fr.MAX_MAX_FRAME:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"bad MAX_FRAME {max_frame}")
        delta = window - self._peer_stream_window
        for stream in self._streams.values():
            stream.send.credit += delta
        self._peer_stream_window = window
        self._send_link.credit += link - fr.DEFAULT_LINK_WINDOW
        self._peer_max_frame = max_frame
        self._peer_max_streams = max_streams
        if delta or link != fr.DEFAULT_LINK_WINDOW:
            events.append(CreditAvailable(0))  # windows grew: blocked senders may go on

    def _on_goaway(self, frame: fr.Frame, events: list[Event]) -> None:
        if frame.stream_id:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "GOAWAY on a stream")
        last, code, reason = fr.decode_goaway(frame.payload)
        self.goaway_received = True
        for stream_id in [s for s in self._streams if self._is_local(s) and s > last]:
            self._drop(self._streams[stream_id])
            events.append(StreamReset(stream_id, ErrorCode.REFUSED_STREAM, remote=True))
        events.append(GoAwayReceived(last, code, reason))
