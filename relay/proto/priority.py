"""Stream priorities (RFC 9218 urgency and incremental) and the core's send scheduler.

A stream's priority says in which order its DATA leaves when several streams have data
queued with credit: the lowest urgency first; within one urgency the non-incremental
streams one after another in the order they were opened (FIFO), then the incremental
ones round-robin, one frame each. The scheduler is work-conserving: a stream with nothing
queued never holds back another.

Priority is carried as an RFC 9218 structured-field dictionary (`u=5, i`), in the OPEN
header `priority` and in PRIORITY_UPDATE frames. One deviation from RFC 9218: a missing
`i` means incremental, because before priorities existed every stream shared the link
round-robin, and a long-lived `tcp:` forward must not starve the streams opened after it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Final

__all__ = [
    "DEFAULT_PRIORITY",
    "DEFAULT_URGENCY",
    "HEADER_PRIORITY",
    "MAX_PRIORITY_FIELD",
    "QUEUED_FRAME_COST",
    "QUEUED_VIEW_COST",
    "URGENCY_LEVELS",
    "Priority",
    "Scheduler",
    "frame_cost",
    "parse_priority",
]

HEADER_PRIORITY: Final = "priority"  # the OPEN header; relay.wire.HEADER_PRIORITY is this name
URGENCY_LEVELS: Final = 8  # urgency 0 (first) .. 7 (last)
DEFAULT_URGENCY: Final = 3
MAX_PRIORITY_FIELD: Final = 64  # bytes of a priority field value; PRIORITY_UPDATE payload
# Memory a queued DATA frame holds beyond its payload bytes, so that a bound on the queue
# (relay.net.aio's QUEUE_STREAM, QUEUE_LINK) bounds memory and not only data: 1-byte
# writes would otherwise hold ~110 times the bound. Measured (CPython 3.11, tracemalloc):
# the encoded header, the (header, payload) tuple and its deque slot take 105-109 bytes,
# a bytes payload's object header 33-48 more; a memoryview payload (a slice of a write
# larger than a frame) is a 193-byte object instead.
QUEUED_FRAME_COST: Final = 160
QUEUED_VIEW_COST: Final = 320  # any payload that is not bytes: a memoryview, a bytearray


def frame_cost(payload: bytes | memoryview) -> int:
    """What one queued DATA frame with this payload counts against the queue bounds."""
    extra = QUEUED_FRAME_COST if type(payload) is bytes else QUEUED_VIEW_COST
    return len(payload) + extra


@dataclass(frozen=True, slots=True)
class Priority:
    """Urgency 0..7 (lower goes first) and whether the stream shares its urgency."""

    urgency: int = DEFAULT_URGENCY
    incremental: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.urgency < URGENCY_LEVELS:
            raise ValueError(f"urgency must be 0-{URGENCY_LEVELS - 1}, got {self.urgency}")

    def field(self) -> str:
        """The structured-field spelling, e.g. `u=6` or `u=3, i=?0`."""
        return f"u={self.urgency}" if self.incremental else f"u={self.urgency}, i=?0"


DEFAULT_PRIORITY: Final = Priority()


# The urgencies as RFC 9218 spells them: one ASCII digit. Not str.isdigit() or int(),
# which also take other scripts' digits ("٣") and, for isdigit, ones int() refuses ("²").
_URGENCIES: Final = {str(u): u for u in range(URGENCY_LEVELS)}


def parse_priority(value: str | None, default: Priority = DEFAULT_PRIORITY) -> Priority:
    """Parse an RFC 9218 priority field; members missing or malformed keep `default`'s
    value and unknown members are ignored (RFC 9218 section 4), so it never raises: the
    value comes from the peer (an OPEN header, a PRIORITY_UPDATE)."""
    if not value or len(value) > MAX_PRIORITY_FIELD:
        return default
    urgency, incremental = default.urgency, default.incremental
    for member in value.split(","):
        key, _, raw = member.strip().partition("=")
        key = key.strip()
        params = raw.split(";", 1)[0].strip()  # parameters are ignored
        if key == "u":
            urgency = _URGENCIES.get(params, urgency)
        elif key == "i":
            if not raw:
                incremental = True  # bare key: boolean true
            elif params in ("?0", "?1"):
                incremental = params == "?1"
    return Priority(urgency, incremental)


class _Queue:
    """One stream's queued DATA frames (header already encoded), their payload bytes and
    their cost (frame_cost)."""

    __slots__ = ("cost", "finished", "frames", "order", "priority", "size")

    def __init__(self, priority: Priority, order: int) -> None:
        self.frames: deque[tuple[bytes, bytes | memoryview]] = deque()
        self.size = 0
        self.cost = 0
        self.finished = False  # the core forgot the stream: drop the queue once empty
        self.priority = priority
        self.order = order


class Scheduler:
    """Per-stream DATA queues and the order they are emitted in. Sans-I/O, no limits of
    its own: what it holds was paid for with flow-control credit, which bounds it; the
    adapter bounds it tighter by cost (frame_cost: payload and per-frame memory)."""

    def __init__(self) -> None:
        self._queues: dict[int, _Queue] = {}
        # Streams with frames queued, by urgency: non-incremental ones by open order (the
        # head is cached, so a busy head costs O(1) per frame), incremental ones in an
        # insertion-ordered dict rotated one frame at a time.
        self._fifo: list[dict[int, int]] = [{} for _ in range(URGENCY_LEVELS)]
        self._head: list[int | None] = [None] * URGENCY_LEVELS
        self._rr: list[dict[int, None]] = [{} for _ in range(URGENCY_LEVELS)]
        self._bytes = [0] * URGENCY_LEVELS
        self._total = 0
        self._costs = [0] * URGENCY_LEVELS
        self._total_cost = 0
        self._frames = 0
        self.emitted = [0] * URGENCY_LEVELS  # payload bytes ever emitted, by urgency

    # -- inspection

    @property
    def pending(self) -> bool:
        """Frames are queued (a bare FIN is a frame without payload bytes)."""
        return self._frames > 0

    @property
    def queued(self) -> int:
        """Payload bytes queued on all streams."""
        return self._total

    def queued_on(self, stream_id: int) -> int:
        queue = self._queues.get(stream_id)
        return queue.size if queue is not None else 0

    def queued_up_to(self, urgency: int) -> int:
        """Payload bytes queued at this urgency or a more urgent one: what a new frame at
        `urgency` would have to wait behind."""
        return sum(self._bytes[: urgency + 1])

    @property
    def cost(self) -> int:
        """frame_cost of every queued frame: payload bytes plus per-frame memory."""
        return self._total_cost

    def cost_on(self, stream_id: int) -> int:
        queue = self._queues.get(stream_id)
        return queue.cost if queue is not None else 0

    def cost_up_to(self, urgency: int) -> int:
        """The cost of the frames a new frame at `urgency` would wait behind."""
        return sum(self._costs[: urgency + 1])

    def priority_of(self, stream_id: int) -> Priority | None:
        queue = self._queues.get(stream_id)
        return queue.priority if queue is not None else None

    # -- streams

    def add(self, stream_id: int, priority: Priority, order: int) -> None:
        """Register a stream; `order` is its place in the FIFO of its urgency."""
        self._queues[stream_id] = _Queue(priority, order)

    def set_priority(self, stream_id: int, priority: Priority) -> None:
        queue = self._queues.get(stream_id)
        if queue is None or queue.finished or queue.priority == priority:
            return
        if queue.frames:
            self._unready(stream_id, queue)
            self._bytes[queue.priority.urgency] -= queue.size
            self._costs[queue.priority.urgency] -= queue.cost
        queue.priority = priority
        if queue.frames:
            self._bytes[priority.urgency] += queue.size
            self._costs[priority.urgency] += queue.cost
            self._ready(stream_id, queue)

    def finish(self, stream_id: int) -> None:
        """The stream is closed both ways: forget it once its last frame is out."""
        queue = self._queues.get(stream_id)
        if queue is not None:
            if queue.frames:
                queue.finished = True
            else:
                del self._queues[stream_id]

    def remove(self, stream_id: int) -> int:
        """Forget a stream and what it had queued; returns the payload bytes dropped."""
        queue = self._queues.pop(stream_id, None)
        if queue is None:
            return 0
        if queue.frames:
            self._unready(stream_id, queue)
        dropped = queue.size
        self._frames -= len(queue.frames)
        self._bytes[queue.priority.urgency] -= dropped
        self._total -= dropped
        self._costs[queue.priority.urgency] -= queue.cost
        self._total_cost -= queue.cost
        return dropped

    def clear(self) -> None:
        """Forget every stream (the link is over)."""
        self._queues.clear()
        for urgency in range(URGENCY_LEVELS):
            self._fifo[urgency].clear()
            self._rr[urgency].clear()
            self._head[urgency] = None
            self._bytes[urgency] = 0
            self._costs[urgency] = 0
        self._total = 0
        self._total_cost = 0
        self._frames = 0

    # -- data

    def push(self, stream_id: int, header: bytes, payload: bytes | memoryview) -> None:
        """Queue one encoded DATA frame (payload may be empty: a bare FIN)."""
        queue = self._queues[stream_id]
        size = len(payload)
        if not queue.frames:
            self._ready(stream_id, queue)
        queue.frames.append((header, payload))
        self._frames += 1
        queue.size += size
        self._bytes[queue.priority.urgency] += size
        self._total += size
        cost = frame_cost(payload)
        queue.cost += cost
        self._costs[queue.priority.urgency] += cost
        self._total_cost += cost

    def pop(self, limit: int | None, out: list[bytes | memoryview]) -> int:
        """Append frames to `out` in priority order until at least `limit` bytes
        (headers included) were taken, or all of them with `limit` None; a frame is never
        split, so `limit` is exceeded by at most one frame. Returns the bytes taken."""
        taken = 0
        for urgency in range(URGENCY_LEVELS):
            fifo, rr = self._fifo[urgency], self._rr[urgency]
            while fifo or rr:
                if limit is not None and taken >= limit:
                    return taken
                if fifo:
                    stream_id = self._head[urgency]
                    if stream_id is None:
                        stream_id = min(fifo, key=fifo.__getitem__)
                        self._head[urgency] = stream_id
                else:
                    stream_id = next(iter(rr))
                    del rr[stream_id]  # to the back of the round, if it has more
                    rr[stream_id] = None
                taken += self._emit(stream_id, out)
        return taken

    # -- internals

    def _emit(self, stream_id: int, out: list[bytes | memoryview]) -> int:
        queue = self._queues[stream_id]
        header, payload = queue.frames.popleft()
        self._frames -= 1
        size = len(payload)
        queue.size -= size
        self._bytes[queue.priority.urgency] -= size
        self.emitted[queue.priority.urgency] += size
        self._total -= size
        cost = frame_cost(payload)
        queue.cost -= cost
        self._costs[queue.priority.urgency] -= cost
        self._total_cost -= cost
        out.append(header)
        if size:
            out.append(payload)
        if not queue.frames:
            self._unready(stream_id, queue)
            if queue.finished:
                del self._queues[stream_id]
        return len(header) + size

    def _ready(self, stream_id: int, queue: _Queue) -> None:
        urgency = queue.priority.urgency
        if queue.priority.incremental:
            self._rr[urgency][stream_id] = None
        else:
            self._fifo[urgency][stream_id] = queue.order
            head = self._head[urgency]
            if head is not None and queue.order < self._fifo[urgency][head]:
                self._head[urgency] = stream_id

    def _unready(self, stream_id: int, queue: _Queue) -> None:
        urgency = queue.priority.urgency
        if queue.priority.incremental:
            self._rr[urgency].pop(stream_id, None)
        else:
            self._fifo[urgency].pop(stream_id, None)
            if self._head[urgency] == stream_id:
                self._head[urgency] = None
