"""Message codec for DICOM over one relay stream, shared by the agent and the workstation.

A stream carries length-prefixed typed messages (layout in PROTOCOL-DICOM.md). The codec is
sans-I/O: `MessageCodec.encode()` turns a message into the bytes to write and `decode()` turns
one received payload back into a message; `read_payload()` / `write_message()` are the only
helpers that touch a stream. Every size is bounded by `DicomLimits` before memory is spent on
it, and bodies are zstd-compressed unless their transfer syntax is already compressed or the
data does not shrink.

This module imports zstandard but never pydicom or pynetdicom, so that it stays cheap to load
and easy to fuzz.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import struct
import threading
import zlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Final, Literal, Protocol

import zstandard

from relay.codecs import pixels as px
from relay.dicom.uids import MAX_UID, is_uid
from relay.net.bytestream import ByteStream

VERSION: Final = 1

_PREFIX = struct.Struct(">I")  # payload length
_FIXED = struct.Struct(">BBBH")  # version, type, flags, header length
FLAG_ZSTD: Final = 0x01
# An INSTANCE whose pixel data travels as image codestreams (header `px`, layout in
# PROTOCOL-DICOM.md); sent only to a workstation that listed the codec in `dicom-pixels`.
FLAG_PIXELS: Final = 0x02
_KNOWN_FLAGS: Final = FLAG_ZSTD | FLAG_PIXELS
PIXELS_VERSION: Final = 1

MAX_COUNT: Final = 0xFFFF  # DIMSE sub-operation counts are US
# A PENDING's DIMSE status: 0xFF00, or 0xFF01 (a C-FIND match the PACS warns of: optional
# keys it did not support). Only 0xFF01 is written (header `status`), so a PENDING
# without one is 0xFF00, as from an agent that predates it; a workstation that predates
# it ignores the key (unknown keys are) and says 0xFF00, as before.
PENDING_STATUS: Final = 0xFF00
PENDING_STATUSES: Final = frozenset({PENDING_STATUS, 0xFF01})
MAX_AE: Final = 16

# The default cap on a find/retrieve identifier (DicomLimits.max_identifier). A viewer's
# C-FIND with every return key it shows is a few KiB; the largest DICOMweb QIDO the
# workstation turns into one (qido.MAX_PARAMS values of qido.MAX_VALUE characters) is
# about 66 KiB; a retrieve by a list of 2,000 SOP Instance UIDs is 130 KiB. The agent
# decodes an identifier with pydicom and pynetdicom encodes it again, about 12 times its
# size in memory, for each of up to pacs.max_operations streams: 128 KiB keeps that to
# 1.5 MiB a stream, where the dataset limit (512 MiB) let a 10 KB zstd frame cost GiBs.
MAX_IDENTIFIER: Final = 128 * 1024

# Bodies smaller than this are not worth a zstd frame header.
MIN_COMPRESS: Final = 256
# Bodies that take this many bytes to rebuild are decoded off the loop when asked
# (`read_message(offload=True)`): inflating or copying a MiB takes about a millisecond.
OFFLOAD_BYTES: Final = 1 << 20


class DicomProtocolError(ValueError):
    """A message this codec refuses to encode or decode: malformed, too large, wrong version."""


class PixelMismatchError(DicomProtocolError):
    """An instance's encoded pixels did not decode to what the agent read from the PACS.

    The pixel codec failed at one end, not the stream (its framing and seal held), so the
    instance can come again without that codec; `codec` names it."""

    def __init__(self, codec: str, reason: str) -> None:
        super().__init__(reason)
        self.codec = codec


class IdentifierTooLarge(DicomProtocolError):
    """A query/retrieve identifier (the body of a find, retrieve or echo REQUEST) larger
    than `DicomLimits.max_identifier`, refused before its body is read or inflated: the
    agent answers 0xC007 (status.BAD_IDENTIFIER), not a protocol error."""


class UnexpectedMessage(DicomProtocolError):
    """A message of a type the reader does not expect at this point (`got`), refused
    before its header and body are decoded."""

    def __init__(self, got: MessageType, expected: Collection[MessageType]) -> None:
        super().__init__(f"expected {' or '.join(k.name for k in expected)}, got {got.name}")
        self.got = got


class MessageType(IntEnum):
    REQUEST = 1
    PENDING = 2
    INSTANCE = 3
    FINAL = 4
    CANCEL = 5
    ERROR = 6
    SKIP = 7


@dataclass(frozen=True)
class DicomLimits:
    """Every size the DICOM layer accepts; a peer cannot make us allocate more."""

    max_message: int = 512 * 1024 * 1024  # one payload on the wire (compressed form)
    max_dataset: int = 512 * 1024 * 1024  # one dataset once decompressed
    # A query/retrieve identifier once decompressed or inflated (MAX_IDENTIFIER).
    max_identifier: int = MAX_IDENTIFIER
    max_header: int = 16 * 1024  # JSON header of one message
    max_list: int = 1024  # entries in a list field (failed UIDs, SOP classes)
    max_text: int = 1024  # characters in a free-text field (comments, reasons)
    queue_depth: int = 4  # instances in flight between a pynetdicom thread and asyncio
    max_skip: int = MAX_COUNT  # SOP Instance UIDs in one SKIP message (a resumed retrieve)

    def __post_init__(self) -> None:
        for name in (
            "max_message",
            "max_dataset",
            "max_identifier",
            "max_header",
            "max_list",
            "max_text",
            "max_skip",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"DicomLimits.{name} must be positive")
        if self.max_header > 0xFFFF:
            raise ValueError("DicomLimits.max_header cannot exceed 65535 (u16 on the wire)")
        if self.queue_depth < 1:
            raise ValueError("DicomLimits.queue_depth must be at least 1")


Op = Literal["echo", "find", "retrieve", "store"]
Root = Literal["", "patient", "study"]
_OPS: Final = ("echo", "find", "retrieve", "store")
_ROOTS: Final = ("", "patient", "study")


@dataclass(frozen=True)
class Request:
    """The one request that opens a DICOM stream (workstation -> agent).

    `dataset` is the query/retrieve identifier (find, retrieve) or the instance (store),
    encoded in `transfer_syntax`. A viewer's C-GET and C-MOVE both become `retrieve`: how the
    instances reach the viewer is the workstation's business, how they leave the PACS is the
    agent's (its `retrieve: get|move` setting).
    """

    op: Op
    root: Root = ""
    transfer_syntax: str = ""
    dataset: bytes = b""
    sop_class: str = ""
    sop_instance: str = ""
    priority: int = 0
    move_originator_ae: str = ""
    move_originator_id: int | None = None
    calling_ae: str = ""  # the viewer's AE title, for the audit trail
    resume: bool = False  # a resumed retrieve: one SKIP message follows this request


@dataclass(frozen=True)
class Pending:
    """A pending response: a C-FIND match (dataset) or retrieve progress (counts).

    The first Pending of a retrieve may also announce what the agent learned by querying
    the PACS first: the SOP classes and transfer syntaxes that will arrive.
    """

    remaining: int | None = None
    completed: int | None = None
    failed: int | None = None
    warning: int | None = None
    transfer_syntax: str = ""
    dataset: bytes = b""
    sop_classes: tuple[str, ...] = ()
    transfer_syntaxes: tuple[str, ...] = ()
    estimate: bool = False  # counts from the agent's survey, not from the PACS
    status: int = PENDING_STATUS  # the PACS's: 0xFF01 for a match with a warning


@dataclass(frozen=True)
class Instance:
    """One retrieved instance: the PACS's dataset bytes, in the PACS's transfer syntax."""

    sop_class: str
    sop_instance: str
    transfer_syntax: str
    dataset: bytes


@dataclass(frozen=True)
class FinalResponse:
    """The last message of an operation: DIMSE status, reason text and final counts."""

    status: int
    comment: str = ""
    remaining: int | None = None
    completed: int | None = None
    failed: int | None = None
    warning: int | None = None
    failed_instances: tuple[str, ...] = ()


@dataclass(frozen=True)
class Cancel:
    """The viewer sent C-CANCEL (workstation -> agent)."""


@dataclass(frozen=True)
class Skip:
    """Instances the viewer already has (workstation -> agent, right after a resumed
    retrieve's request): the agent retrieves again but does not send these."""

    uids: tuple[str, ...]


@dataclass(frozen=True)
class ErrorMessage:
    """A protocol-level error; the sender closes the stream after it."""

    reason: str


Message = Request | Pending | Instance | FinalResponse | Cancel | ErrorMessage | Skip

# Transfer syntaxes whose bodies zstd cannot usefully shrink: JPEG, JPEG-LS, JPEG 2000,
# HTJ2K, JPIP, MPEG-2/4, HEVC (all under 1.2.840.10008.1.2.4.), RLE, deflate, and
# Deflated Image Frame Compression.
_COMPRESSED_TS_PREFIXES: Final = ("1.2.840.10008.1.2.4.",)
_COMPRESSED_TS: Final = frozenset(
    {
        "1.2.840.10008.1.2.5",  # RLE Lossless
        "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
        "1.2.840.10008.1.2.8.1",  # Deflated Image Frame Compression
    }
)


def is_precompressed(transfer_syntax: str) -> bool:
    """True when the dataset's pixel data (or the whole dataset) is already compressed."""
    return transfer_syntax in _COMPRESSED_TS or transfer_syntax.startswith(_COMPRESSED_TS_PREFIXES)


@dataclass(frozen=True)
class PixelPart:
    """An instance's pixel values as codestreams, and where they sit in its dataset."""

    encoded: px.EncodedPixels
    offset: int


class ByteCounter(Protocol):
    """Where the codec reports raw and on-the-wire bytes (see relay.dicom.stats)."""

    def bytes_transferred(self, direction: str, raw: int, wire: int) -> None: ...


@dataclass
class CodecCounters:
    """Raw (uncompressed) and wire bytes through one codec, for metrics and tests."""

    sent_raw: int = 0
    sent_wire: int = 0
    received_raw: int = 0
    received_wire: int = 0
    compressed_messages: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, direction: str, raw: int, wire: int, compressed: bool) -> None:
        with self._lock:
            if direction == "out":
                self.sent_raw += raw
                self.sent_wire += wire
            else:
                self.received_raw += raw
                self.received_wire += wire
            if compressed:
                self.compressed_messages += 1


class MessageCodec:
    """Encodes and decodes messages; thread-safe (zstd contexts are per thread).

    `accept_pixels`: decode instances with encoded pixels (FLAG_PIXELS). Only the
    workstation's receiving paths set it: encoded pixels travel agent -> workstation
    only, and the agent must never feed an image decoder what a device sent.
    """

    def __init__(
        self,
        limits: DicomLimits | None = None,
        *,
        level: int = 3,
        stats: ByteCounter | None = None,
        accept_pixels: bool = False,
    ) -> None:
        if not -7 <= level <= 22:
            raise ValueError("zstd level must be between -7 and 22")
        self.limits = limits or DicomLimits()
        self.level = level
        self.accept_pixels = accept_pixels
        self.counters = CodecCounters()
        self._stats = stats
        self._local = threading.local()

    # -- zstd -------------------------------------------------------------------------

    def _compressor(self) -> zstandard.ZstdCompressor:
        c: zstandard.ZstdCompressor | None = getattr(self._local, "c", None)
        if c is None:
            c = zstandard.ZstdCompressor(level=self.level, write_content_size=True)
            self._local.c = c
        return c

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        d: zstandard.ZstdDecompressor | None = getattr(self._local, "d", None)
        if d is None:
            d = zstandard.ZstdDecompressor()
            self._local.d = d
        return d

    def _maybe_compress(self, body: bytes, transfer_syntax: str) -> tuple[bytes, bool]:
        if len(body) < MIN_COMPRESS or is_precompressed(transfer_syntax):
            return body, False
        packed = self._compressor().compress(body)
        if len(packed) >= len(body):
            return body, False  # does not shrink: send as is
        return packed, True

    def _decompress(
        self,
        packed: bytes | memoryview,
        limit: int,
        too_large: type[DicomProtocolError] = DicomProtocolError,
    ) -> bytes:
        """One zstd frame's content, refused (`too_large`) from its declared size past
        `limit` before any is decompressed (the decoder never writes past that size)."""
        try:
            size = zstandard.frame_content_size(packed)
        except zstandard.ZstdError as exc:
            raise DicomProtocolError(f"bad zstd frame: {exc}") from None
        if size < 0:
            raise DicomProtocolError("zstd frame without content size")
        if size > limit:
            raise too_large(f"{_what(too_large)} of {size} bytes exceeds limit {limit}")
        try:
            # Streaming, so memory follows the real output, not the size the frame claims.
            dobj = self._decompressor().decompressobj()
            out = dobj.decompress(packed)
        except zstandard.ZstdError as exc:
            raise DicomProtocolError(f"bad zstd frame: {exc}") from None
        if not dobj.eof or dobj.unused_data:
            raise DicomProtocolError("zstd body is not exactly one frame")
        if len(out) != size:
            raise DicomProtocolError("zstd frame shorter than its declared size")
        return bytes(out)

    # -- encode -----------------------------------------------------------------------

    def _wire_parts(self, msg: Message) -> tuple[int, dict[str, Any], bytes, str]:
        """`_to_wire` with its errors as DicomProtocolError, the dataset within limits."""
        try:
            parts = _to_wire(msg, self.limits)
        except DicomProtocolError:
            raise
        except ValueError as exc:
            raise DicomProtocolError(str(exc)) from None
        body = parts[2]
        if len(body) > self.limits.max_dataset:
            raise DicomProtocolError(
                f"dataset of {len(body)} bytes exceeds limit {self.limits.max_dataset}"
            )
        return parts

    def _header_bytes(self, header: dict[str, Any]) -> bytes:
        """The JSON header as written, within its limit."""
        hbytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(hbytes) > self.limits.max_header:
            raise DicomProtocolError(
                f"header of {len(hbytes)} bytes exceeds limit {self.limits.max_header}"
            )
        return hbytes

    def validate(self, msg: Message) -> None:
        """Raise DicomProtocolError if `msg` could not be encoded (no compression work)."""
        _, header, body, _ = self._wire_parts(msg)
        if _FIXED.size + len(body) > self.limits.max_message:
            raise DicomProtocolError(
                f"message of {len(body)} bytes exceeds limit {self.limits.max_message}"
            )
        self._header_bytes(header)

    def fit_final(self, final: FinalResponse) -> FinalResponse:
        """`final` with as many of its failed UIDs as its header holds (max_header: 1,024
        UIDs of 64 characters would not fit 16 KiB), the rest left out (the failed count
        says how many failed). Its UIDs and text must be valid already."""
        uids = final.failed_instances
        if not uids:
            return final
        bare = dataclasses.replace(final, failed_instances=())
        _, header, _, _ = self._wire_parts(bare)
        room = self.limits.max_header - len(self._header_bytes(header)) - len(',"failed_uids":[]')
        kept = 0
        for uid in uids:
            room -= len(uid) + 3  # its quotes and a comma (UIDs are ASCII)
            if room < 0:
                break
            kept += 1
        return (
            final if kept == len(uids) else dataclasses.replace(final, failed_instances=uids[:kept])
        )

    def encode(self, msg: Message, pixels: PixelPart | None = None) -> bytes:
        """The bytes to write for `msg`: length prefix, fixed header, JSON header, body.

        With `pixels` (an Instance only), the pixel values at `pixels.offset` travel as
        the codestreams and the rest of the dataset as zstd (FLAG_PIXELS).
        """
        mtype, header, body, ts = self._wire_parts(msg)
        if pixels is not None:
            if mtype != MessageType.INSTANCE:
                raise DicomProtocolError("only an instance carries encoded pixels")
            return self._encode_pixels(header, body, ts, pixels)
        hbytes = self._header_bytes(header)
        wire_body, compressed = self._maybe_compress(body, ts)
        flags = FLAG_ZSTD if compressed else 0
        length = _FIXED.size + len(hbytes) + len(wire_body)
        if length > self.limits.max_message:
            raise DicomProtocolError(
                f"message of {length} bytes exceeds limit {self.limits.max_message}"
            )
        out = b"".join(
            (
                _PREFIX.pack(length),
                _FIXED.pack(VERSION, mtype, flags, len(hbytes)),
                hbytes,
                wire_body,
            )
        )
        raw = len(out) - len(wire_body) + len(body)
        self._count("out", raw, len(out), compressed)
        return out

    def _encode_pixels(
        self, header: dict[str, Any], body: bytes, ts: str, pixels: PixelPart
    ) -> bytes:
        enc, at = pixels.encoded, pixels.offset
        end = at + enc.fmt.nbytes
        if not 0 <= at <= end <= len(body) or len(enc.frames) > self.limits.max_list:
            raise DicomProtocolError("encoded pixels do not fit the dataset")
        rest, rest_zstd = self._maybe_compress(body[:at] + body[end:], ts)
        header["px"] = {
            "v": PIXELS_VERSION,
            "c": enc.codec,
            "at": at,
            "f": enc.fmt.to_wire(),
            "rl": len(rest),
            "rz": rest_zstd,
            "fl": [len(f) for f in enc.frames],
            # CRC-32 of the native pixel bytes: the workstation checks what it rebuilt
            "crc": zlib.crc32(body[at:end]),
        }
        hbytes = self._header_bytes(header)
        length = _FIXED.size + len(hbytes) + len(rest) + enc.nbytes
        if length > self.limits.max_message:
            raise DicomProtocolError(
                f"message of {length} bytes exceeds limit {self.limits.max_message}"
            )
        fixed = _FIXED.pack(VERSION, MessageType.INSTANCE, FLAG_PIXELS, len(hbytes))
        out = b"".join((_PREFIX.pack(length), fixed, hbytes, rest, *enc.frames))
        self._count("out", len(out) - len(rest) - enc.nbytes + len(body), len(out), True)
        return out

    def _decode_pixels(self, header: dict[str, Any], wire_body: memoryview) -> bytes:
        """The dataset of a FLAG_PIXELS instance, rebuilt byte for byte; bounded."""
        spec = header.get("px")
        if not isinstance(spec, dict) or spec.get("v") != PIXELS_VERSION:
            raise DicomProtocolError("encoded pixels without a known `px` header")
        codec = spec.get("c")
        if codec not in px.CODECS:
            raise DicomProtocolError("encoded pixels in an unknown codec")
        try:
            fmt = px.PixelFormat.from_wire(spec.get("f"))
            fmt.check(self.limits.max_dataset, self.limits.max_list)
        except ValueError as exc:
            raise DicomProtocolError(f"encoded pixels: {exc}") from None
        at = _get_int(spec, "at", 0, self.limits.max_dataset)
        crc = _get_int(spec, "crc", 0, 0xFFFFFFFF)
        rest_len = _get_int(spec, "rl", 0, len(wire_body))
        lengths = spec.get("fl")
        if (
            at is None
            or crc is None
            or rest_len is None
            or not isinstance(spec.get("rz"), bool)
            or not isinstance(lengths, list)
            or len(lengths) != fmt.frames
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in lengths)
            or rest_len + sum(lengths) != len(wire_body)
        ):
            raise DicomProtocolError("encoded pixels: lengths do not match the body")
        rest_wire = wire_body[:rest_len]
        rest = (
            self._decompress(rest_wire, self.limits.max_dataset) if spec["rz"] else bytes(rest_wire)
        )
        if at > len(rest) or len(rest) + fmt.nbytes > self.limits.max_dataset:
            raise DicomProtocolError(
                f"dataset of {len(rest) + fmt.nbytes} bytes exceeds limit "
                f"{self.limits.max_dataset} or pixels outside it"
            )
        frames, pos = [], rest_len
        for n in lengths:
            frames.append(bytes(wire_body[pos : pos + n]))
            pos += n
        try:
            values = px.decode(px.EncodedPixels(codec, fmt, tuple(frames)))
        except px.PixelCodecError as exc:
            raise PixelMismatchError(codec, str(exc)) from None
        if zlib.crc32(values) != crc:
            raise PixelMismatchError(codec, f"{codec} pixels do not decode to what the agent sent")
        return b"".join((rest[:at], values, rest[at:]))

    # -- decode -----------------------------------------------------------------------

    def check_length(self, length: int) -> None:
        """Refuse a length prefix before reading the payload it announces."""
        if length < _FIXED.size:
            raise DicomProtocolError(f"message length {length} shorter than its header")
        if length > self.limits.max_message:
            raise DicomProtocolError(
                f"message of {length} bytes exceeds limit {self.limits.max_message}"
            )

    def check_start(
        self, fixed: bytes | bytearray | memoryview, expect: Collection[MessageType] | None = None
    ) -> tuple[MessageType, int, int]:
        """(type, flags, header length) from a payload's first bytes, or DicomProtocolError.

        Everything that needs no more than these bytes is refused here, before the header
        and the body are read or looked at: an unknown version, flag, or type, a type the
        reader does not `expect` at this point, encoded pixels where they are not accepted.
        """
        version, mtype, flags, hlen = _FIXED.unpack_from(fixed, 0)
        if version != VERSION:
            raise DicomProtocolError(f"unsupported DICOM stream version {version}")
        if flags & ~_KNOWN_FLAGS:
            raise DicomProtocolError(f"unknown flags 0x{flags:02x}")
        if flags & FLAG_PIXELS and not self.accept_pixels:
            raise DicomProtocolError("encoded pixels are not accepted here (agent to workstation)")
        try:
            kind = MessageType(mtype)
        except ValueError:
            raise DicomProtocolError(f"unknown message type {mtype}") from None
        if expect is not None and kind not in expect:
            raise UnexpectedMessage(kind, expect)
        if hlen > self.limits.max_header:
            raise DicomProtocolError(
                f"header of {hlen} bytes exceeds limit {self.limits.max_header}"
            )
        return kind, flags, hlen

    def check_request_size(self, header: bytes | bytearray, body_length: int) -> None:
        """Refuse a REQUEST whose body cannot fit its op's limit from its JSON header,
        before the body is read (`read_payload`): an identifier announced larger than
        `max_identifier` raises IdentifierTooLarge. A header that does not parse is left
        for `decode` to refuse."""
        try:
            parsed = json.loads(bytes(header).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return
        if not isinstance(parsed, dict):
            return
        limit, too_large = self._body_limit(MessageType.REQUEST, parsed)
        if body_length > limit:  # a zstd body is never larger than what it holds
            raise too_large(f"{_what(too_large)} of {body_length} bytes exceeds limit {limit}")

    def _body_limit(
        self, kind: MessageType, header: Mapping[str, Any]
    ) -> tuple[int, type[DicomProtocolError]]:
        """The largest body a message of this type can have once decoded, and what a
        larger one raises. A REQUEST's depends on its `op`: only a store carries a
        dataset; any other carries an identifier (an unknown op is refused after)."""
        if kind is MessageType.REQUEST and header.get("op") != "store":
            return self.limits.max_identifier, IdentifierTooLarge
        return self._plain_limit(kind), DicomProtocolError

    def _plain_limit(self, kind: MessageType) -> int:
        if kind in (MessageType.REQUEST, MessageType.PENDING, MessageType.INSTANCE):
            return self.limits.max_dataset
        if kind is MessageType.SKIP:
            # its UIDs and their newlines
            return min(self.limits.max_skip * (MAX_UID + 1), self.limits.max_dataset)
        return 0

    def decode(self, payload: bytes | bytearray | memoryview) -> Message:
        """One message from its payload (the bytes after the length prefix).

        Its type bounds its body before any is decompressed (none for a Cancel, a
        Final or an Error)."""
        view = memoryview(payload)
        self.check_length(len(view))
        kind, flags, hlen = self.check_start(view)
        start = _FIXED.size
        if start + hlen > len(view):
            raise DicomProtocolError("header runs past the end of the message")
        try:
            header = json.loads(bytes(view[start : start + hlen]).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise DicomProtocolError(f"bad header: {exc}") from None
        if not isinstance(header, dict):
            raise DicomProtocolError("header is not a JSON object")
        wire_body = view[start + hlen :]
        limit, too_large = self._body_limit(kind, header)
        if wire_body and not limit:
            raise DicomProtocolError(f"{kind.name} message with a body")
        compressed = bool(flags & (FLAG_ZSTD | FLAG_PIXELS))
        if flags & FLAG_PIXELS:
            if kind is not MessageType.INSTANCE or flags & FLAG_ZSTD:
                raise DicomProtocolError("encoded pixels outside a plain instance message")
            body = self._decode_pixels(header, wire_body)
        elif flags & FLAG_ZSTD:
            body = self._decompress(wire_body, limit, too_large)
        else:
            if len(wire_body) > limit:
                raise too_large(
                    f"{_what(too_large)} of {len(wire_body)} bytes exceeds limit {limit}"
                )
            body = bytes(wire_body)
        msg = _from_wire(kind, header, body, self.limits)
        raw = _PREFIX.size + len(view) - len(wire_body) + len(body)
        self._count("in", raw, _PREFIX.size + len(view), compressed)
        return msg

    def decode_frame(self, data: bytes) -> Message:
        """One message from a whole frame (length prefix included), for tests and tools."""
        if len(data) < _PREFIX.size:
            raise DicomProtocolError("truncated length prefix")
        (length,) = _PREFIX.unpack_from(data, 0)
        self.check_length(length)
        if len(data) != _PREFIX.size + length:
            raise DicomProtocolError("frame length does not match its prefix")
        return self.decode(memoryview(data)[_PREFIX.size :])

    def _count(self, direction: str, raw: int, wire: int, compressed: bool) -> None:
        self.counters.add(direction, raw, wire, compressed)
        if self._stats is not None:
            self._stats.bytes_transferred(direction, raw, wire)


# -- stream helpers -------------------------------------------------------------------


_FIRST_BUFFER: Final = 1 << 20  # a message's buffer before it grows with what comes


async def read_payload(
    stream: ByteStream, codec: MessageCodec, expect: Collection[MessageType] | None = None
) -> bytearray | None:
    """The next message payload, or None on a clean end of stream between messages.

    Raises DicomProtocolError for a stream that ends inside a message or announces one
    larger than the limit, and (`MessageCodec.check_start`) for a message refused by its
    first bytes (with `expect`, a type not expected), before its body is read or memory
    is spent on it; a REQUEST is also refused from its JSON header (IdentifierTooLarge:
    `MessageCodec.check_request_size`). StreamResetError passes through.
    """
    prefix = bytearray()
    while len(prefix) < _PREFIX.size:
        chunk = await stream.read(_PREFIX.size - len(prefix))
        if not chunk:
            if prefix:
                raise DicomProtocolError("stream ended inside a length prefix")
            return None
        prefix += chunk
    (length,) = _PREFIX.unpack(prefix)
    codec.check_length(length)
    fixed = bytearray()
    while len(fixed) < _FIXED.size:
        chunk = await stream.read(_FIXED.size - len(fixed))
        if not chunk:
            raise DicomProtocolError(f"stream ended after {len(fixed)} of {length} message bytes")
        fixed += chunk
    kind, _, hlen = codec.check_start(fixed, expect)
    if kind is MessageType.REQUEST:
        # The header says what the body holds: an identifier is refused from its size
        # before the rest is read (the reads that bring the header bring what follows).
        end = _FIXED.size + hlen
        await _read_at_least(stream, fixed, min(end, length), length)
        codec.check_request_size(fixed[_FIXED.size : end], length - end)
    # The buffer grows with what came (doubling, up to the declared length), not to the
    # declared length at once: a peer that announces 512 MiB and sends a trickle holds
    # about what it sent, not 512 MiB from its first bytes.
    buf = bytearray(min(length, max(len(fixed), _FIRST_BUFFER)))
    buf[: len(fixed)] = fixed
    have = len(fixed)
    while have < length:
        chunk = await stream.read(min(length - have, 1 << 20))
        if not chunk:
            raise DicomProtocolError(f"stream ended after {have} of {length} message bytes")
        end = have + len(chunk)
        if end > len(buf):
            grown = bytearray(min(length, max(end, 2 * len(buf))))
            grown[:have] = memoryview(buf)[:have]
            buf = grown
        buf[have:end] = chunk
        have = end
    return buf


async def _read_at_least(stream: ByteStream, buf: bytearray, want: int, length: int) -> None:
    """Read into `buf` (the start of a message of `length` bytes) until it holds `want`,
    in reads of up to 64 KiB, never past the message."""
    while len(buf) < want:
        chunk = await stream.read(min(length - len(buf), 1 << 16))
        if not chunk:
            raise DicomProtocolError(f"stream ended after {len(buf)} of {length} message bytes")
        buf += chunk


def _what(too_large: type[DicomProtocolError]) -> str:
    return "identifier" if too_large is IdentifierTooLarge else "dataset"


async def read_message(
    stream: ByteStream,
    codec: MessageCodec,
    *,
    offload: bool = False,
    expect: Collection[MessageType] | None = None,
) -> Message | None:
    """The next decoded message, or None on a clean end of stream.

    `offload`: decode an instance with encoded pixels, or a body of OFFLOAD_BYTES or more,
    on a worker thread (the image codecs and zstd release the GIL), so that decoding never
    holds up the event loop's other streams. `expect`: the types that may come now; any
    other is refused from its first bytes (`read_payload`)."""
    payload = await read_payload(stream, codec, expect)
    if payload is None:
        return None
    if offload and (has_pixels(payload) or _big_body(payload)):
        return await asyncio.to_thread(codec.decode, payload)
    return codec.decode(payload)


def has_pixels(payload: bytes | bytearray | memoryview) -> bool:
    """Whether a message payload carries encoded pixels (decoding them takes a while)."""
    return len(payload) >= _FIXED.size and bool(_FIXED.unpack_from(payload, 0)[2] & FLAG_PIXELS)


def _big_body(payload: bytes | bytearray | memoryview) -> bool:
    """Whether a payload's body is OFFLOAD_BYTES or more once decoded (zstd: as declared)."""
    if len(payload) >= OFFLOAD_BYTES:
        return True
    if len(payload) < _FIXED.size:
        return False
    _, _, flags, hlen = _FIXED.unpack_from(payload, 0)
    if not flags & FLAG_ZSTD:
        return False
    try:
        size = zstandard.frame_content_size(memoryview(payload)[_FIXED.size + hlen :])
    except zstandard.ZstdError:
        return False  # decode refuses it at once
    return size >= OFFLOAD_BYTES


async def write_message(stream: ByteStream, codec: MessageCodec, msg: Message) -> None:
    await stream.write(codec.encode(msg))


# -- header mapping -------------------------------------------------------------------


def _to_wire(msg: Message, limits: DicomLimits) -> tuple[int, dict[str, Any], bytes, str]:
    """(type, header, body, transfer syntax of the body) after validating `msg`."""
    header: dict[str, Any] = {}
    if isinstance(msg, Request):
        _check_request(msg, limits)
        header["op"] = msg.op
        _put(header, "root", msg.root)
        _put(header, "ts", msg.transfer_syntax)
        _put(header, "cls", msg.sop_class)
        _put(header, "iuid", msg.sop_instance)
        if msg.priority:
            header["prio"] = msg.priority
        _put(header, "mae", msg.move_originator_ae)
        if msg.move_originator_id is not None:
            header["mid"] = msg.move_originator_id
        _put(header, "cae", msg.calling_ae)
        if msg.resume:
            header["resume"] = True
        return MessageType.REQUEST, header, msg.dataset, msg.transfer_syntax
    if isinstance(msg, Pending):
        _check_counts(msg.remaining, msg.completed, msg.failed, msg.warning)
        _check_uid(msg.transfer_syntax, "transfer_syntax", empty_ok=True)
        _check_uids(msg.sop_classes, "sop_classes", limits)
        _check_uids(msg.transfer_syntaxes, "transfer_syntaxes", limits)
        _check_pending_status(msg.status)
        if msg.status != PENDING_STATUS:
            header["status"] = msg.status
        _put_counts(header, msg.remaining, msg.completed, msg.failed, msg.warning)
        _put(header, "ts", msg.transfer_syntax)
        if msg.sop_classes:
            header["classes"] = list(msg.sop_classes)
        if msg.transfer_syntaxes:
            header["tss"] = list(msg.transfer_syntaxes)
        if msg.estimate:
            header["est"] = True
        return MessageType.PENDING, header, msg.dataset, msg.transfer_syntax
    if isinstance(msg, Instance):
        _check_uid(msg.sop_class, "sop_class")
        _check_uid(msg.sop_instance, "sop_instance")
        _check_uid(msg.transfer_syntax, "transfer_syntax")
        header = {"cls": msg.sop_class, "iuid": msg.sop_instance, "ts": msg.transfer_syntax}
        return MessageType.INSTANCE, header, msg.dataset, msg.transfer_syntax
    if isinstance(msg, FinalResponse):
        _check_int(msg.status, "status", 0, 0xFFFF)
        _check_text(msg.comment, "comment", limits)
        _check_counts(msg.remaining, msg.completed, msg.failed, msg.warning)
        _check_uids(msg.failed_instances, "failed_instances", limits)
        header["status"] = msg.status
        _put(header, "comment", msg.comment)
        _put_counts(header, msg.remaining, msg.completed, msg.failed, msg.warning)
        if msg.failed_instances:
            header["failed_uids"] = list(msg.failed_instances)
        return MessageType.FINAL, header, b"", ""
    if isinstance(msg, Cancel):
        return MessageType.CANCEL, header, b"", ""
    if isinstance(msg, Skip):
        if len(msg.uids) > limits.max_skip:
            raise ValueError(f"skip list has more than {limits.max_skip} UIDs")
        for uid in msg.uids:
            _check_uid(uid, "skipped SOP Instance UID")
        header["n"] = len(msg.uids)
        # One UID per line; "" is not a compressed syntax, so zstd shrinks it (UIDs of a
        # study share long prefixes): tens of thousands of UIDs fit in a few hundred KiB.
        return MessageType.SKIP, header, "\n".join(msg.uids).encode("ascii"), ""
    if isinstance(msg, ErrorMessage):
        _check_text(msg.reason, "reason", limits)
        header["reason"] = msg.reason
        return MessageType.ERROR, header, b"", ""
    raise TypeError(f"not a DICOM stream message: {msg!r}")


def _from_wire(
    kind: MessageType, header: Mapping[str, Any], body: bytes, limits: DicomLimits
) -> Message:
    if kind is MessageType.REQUEST:
        op = _get_str(header, "op", limits)
        root = _get_str(header, "root", limits)
        if op not in _OPS:
            raise DicomProtocolError(f"unknown operation {op!r}")
        if root not in _ROOTS:
            raise DicomProtocolError(f"unknown query root {root!r}")
        req = Request(
            op=op,  # type: ignore[arg-type]  # checked against _OPS above
            root=root,  # type: ignore[arg-type]
            transfer_syntax=_get_str(header, "ts", limits),
            dataset=body,
            sop_class=_get_str(header, "cls", limits),
            sop_instance=_get_str(header, "iuid", limits),
            priority=_get_int(header, "prio", 0, 2) or 0,
            move_originator_ae=_get_str(header, "mae", limits),
            move_originator_id=_get_int(header, "mid", 0, 0xFFFF),
            calling_ae=_get_str(header, "cae", limits),
            resume=_get_bool(header, "resume"),
        )
        _wrap(_check_request, req, limits)
        return req
    if kind is MessageType.PENDING:
        pending = Pending(
            remaining=_get_int(header, "rem", 0, MAX_COUNT),
            completed=_get_int(header, "ok", 0, MAX_COUNT),
            failed=_get_int(header, "fail", 0, MAX_COUNT),
            warning=_get_int(header, "warn", 0, MAX_COUNT),
            transfer_syntax=_get_str(header, "ts", limits),
            dataset=body,
            sop_classes=_get_strs(header, "classes", limits),
            transfer_syntaxes=_get_strs(header, "tss", limits),
            estimate=_get_bool(header, "est"),
            status=_pending_status(header),
        )
        _wrap(_check_pending_status, pending.status)
        _wrap(_check_uid, pending.transfer_syntax, "transfer_syntax", empty_ok=True)
        _wrap(_check_uids, pending.sop_classes, "sop_classes", limits)
        _wrap(_check_uids, pending.transfer_syntaxes, "transfer_syntaxes", limits)
        return pending
    if kind is MessageType.INSTANCE:
        inst = Instance(
            sop_class=_get_str(header, "cls", limits),
            sop_instance=_get_str(header, "iuid", limits),
            transfer_syntax=_get_str(header, "ts", limits),
            dataset=body,
        )
        for name in ("sop_class", "sop_instance", "transfer_syntax"):
            _wrap(_check_uid, getattr(inst, name), name)
        return inst
    if kind is MessageType.SKIP:
        return _skip_from_wire(header, body, limits)
    _no_body(kind, body)
    if kind is MessageType.FINAL:
        status = _get_int(header, "status", 0, 0xFFFF)
        if status is None:
            raise DicomProtocolError("final response without status")
        final = FinalResponse(
            status=status,
            comment=_get_str(header, "comment", limits),
            remaining=_get_int(header, "rem", 0, MAX_COUNT),
            completed=_get_int(header, "ok", 0, MAX_COUNT),
            failed=_get_int(header, "fail", 0, MAX_COUNT),
            warning=_get_int(header, "warn", 0, MAX_COUNT),
            failed_instances=_get_strs(header, "failed_uids", limits),
        )
        _wrap(_check_uids, final.failed_instances, "failed_instances", limits)
        return final
    if kind is MessageType.CANCEL:
        return Cancel()
    return ErrorMessage(reason=_get_str(header, "reason", limits))


def _skip_from_wire(header: Mapping[str, Any], body: bytes, limits: DicomLimits) -> Skip:
    count = _get_int(header, "n", 0, limits.max_skip)
    if count is None:
        raise DicomProtocolError("skip message without a count")
    try:
        uids = tuple(body.decode("ascii").split("\n")) if body else ()
    except UnicodeDecodeError:
        raise DicomProtocolError("skip list is not ASCII") from None
    if len(uids) != count:
        raise DicomProtocolError(f"skip list has {len(uids)} UIDs, header says {count}")
    for uid in uids:
        _wrap(_check_uid, uid, "skipped SOP Instance UID")
    return Skip(uids)


def _no_body(kind: MessageType, body: bytes) -> None:
    if body:
        raise DicomProtocolError(f"{kind.name} message with a body")


def _wrap(check: Any, *args: Any, **kwargs: Any) -> None:
    try:
        check(*args, **kwargs)
    except ValueError as exc:
        raise DicomProtocolError(str(exc)) from None


def _put(header: dict[str, Any], key: str, value: str) -> None:
    if value:
        header[key] = value


def _put_counts(
    header: dict[str, Any], rem: int | None, ok: int | None, fail: int | None, warn: int | None
) -> None:
    for key, value in (("rem", rem), ("ok", ok), ("fail", fail), ("warn", warn)):
        if value is not None:
            header[key] = value


def _get_str(header: Mapping[str, Any], key: str, limits: DicomLimits) -> str:
    value = header.get(key, "")
    if not isinstance(value, str):
        raise DicomProtocolError(f"header field {key!r} is not a string")
    if len(value) > limits.max_text:
        raise DicomProtocolError(f"header field {key!r} longer than {limits.max_text}")
    return value


def _get_int(header: Mapping[str, Any], key: str, low: int, high: int) -> int | None:
    value = header.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise DicomProtocolError(f"header field {key!r} is not an integer in [{low}, {high}]")
    return value


def _get_bool(header: Mapping[str, Any], key: str) -> bool:
    value = header.get(key, False)
    if not isinstance(value, bool):
        raise DicomProtocolError(f"header field {key!r} is not a boolean")
    return value


def _get_strs(header: Mapping[str, Any], key: str, limits: DicomLimits) -> tuple[str, ...]:
    value = header.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DicomProtocolError(f"header field {key!r} is not a list of strings")
    if len(value) > limits.max_list:
        raise DicomProtocolError(f"header field {key!r} has more than {limits.max_list} items")
    return tuple(value)


def _check_int(value: int, name: str, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], not {value!r}")


def _pending_status(header: Mapping[str, Any]) -> int:
    """A PENDING's `status`: 0xFF00 when absent (an agent that predates it)."""
    status = _get_int(header, "status", 0, 0xFFFF)
    return PENDING_STATUS if status is None else status


def _check_pending_status(status: int) -> None:
    if status not in PENDING_STATUSES:
        raise ValueError(f"pending status must be 0xFF00 or 0xFF01, not {status!r}")


def _check_counts(*counts: int | None) -> None:
    for count in counts:
        if count is not None:
            _check_int(count, "sub-operation count", 0, MAX_COUNT)


def _check_text(value: str, name: str, limits: DicomLimits) -> None:
    if len(value) > limits.max_text:
        raise ValueError(f"{name} longer than {limits.max_text} characters")


def _check_uid(value: str, name: str, *, empty_ok: bool = False) -> None:
    if not value:
        if empty_ok:
            return
        raise ValueError(f"{name} is empty")
    if not is_uid(value):
        # Not the value: a UID identifies a patient's study, and this text reaches logs.
        raise ValueError(f"{name} is not a DICOM UID ({len(value)} characters)")


def _check_uids(values: Sequence[str], name: str, limits: DicomLimits) -> None:
    if len(values) > limits.max_list:
        raise ValueError(f"{name} has more than {limits.max_list} items")
    for v in values:
        _check_uid(v, name)


def _check_request(req: Request, limits: DicomLimits) -> None:
    if req.op not in _OPS:
        raise ValueError(f"unknown operation {req.op!r}")
    if req.root not in _ROOTS:
        raise ValueError(f"unknown query root {req.root!r}")
    if req.op in ("find", "retrieve") and not req.root:
        raise ValueError(f"{req.op} request without a query root")
    if req.op != "echo":
        _check_uid(req.transfer_syntax, "transfer_syntax")
    else:
        _check_uid(req.transfer_syntax, "transfer_syntax", empty_ok=True)
    if req.op == "store":
        _check_uid(req.sop_class, "sop_class")
        _check_uid(req.sop_instance, "sop_instance")
    else:
        _check_uid(req.sop_class, "sop_class", empty_ok=True)
        _check_uid(req.sop_instance, "sop_instance", empty_ok=True)
    _check_int(req.priority, "priority", 0, 2)
    if req.move_originator_id is not None:
        _check_int(req.move_originator_id, "move_originator_id", 0, 0xFFFF)
    for name in ("move_originator_ae", "calling_ae"):
        value = getattr(req, name)
        if len(value) > MAX_AE:
            raise ValueError(f"{name} longer than {MAX_AE} characters")
    _check_text(req.calling_ae, "calling_ae", limits)
    if req.resume and req.op != "retrieve":
        raise ValueError("only a retrieve can be resumed")
