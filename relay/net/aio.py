"""The one place where sockets meet the protocol core.

`Link` is an asyncio Protocol that owns one `relay.proto.Connection`: it feeds received
bytes to the core, writes what the core returns, keeps one timer for keepalives, and turns
core events into `Stream` objects. `Stream` implements `relay.net.bytestream.ByteStream` for the
ends (agent, workstation); the gateway instead attaches a `StreamListener` and splices
streams with callbacks, so that no task or buffer exists per stream in the DMZ.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol, cast

from relay.net.bytestream import StreamResetError
from relay.proto import (
    DEFAULT_PRIORITY,
    QUEUED_VIEW_COST,
    URGENCY_LEVELS,
    Connection,
    ConnectionTerminated,
    ControlReceived,
    CreditAvailable,
    DataReceived,
    ErrorCode,
    Event,
    GoAwayReceived,
    LinkClosedError,
    LinkSettings,
    Priority,
    StreamEnded,
    StreamOpened,
    StreamReset,
)
from relay.wire import HEADER_PRIORITY

log = logging.getLogger(__name__)

# Transport write buffer: the core hands over DATA only while the transport holds at most
# HIGH (plus one frame), and again once it drained below LOW; so the sending order is
# decided by the core's scheduler, and urgent bytes wait behind at most HIGH in the
# transport. 256 KiB is 21 ms at 100 Mbit/s; measured against the former 1 MiB (two Links
# over plain loopback TCP, uvloop, 2026-12-05): 1.17-1.30 GB/s against 1.03-1.28 GB/s,
# no difference beyond the noise. A link whose peer stops reading even control frames is
# aborted at HARD.
WRITE_HIGH = 256 * 1024
WRITE_LOW = 64 * 1024
WRITE_HARD = 32 * 1024 * 1024
# Answers to the peer (PING ACKs, RESETs of streams it opened: the core's replies_queued)
# that may sit in the transport's buffer unsent. They go out whatever the buffer holds,
# like every control frame, so a peer that sends PINGs or doomed OPENs and never reads
# would otherwise make us buffer its answers up to WRITE_HARD per link (CVE-2019-9512 and
# 9514 for HTTP/2). Beyond it the link is aborted. The buffer is a FIFO: an answer has
# left it once bytes_out less the buffer's size has passed the offset it was written at.
#
# Why this cannot deadlock: reading never stops, and nothing here waits on the peer.
# (Pausing reading while writing is paused would: two peers both sending bulk DATA,
# upload and download at once, would each wait for the other to read.) Why it cannot
# abort a legitimate transfer: DATA is not counted (and goes in only while the buffer
# holds at most WRITE_HIGH), nor are our own OPENs, WINDOW_UPDATEs, CONTROL messages or
# GOAWAY; an answer counts only until the peer has read up to it, at most one buffer
# (about WRITE_HIGH) later. A peer PINGs once per keepalive interval when it received
# nothing, and RESETs answer the streams it opens: 1 MiB is 52,428 PONGs or 65,536
# RESETs that it asked for and left unread.
CONTROL_REPLIES = 1024 * 1024
_REPLY_MARKS = 32  # (offset, bytes) marks kept per link; beyond, the newest absorb more
# DATA a writer may queue in the core beyond what the transport takes: per stream, and in
# all at its urgency or a more urgent one (so a prefetch filling the queue never blocks a
# viewer's writer). Counted as the core's queued_cost, payload plus a per-frame cost
# (relay.proto.priority.frame_cost), and a write is admitted only if it fits even split
# into frames of the worst cost: so each is a bound on memory, whatever the size of the
# writes (counted in payload bytes, 1-byte writes held ~110 times it). Bounds the core's
# memory per link to URGENCY_LEVELS x QUEUE_LINK; flow-control credit bounds it too.
# Writers are woken at half of each.
QUEUE_STREAM = 256 * 1024
QUEUE_LINK = 512 * 1024
# Of QUEUE_LINK, the last QUEUE_RESERVE only streams holding less than that in the queue
# may fill, each up to that. Two streams that keep their queues full (two sessions on a
# gateway link reading C-GETs, say) hold 2 x QUEUE_STREAM = QUEUE_LINK: a third stream
# woken after them each time its queue drained to half found it full again, and waited
# for as long as they wrote (measured: 300 bytes for it against 25 MiB for them over 100
# drains). Now they share QUEUE_LINK - QUEUE_RESERVE, and a small writer always finds
# room unless other small writers took it, whose frames leave round-robin with its own.
QUEUE_RESERVE = 64 * 1024
DEFAULT_URGENCY = DEFAULT_PRIORITY.urgency
REFLUSH_DELAY = 0.005  # see _flush_now: only for a transport that never pauses us
# A background stream (urgency above the default) may have at most BACKGROUND_IN_FLIGHT
# bytes on the way while a more urgent stream sent data within ACTIVE_FOR seconds: the
# buffers below this Link (the seal's queue, the outer windows at each hop) are FIFO, and
# what prefetch put there is what a viewer's next bytes wait behind. Otherwise its window.
BACKGROUND_IN_FLIGHT = 256 * 1024
ACTIVE_FOR = 0.25
# Bytes a link accepts before it is started (identity checked): a SETTINGS frame and a
# little more; anything bigger is a misbehaving peer.
PRESTART_LIMIT = 256 * 1024


def fits_in(room: int, max_frame: int) -> int:
    """The largest write whose queued cost stays within `room` bytes of cost: split into
    frames of `max_frame`, each costing at most its payload plus QUEUED_VIEW_COST."""
    if room <= QUEUED_VIEW_COST:
        return 0
    frames = -(-room // (max_frame + QUEUED_VIEW_COST))
    return room - frames * QUEUED_VIEW_COST


def queue_room(own: int, ahead: int) -> int:
    """The cost a stream may still queue in the core: it holds `own`, and `ahead` is
    queued at its urgency or a more urgent one (its own included). Within QUEUE_STREAM
    and QUEUE_LINK; the link's last QUEUE_RESERVE only to bring `own` up to it."""
    link_room = QUEUE_LINK - ahead
    shared_or_reserve = max(link_room - QUEUE_RESERVE, QUEUE_RESERVE - own)
    return min(QUEUE_STREAM - own, link_room, shared_or_reserve)


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """TCP_NODELAY on the socket under a (TLS) transport: small DICOM messages must not wait."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class StreamListener(Protocol):
    """Callback interface for a stream driven without a task (the gateway's splicer)."""

    def on_data(self, stream: Stream, data: bytes) -> None: ...
    def on_end(self, stream: Stream) -> None: ...
    def on_credit(self, stream: Stream) -> None: ...
    def on_reset(self, stream: Stream, code: int) -> None: ...


class Stream:
    """One multiplexed stream. Async methods for the ends; `listener` for the gateway."""

    def __init__(self, link: Link, stream_id: int, headers: Mapping[str, str]) -> None:
        self.link = link
        self.stream_id = stream_id
        self._headers = dict(headers)
        self.listener: StreamListener | None = None
        self._buffer: deque[bytes] = deque()
        self._buffered = 0
        self._eof = False
        self.reset_code: int | None = None
        self.local_closed = False
        self._readable = asyncio.Event()
        self._credit = asyncio.Event()

    def __repr__(self) -> str:
        return f"<Stream {self.stream_id} on {self.link.name}>"

    @property
    def headers(self) -> Mapping[str, str]:
        return self._headers

    @property
    def buffered(self) -> int:
        return self._buffered

    @property
    def priority(self) -> Priority | None:
        """The stream's priority as the core schedules it (None once closed)."""
        return self.link.conn.priority(self.stream_id)

    def reprioritise(self, urgency: int, incremental: bool | None = None) -> None:
        """Change this stream's priority, here and at the peer (see Link.reprioritise)."""
        self.link.reprioritise(self, urgency, incremental)

    # -- events from the link

    def _on_data(self, data: bytes) -> None:
        if self.reset_code is not None:
            return  # reset by the application earlier in this batch of events
        if self.listener is not None:
            self.listener.on_data(self, data)
            return
        self._buffer.append(data)
        self._buffered += len(data)
        self._readable.set()

    def _on_end(self) -> None:
        if self.reset_code is not None:
            return
        self._eof = True
        if self.listener is not None:
            self.listener.on_end(self)
        self._readable.set()

    def _on_credit(self) -> None:
        if self.listener is not None:
            self.listener.on_credit(self)
        self._credit.set()

    def _on_reset(self, code: int) -> None:
        if self.reset_code is not None:
            return
        self.reset_code = code
        self.link._queue_blocked.discard(self)
        self.link._background_held.discard(self)
        self._buffer.clear()
        self._buffered = 0
        if self.listener is not None:
            self.listener.on_reset(self, code)
        self._readable.set()
        self._credit.set()

    # -- non-blocking interface (gateway)

    def send_credit(self) -> int:
        """Bytes send_nowait() may take now: flow-control credit, and what fits in the
        room left in the core's queue (QUEUE_STREAM, QUEUE_LINK, counted by cost: see
        fits_in), and for a background stream while a more urgent one is busy,
        BACKGROUND_IN_FLIGHT less its bytes in flight. At 0 because of the queue, the
        stream is woken (`_on_credit`) once the link has sent half of it; held as
        background, after ACTIVE_FOR or when credit comes back."""
        if self.reset_code is not None or self.local_closed:
            return 0
        link = self.link
        conn = link.conn
        credit = conn.send_credit(self.stream_id)
        if credit <= 0:
            return 0
        prio = conn.priority(self.stream_id)
        ahead = conn.queued_cost_ahead_of(prio.urgency) if prio is not None else conn.queued_cost
        room = fits_in(queue_room(conn.queued_cost_on(self.stream_id), ahead), conn.peer_max_frame)
        if room <= 0:
            link._queue_blocked.add(self)
            return 0
        if prio is not None and prio.urgency > DEFAULT_URGENCY and link.busier(prio.urgency):
            room = min(room, BACKGROUND_IN_FLIGHT - conn.in_flight(self.stream_id))
            if room <= 0:
                link._hold_background(self)
                return 0
        return min(credit, room)

    def _queue_drained(self) -> bool:
        conn = self.link.conn
        prio = conn.priority(self.stream_id)
        ahead = conn.queued_cost_ahead_of(prio.urgency) if prio is not None else 0
        return conn.queued_cost_on(self.stream_id) <= QUEUE_STREAM // 2 and ahead <= QUEUE_LINK // 2

    def send_nowait(self, data: bytes, end_stream: bool = False) -> None:
        """Send within send_credit(); the caller checked it."""
        self.link.conn.send_data(self.stream_id, data, end_stream)
        if end_stream:
            self.local_closed = True
        self.link.flush()

    def acknowledge(self, size: int) -> None:
        """Return credit for `size` bytes that this side has consumed (or passed on)."""
        self.link.conn.acknowledge_received_data(self.stream_id, size)
        self.link.flush()

    # -- ByteStream interface (ends)

    async def read(self, max_bytes: int = 65536) -> bytes:
        while not self._buffer:
            if self.reset_code is not None:
                raise StreamResetError(self.reset_code)
            if self._eof:
                return b""
            self._readable.clear()
            await self._readable.wait()
        chunk = self._buffer.popleft()
        if len(chunk) > max_bytes:
            self._buffer.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        self._buffered -= len(chunk)
        self.acknowledge(len(chunk))
        return chunk

    async def write(self, data: bytes) -> None:
        pos, size = 0, len(data)
        while pos < size:
            if self.reset_code is not None:
                raise StreamResetError(self.reset_code)
            if self.local_closed:
                raise StreamResetError(ErrorCode.STREAM_CLOSED, "write after write_eof")
            if self.link.conn.terminated is not None:
                raise StreamResetError(self.link.conn.terminated.code, "link closed")
            credit = self.send_credit()
            if credit <= 0:
                self._credit.clear()
                await self._credit.wait()  # credit, the core's queue drained, or a reset
                continue
            n = min(credit, size - pos)
            chunk = data if n == size else bytes(memoryview(data)[pos : pos + n])
            self.send_nowait(chunk)
            pos += n

    async def write_eof(self) -> None:
        if self.reset_code is not None:
            raise StreamResetError(self.reset_code)
        if not self.local_closed and self.link.conn.terminated is None:
            self.send_nowait(b"", end_stream=True)

    def reset(self, code: int = ErrorCode.CANCEL) -> None:
        if self.reset_code is None:
            self.link.conn.reset_stream(self.stream_id, code)
            self.link.flush()
            self._on_reset(code)

    def release(self) -> None:
        """Give back credit for data that will never be read (the application is done)."""
        if self._buffered:
            size, self._buffered = self._buffered, 0
            self._buffer.clear()
            self.acknowledge(size)


class Link(asyncio.Protocol):
    """A multiplexed link over one (TLS) transport.

    Create it and hand it to the loop as a protocol. A server creates it with
    `autostart=False` (relay.net.tls.accept_tls) and calls `start()` once the peer's identity
    is accepted; bytes that arrive before are held (at most PRESTART_LIMIT). Then open
    streams, or receive them through `on_stream`.
    """

    def __init__(
        self,
        *,
        client: bool,
        settings: LinkSettings,
        name: str = "link",
        on_stream: Callable[[Stream], None] | None = None,
        on_control: Callable[[str, bytes], None] | None = None,
        on_goaway: Callable[[int, str], None] | None = None,
        autostart: bool = True,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.name = name
        self.conn = Connection(client=client, settings=settings, now=self.loop.time())
        self.on_stream = on_stream
        self.on_control = on_control
        self.on_goaway = on_goaway
        self.goaway_code: int | None = None  # the peer's GOAWAY, once it sent one
        self.streams: dict[int, Stream] = {}
        self.transport: asyncio.Transport | None = None
        self.peer: Any = None  # set by the owner: an Identity, for logs and routing
        # Set by an owner whose peers are many (the gateway): told, instead of a warning
        # logged here, why the link is aborted because the peer does not read, so that
        # it can count every one and limit the lines per source (relay.ops.loglimit).
        self.on_unread: Callable[[str], None] | None = None
        self.closed: asyncio.Future[ConnectionTerminated] = self.loop.create_future()
        self._autostart = autostart
        self._prestart: list[bytes] | None = [] if not autostart else None
        self._prestart_size = 0
        # Paused by the transport's write buffer; the Event that writers wait on is made
        # only when one has to (an Event's deque is 760 bytes per idle link).
        self._paused = False
        self._resumed: asyncio.Event | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self._flush_scheduled = False
        self._closed_by_us: tuple[int, str] | None = None
        # The core's replies_queued already written, and those still in the transport's
        # buffer: their sum, and (bytes_out after the write, bytes) per write, made only
        # once answers are written (a deque is 600 bytes). See CONTROL_REPLIES.
        self._replies_seen = 0
        self._replies_unread = 0
        self._reply_marks: deque[tuple[int, int]] | None = None
        self._queue_blocked: set[Stream] = set()  # writers waiting for the core's queue
        # When each urgency last had DATA go out (loop time), from the core's counters.
        self._emitted_seen: list[int] = []
        self._active_at: list[float] = []
        self._background_held: set[Stream] = set()
        self._background_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tr = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        if self._autostart:
            self.start(tr)
        else:
            self.transport = tr

    def start(self, transport: asyncio.Transport | None = None) -> None:
        """Begin speaking the protocol: flush our SETTINGS and feed what arrived meanwhile."""
        if transport is not None:
            self.transport = transport
        assert self.transport is not None
        set_nodelay(self.transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        pending, self._prestart = self._prestart, None
        self.flush()
        for data in pending or ():
            self.data_received(data)
        self._arm_timer()

    def data_received(self, data: bytes) -> None:
        if self._prestart is not None:
            self._prestart.append(data)
            self._prestart_size += len(data)
            if self._prestart_size > PRESTART_LIMIT:
                self.abort()
            return
        self.bytes_in += len(data)
        self._dispatch(self.conn.receive_data(data, self.loop.time()))
        self.flush()

    def eof_received(self) -> bool | None:
        return False  # close the transport; connection_lost does the rest

    def connection_lost(self, exc: Exception | None) -> None:
        self._prestart = None
        if self._closed_by_us is not None:
            self._dispatch(self.conn.close_locally(*self._closed_by_us))
        else:
            self._dispatch(self.conn.receive_eof())
        self._finish()

    def pause_writing(self) -> None:
        self._paused = True
        if self._resumed is not None:
            self._resumed.clear()

    def resume_writing(self) -> None:
        self._paused = False
        if self._resumed is not None:
            self._resumed.set()
        self.flush()  # the core's queue, in priority order, into the drained transport

    # -- API

    @property
    def writable(self) -> bool:
        return not self._paused

    async def wait_writable(self) -> None:
        if self._paused:
            if self._resumed is None:
                self._resumed = asyncio.Event()
            await self._resumed.wait()

    @property
    def is_closing(self) -> bool:
        conn = self.conn
        return conn.terminated is not None or conn.goaway_sent or conn.goaway_received

    def open_stream(self, headers: Mapping[str, str], priority: Priority | None = None) -> Stream:
        """Open a stream now (no round trip). Raises LinkClosedError / StreamStateError.

        `priority` (default: the `priority` header if any, else u=3 incremental) orders
        this stream's DATA against the others, in both directions.
        """
        if priority is not None:
            headers = {**headers, HEADER_PRIORITY: priority.field()}
        stream_id = self.conn.open_stream(headers)
        stream = Stream(self, stream_id, headers)
        self.streams[stream_id] = stream
        self.flush()
        return stream

    def reprioritise(self, stream: Stream, urgency: int, incremental: bool | None = None) -> None:
        """Move a stream to `urgency` (0 first .. 7 last; `incremental` unchanged if None):
        what it has queued here is reordered at once, and the peer is told with
        PRIORITY_UPDATE so that its data towards us follows. A closed stream is ignored.
        Raises ValueError for an urgency outside 0-7."""
        current = self.conn.priority(stream.stream_id)
        if current is None:
            return
        keep = current.incremental if incremental is None else incremental
        self.conn.set_priority(stream.stream_id, Priority(urgency, keep))
        self.flush()

    def send_control(self, kind: str, body: bytes) -> None:
        self.conn.send_control(kind, body)
        self.flush()

    def goaway(self, code: int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        self.conn.goaway(code, reason)
        self.flush()

    def close(self, code: int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Goaway then close the transport once what is queued is written."""
        with contextlib.suppress(LinkClosedError):
            self.goaway(code, reason)
        self._flush_now(everything=True)  # the goaway and queued data before the close
        if self._closed_by_us is None:
            self._closed_by_us = (code, reason or "closed by this side")
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        elif self.transport is None:
            self._finish()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        else:
            self._finish()

    async def wait_closed(self) -> ConnectionTerminated:
        return await asyncio.shield(self.closed)

    def flush(self) -> None:
        """Write what the core has queued, once per loop iteration.

        Splicing calls this per frame and per acknowledgement; coalescing makes that one
        `transport.write` (one TLS record batch, one send(2)) per link per iteration.
        """
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush_now)

    def _flush_now(self, everything: bool = False) -> None:
        """Control frames always; DATA only up to WRITE_HIGH in the transport (all of it
        when closing), the rest stays in the core where the scheduler can reorder it."""
        self._flush_scheduled = False
        transport = self.transport
        if transport is None or self._prestart is not None:
            return
        conn = self.conn
        room = None if everything else WRITE_HIGH + 1 - transport.get_write_buffer_size()
        data = conn.data_to_send(room if room is None else max(room, 0))
        replies = conn.replies_queued - self._replies_seen  # all of them are in `data`
        self._replies_seen = conn.replies_queued
        if data and not transport.is_closing():
            self.bytes_out += len(data)
            transport.write(data)
            if replies and self._unread_replies(replies, transport) > CONTROL_REPLIES:
                self._abort_unread()
                return
            if transport.get_write_buffer_size() > WRITE_HARD:
                self._report_unread(f"peer does not read (WRITE_HARD {WRITE_HARD} buffered)")
                transport.abort()
        if conn.terminated is not None and not transport.is_closing():
            transport.close()
            return
        if conn.data_pending and not self._paused and not transport.is_closing():
            if data:
                self.flush()  # the transport sent straight to the socket: there is room yet
            else:  # over the mark yet not paused (a transport that does not pause): poll
                self.loop.call_later(REFLUSH_DELAY, self.flush)
        if self._queue_blocked:
            self._wake_queue_blocked()
        self._note_activity()

    def _unread_replies(self, replies: int, transport: asyncio.Transport) -> int:
        """Count `replies` bytes of answers just written; forget those the transport has
        sent since; return how many are still in its buffer."""
        marks = self._reply_marks
        if marks is None:
            marks = self._reply_marks = deque()
        sent = self.bytes_out - transport.get_write_buffer_size()
        while marks and marks[0][0] <= sent:
            self._replies_unread -= marks.popleft()[1]
        self._replies_unread += replies
        if len(marks) >= _REPLY_MARKS:  # merged: counted until the later offset is sent
            replies += marks.pop()[1]
        marks.append((self.bytes_out, replies))
        return self._replies_unread

    def _abort_unread(self) -> None:
        """The peer asks (PINGs, OPENs we refuse) and does not read the answers."""
        reason = (
            f"peer does not read: {self._replies_unread} bytes of answers to its PINGs "
            f"and refused streams unread (CONTROL_REPLIES {CONTROL_REPLIES})"
        )
        self._report_unread(reason)
        if self._closed_by_us is None:
            self._closed_by_us = (ErrorCode.LIMIT_EXCEEDED, reason)
        assert self.transport is not None
        self.transport.abort()

    def _report_unread(self, reason: str) -> None:
        """The link is aborted: the peer does not read. Its owner's `on_unread` if set
        (a peer could otherwise write one line per link it opens), else one warning."""
        if self.on_unread is not None:
            self.on_unread(reason)
        else:
            log.warning("link %s: %s, aborting", self.name, reason)

    def busier(self, urgency: int) -> bool:
        """A more urgent stream than `urgency` sent DATA within ACTIVE_FOR seconds."""
        if not self._active_at:
            return False
        horizon = self.loop.time() - ACTIVE_FOR
        return any(at > horizon for at in self._active_at[:urgency])

    def _note_activity(self) -> None:
        emitted = self.conn.emitted_by_urgency
        seen = self._emitted_seen
        if emitted == seen:  # the hot path: one list comparison per flush
            return
        if not self._active_at:
            self._active_at = [float("-inf")] * URGENCY_LEVELS
            seen = self._emitted_seen = [0] * URGENCY_LEVELS
        now = self.loop.time()
        for urgency in range(URGENCY_LEVELS):
            if emitted[urgency] != seen[urgency]:
                seen[urgency] = emitted[urgency]
                self._active_at[urgency] = now

    def _hold_background(self, stream: Stream) -> None:
        """`stream` waits because a more urgent one is busy: look again when that may have
        ended (credit returned for the stream also wakes it, as any credit does)."""
        self._background_held.add(stream)
        if self._background_timer is None:
            self._background_timer = self.loop.call_later(ACTIVE_FOR, self._release_background)

    def _release_background(self) -> None:
        self._background_timer = None
        held, self._background_held = self._background_held, set()
        for stream in held:
            stream._on_credit()  # the writer asks send_credit() again, and may wait again

    def _wake_queue_blocked(self) -> None:
        blocked = self._queue_blocked
        for stream in [s for s in blocked if s._queue_drained() or s.reset_code is not None]:
            blocked.discard(stream)
            stream._on_credit()

    # -- internals

    def _dispatch(self, events: list[Event]) -> None:
        streams = self.streams
        for event in events:
            match event:
                case DataReceived(stream_id=sid, data=data):
                    streams[sid]._on_data(data)
                case CreditAvailable(stream_id=0):
                    for stream in list(streams.values()):
                        stream._on_credit()
                case CreditAvailable(stream_id=sid):
                    if sid in streams:
                        streams[sid]._on_credit()
                case StreamOpened(stream_id=sid, headers=headers):
                    opened = streams[sid] = Stream(self, sid, headers)
                    if self.on_stream is None:
                        opened.reset(ErrorCode.REFUSED_STREAM)
                    else:
                        self.on_stream(opened)
                case StreamEnded(stream_id=sid):
                    if sid in streams:
                        streams[sid]._on_end()
                case StreamReset(stream_id=sid, code=code):
                    if sid in streams:
                        streams.pop(sid)._on_reset(code)
                case ControlReceived(kind=kind, body=body):
                    if self.on_control is not None:
                        self.on_control(kind, body)
                case GoAwayReceived(code=code, reason=reason):
                    self.goaway_code = code
                    if self.on_goaway is not None:
                        self.on_goaway(code, reason)
                case ConnectionTerminated():
                    if not self.closed.done():
                        self.closed.set_result(event)
        # Forget streams the core has closed in both directions.
        if len(streams) != self.conn.open_streams:
            for sid in [s for s in streams if not self.conn.is_open(s)]:
                del streams[sid]

    def _arm_timer(self) -> None:
        deadline = self.conn.next_timer()
        if deadline is None:
            return
        if self._timer is not None and self._timer_at is not None and self._timer_at <= deadline:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self._dispatch(self.conn.handle_timer(self.loop.time()))
        self.flush()
        self._arm_timer()

    def _finish(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for stream in list(self.streams.values()):
            stream._on_reset(ErrorCode.INTERNAL_ERROR)
        self.streams.clear()
        self._queue_blocked.clear()
        self._background_held.clear()
        if self._background_timer is not None:
            self._background_timer.cancel()
            self._background_timer = None
        self._paused = False
        if self._resumed is not None:
            self._resumed.set()
        if not self.closed.done():
            self.closed.set_result(
                self.conn.terminated or ConnectionTerminated(ErrorCode.INTERNAL_ERROR, "lost", True)
            )
