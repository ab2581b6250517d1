"""Small JSON messages over a relay stream: a 4-byte big-endian length, then UTF-8 JSON.

Enrollment and renewal exchange two or three such messages on one stream. The length
comes first so a receiver refuses an oversized message from its header alone, before
buffering any of it. Every message is a JSON object; anything else is malformed.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Mapping
from typing import Final

from relay.net.bytestream import ByteStream, read_exactly

__all__ = [
    "DEFAULT_LIMIT",
    "MessageError",
    "MessageTooLarge",
    "encode_json",
    "read_json",
    "write_json",
]

DEFAULT_LIMIT: Final = 16 * 1024
_LENGTH: Final = struct.Struct(">I")


class MessageError(Exception):
    """A message could not be read or was not a JSON object; str() is one line."""


class MessageTooLarge(MessageError):
    """The length header announces more than the receiver accepts."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"message of {size} bytes is larger than the limit of {limit} bytes")
        self.size = size
        self.limit = limit


def encode_json(message: Mapping[str, object], *, limit: int = DEFAULT_LIMIT) -> bytes:
    """The framed bytes of `message`; ValueError if it is larger than `limit`."""
    body = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(body) > limit:
        raise ValueError(f"message of {len(body)} bytes is larger than the limit of {limit}")
    return _LENGTH.pack(len(body)) + body


async def write_json(
    stream: ByteStream, message: Mapping[str, object], *, limit: int = DEFAULT_LIMIT
) -> None:
    """Send one message (raises StreamResetError if the peer aborted)."""
    await stream.write(encode_json(message, limit=limit))


async def read_json(stream: ByteStream, *, limit: int = DEFAULT_LIMIT) -> dict[str, object]:
    """Receive one message of at most `limit` bytes.

    Raises MessageTooLarge from the header alone, MessageError if the stream ends early
    or the body is not a JSON object, StreamResetError if the peer aborted.
    """
    try:
        header = await read_exactly(stream, _LENGTH.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise MessageError("the peer closed the stream without answering") from None
        raise MessageError("the stream ended inside a message header") from None
    (size,) = _LENGTH.unpack(header)
    if size > limit:
        raise MessageTooLarge(size, limit)
    try:
        body = await read_exactly(stream, size)
    except asyncio.IncompleteReadError:
        raise MessageError(f"the stream ended inside a message of {size} bytes") from None
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise MessageError("malformed message (not UTF-8 JSON)") from None
    if not isinstance(value, dict):
        raise MessageError("malformed message (not a JSON object)")
    return value
