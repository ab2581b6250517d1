"""Error codes carried by RESET and GOAWAY frames, and the exceptions the core raises."""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Why a stream was reset or a link closed. Values are on the wire: never renumber."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    STREAM_CLOSED = 0x4
    FRAME_SIZE_ERROR = 0x5
    REFUSED_STREAM = 0x6
    CANCEL = 0x7
    NO_ROUTE = 0x8
    FORBIDDEN = 0x9
    CONNECT_FAILED = 0xA
    HEADERS_TOO_LARGE = 0xB
    KEEPALIVE_TIMEOUT = 0xC
    UNSUPPORTED_VERSION = 0xD
    REVOKED = 0xE
    SHUTDOWN = 0xF
    LIMIT_EXCEEDED = 0x10

    @classmethod
    def name_of(cls, code: int) -> str:
        """A metric-safe name for any code, including ones this version does not know."""
        try:
            return cls(code).name.lower()
        except ValueError:
            return "unknown"


class ProtocolError(Exception):
    """The peer broke the protocol; the link must close with `code`."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class FlowControlError(ValueError):
    """The application tried to send beyond the credit it was given."""


class StreamStateError(ValueError):
    """The application used a stream that is unknown, closed or already half-closed."""


class LinkClosedError(RuntimeError):
    """The link is closing (goaway sent or received) or closed: no new streams."""
