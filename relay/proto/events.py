"""What the core reports to the application after `receive_data()` or `handle_timer()`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of all events."""


@dataclass(frozen=True, slots=True)
class StreamOpened(Event):
    """The peer opened a stream; `headers` say what it wants (target, codec...)."""

    stream_id: int
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DataReceived(Event):
    """Bytes for a stream. Acknowledge them once consumed to return the credit."""

    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded(Event):
    """The peer half-closed the stream: no more DataReceived for it."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset(Event):
    """The stream is gone. `remote` is False when this side detected the error."""

    stream_id: int
    code: int
    remote: bool = True


@dataclass(frozen=True, slots=True)
class CreditAvailable(Event):
    """The peer granted credit on a stream (stream_id 0: the whole link)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class PongReceived(Event):
    """Answer to our keepalive ping, with the measured round trip in seconds."""

    rtt: float


@dataclass(frozen=True, slots=True)
class GoAwayReceived(Event):
    """The peer will accept no new streams; streams above `last_stream_id` were refused."""

    last_stream_id: int
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class ControlReceived(Event):
    """A link-level control message (revocation, enrollment, renewal...)."""

    kind: str
    body: bytes


@dataclass(frozen=True, slots=True)
class ConnectionTerminated(Event):
    """The link is dead: a protocol error, a keepalive timeout, or the peer's goaway."""

    code: int
    reason: str
    remote: bool
