"""The sans-I/O relay protocol: frames, flow control and the multiplexing state machine."""

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
from relay.proto.frames import VERSION
from relay.proto.mux import Connection
from relay.proto.priority import (
    DEFAULT_PRIORITY,
    QUEUED_FRAME_COST,
    QUEUED_VIEW_COST,
    URGENCY_LEVELS,
    Priority,
)
from relay.proto.settings import FieldError, LinkSettings

__all__ = [
    "DEFAULT_PRIORITY",
    "QUEUED_FRAME_COST",
    "QUEUED_VIEW_COST",
    "URGENCY_LEVELS",
    "VERSION",
    "Connection",
    "ConnectionTerminated",
    "ControlReceived",
    "CreditAvailable",
    "DataReceived",
    "ErrorCode",
    "Event",
    "FieldError",
    "FlowControlError",
    "GoAwayReceived",
    "LinkClosedError",
    "LinkSettings",
    "PongReceived",
    "Priority",
    "ProtocolError",
    "StreamEnded",
    "StreamOpened",
    "StreamReset",
    "StreamStateError",
]
