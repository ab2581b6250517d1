"""Frame layout, encoding and incremental decoding. See relay/PROTOCOL.md for the bytes.

Every frame starts with a fixed 12-byte header::

    version:u8  type:u8  flags:u16  stream_id:u32  length:u32

followed by `length` payload bytes. All integers are big-endian. The decoder never
buffers more than one frame beyond what it was given, and refuses a frame whose length
exceeds the receiver's announced maximum before reading its payload.
"""

from __future__ import annotations

import struct
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from relay.proto.errors import ErrorCode, ProtocolError

VERSION = 1
HEADER = struct.Struct(">BBHII")
HEADER_SIZE = HEADER.size  # 12

MAX_STREAM_ID = 2**32 - 1
MAX_WINDOW = 2**31 - 1

# Protocol defaults: what each side may assume before the peer's SETTINGS arrive.
DEFAULT_STREAM_WINDOW = 64 * 1024
DEFAULT_LINK_WINDOW = 64 * 1024
DEFAULT_MAX_FRAME = 16 * 1024
DEFAULT_MAX_STREAMS = 100
MIN_MAX_FRAME = 16 * 1024
MAX_MAX_FRAME = 16 * 1024 * 1024

# Header block (OPEN) limits: fixed by the protocol, not negotiable.
MAX_HEADERS = 32
MAX_HEADER_NAME = 64
MAX_HEADER_VALUE = 1024
MAX_HEADER_BLOCK = 8 * 1024
MAX_CONTROL_KIND = 64
MAX_GOAWAY_REASON = 256

_U32 = struct.Struct(">I")
_GOAWAY = struct.Struct(">II")
_SETTING = struct.Struct(">HI")
_NAME_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-_.")


class FrameType(IntEnum):
    SETTINGS = 0x0
    OPEN = 0x1
    DATA = 0x2
    WINDOW_UPDATE = 0x3
    RESET = 0x4
    PING = 0x5
    GOAWAY = 0x6
    CONTROL = 0x7
    PRIORITY_UPDATE = 0x8  # optional: a peer that predates it ignores it (unknown type)


class Flags(IntFlag):
    NONE = 0x0
    FIN = 0x1  # DATA: the sender will send nothing more on this stream
    ACK = 0x1  # PING: this is the answer


class Setting(IntEnum):
    STREAM_WINDOW = 0x1  # initial receive window of every stream, bytes
    LINK_WINDOW = 0x2  # initial receive window of the whole link, bytes
    MAX_FRAME = 0x3  # largest frame payload the sender accepts, bytes
    MAX_STREAMS = 0x4  # concurrent streams the peer may open


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame. `payload` is the raw payload; helpers below interpret it."""

    type: int
    flags: int
    stream_id: int
    payload: bytes


def encode_header(ftype: int, flags: int, stream_id: int, length: int) -> bytes:
    return HEADER.pack(VERSION, ftype, flags, stream_id, length)


def encode(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(VERSION, ftype, flags, stream_id, len(payload)) + payload


def encode_settings(values: Mapping[Setting, int]) -> bytes:
    body = b"".join(_SETTING.pack(k, v) for k, v in values.items())
    return encode(FrameType.SETTINGS, 0, 0, body)


def decode_settings(payload: bytes) -> dict[int, int]:
    if len(payload) % _SETTING.size:
        raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
    return dict(_SETTING.iter_unpack(payload))


def encode_u32(ftype: int, stream_id: int, value: int) -> bytes:
    return encode(ftype, 0, stream_id, _U32.pack(value))


def decode_u32(payload: bytes, what: str) -> int:
    if len(payload) != 4:
        raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, f"{what} payload must be 4 bytes")
    value: int = _U32.unpack(payload)[0]
    return value


def encode_goaway(last_stream_id: int, code: int, reason: str) -> bytes:
    text = reason.encode("utf-8")[:MAX_GOAWAY_REASON]
    return encode(FrameType.GOAWAY, 0, 0, _GOAWAY.pack(last_stream_id, code) + text)


def decode_goaway(payload: bytes) -> tuple[int, int, str]:
    if not _GOAWAY.size <= len(payload) <= _GOAWAY.size + MAX_GOAWAY_REASON:
        raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "bad GOAWAY length")
    last, code = _GOAWAY.unpack_from(payload)
    return last, code, payload[_GOAWAY.size :].decode("utf-8", "replace")


def _check_name(name: bytes, what: str) -> None:
    if not 1 <= len(name) <= MAX_HEADER_NAME or not _NAME_CHARS.issuperset(name):
        raise ValueError(f"bad {what} name {name!r}: 1-{MAX_HEADER_NAME} of [a-z0-9-_.]")


def encode_headers(headers: Mapping[str, str]) -> bytes:
    """Header block of an OPEN frame: count:u8 then (len:u8 name, len:u16 value)*.

    Raises ValueError for what the peer would refuse, so that the error is local.
    """
    if len(headers) > MAX_HEADERS:
        raise ValueError(f"at most {MAX_HEADERS} headers")
    parts = [bytes([len(headers)])]
    for name, value in headers.items():
        raw_name = name.encode("ascii", "replace")
        _check_name(raw_name, "header")
        raw_value = value.encode("utf-8")
        if len(raw_value) > MAX_HEADER_VALUE:
            raise ValueError(f"header {name!r} longer than {MAX_HEADER_VALUE} bytes")
        parts += [bytes([len(raw_name)]), raw_name, len(raw_value).to_bytes(2, "big"), raw_value]
    block = b"".join(parts)
    if len(block) > MAX_HEADER_BLOCK:
        raise ValueError(f"header block larger than {MAX_HEADER_BLOCK} bytes")
    return block


def decode_headers(block: bytes) -> dict[str, str]:
    """Inverse of encode_headers; raises ValueError on anything malformed or too large."""
    if not block or len(block) > MAX_HEADER_BLOCK:
        raise ValueError("empty or oversized header block")
    count = block[0]
    if count > MAX_HEADERS:
        raise ValueError("too many headers")
    pos = 1
    headers: dict[str, str] = {}
    for _ in range(count):
        if pos >= len(block):
            raise ValueError("truncated header block")
        nlen = block[pos]
        name = block[pos + 1 : pos + 1 + nlen]
        pos += 1 + nlen
        if len(name) != nlen or pos + 2 > len(block):
            raise ValueError("truncated header block")
        _check_name(name, "header")
        vlen = int.from_bytes(block[pos : pos + 2], "big")
        value = block[pos + 2 : pos + 2 + vlen]
        pos += 2 + vlen
        if len(value) != vlen or vlen > MAX_HEADER_VALUE:
            raise ValueError("truncated or oversized header value")
        key = name.decode("ascii")
        if key in headers:
            raise ValueError(f"duplicate header {key!r}")
        headers[key] = value.decode("utf-8")
    if pos != len(block):
        raise ValueError("trailing bytes after header block")
    return headers


def encode_control(kind: str, body: bytes) -> bytes:
    raw = kind.encode("ascii", "replace")
    if len(raw) > MAX_CONTROL_KIND:
        raise ValueError("control kind too long")
    _check_name(raw, "control")
    return encode(FrameType.CONTROL, 0, 0, bytes([len(raw)]) + raw + body)


def decode_control(payload: bytes) -> tuple[str, bytes]:
    if not payload:
        raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "empty CONTROL frame")
    klen = payload[0]
    raw = payload[1 : 1 + klen]
    try:
        if len(raw) != klen:
            raise ValueError("truncated")
        _check_name(raw, "control")
    except ValueError as exc:
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"bad CONTROL kind: {exc}") from None
    return raw.decode("ascii"), payload[1 + klen :]


class FrameDecoder:
    """Incremental decoder: feed bytes, iterate complete frames.

    `max_payload` is what this side announced; a larger frame is refused from its header,
    so a peer can never make us buffer more than one maximal frame.
    """

    def __init__(self, max_payload: int) -> None:
        self.max_payload = max_payload
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def _header(self, data: bytes | bytearray | memoryview, pos: int) -> tuple[int, int, int, int]:
        version, ftype, flags, stream_id, length = HEADER.unpack_from(data, pos)
        if version != VERSION:
            raise ProtocolError(
                ErrorCode.UNSUPPORTED_VERSION, f"frame version {version}, expected {VERSION}"
            )
        if length > self.max_payload:
            raise ProtocolError(
                ErrorCode.FRAME_SIZE_ERROR,
                f"frame of {length} bytes exceeds the limit of {self.max_payload}",
            )
        return ftype, flags, stream_id, length

    def feed(self, data: bytes) -> Generator[Frame, None, None]:
        """Yield every complete frame; keep the remainder. Raises ProtocolError.

        Payloads are copied once, straight out of `data`; only a frame that straddles two
        reads goes through the internal buffer.
        """
        view = memoryview(data)
        end = len(view)
        pos = 0
        buf = self._buf
        try:
            if buf:  # finish the frame begun by an earlier read
                if len(buf) < HEADER_SIZE:
                    pos = min(HEADER_SIZE - len(buf), end)
                    buf += view[:pos]
                    if len(buf) < HEADER_SIZE:
                        return
                ftype, flags, stream_id, length = self._header(buf, 0)
                take = min(HEADER_SIZE + length - len(buf), end - pos)
                buf += view[pos : pos + take]
                pos += take
                if len(buf) < HEADER_SIZE + length:
                    return
                payload = bytes(memoryview(buf)[HEADER_SIZE:])
                buf.clear()
                yield Frame(ftype, flags, stream_id, payload)
            while end - pos >= HEADER_SIZE:
                ftype, flags, stream_id, length = self._header(view, pos)
                if end - pos - HEADER_SIZE < length:
                    break
                start = pos + HEADER_SIZE
                pos = start + length
                yield Frame(ftype, flags, stream_id, view[start:pos].tobytes())
        finally:
            if pos < end:
                buf += view[pos:]
