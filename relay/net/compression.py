"""zstd compression of a stream's two directions, done at the ends (never in the gateway).

Negotiation, on the wire:

- The opener offers compression with the OPEN header ``codec: zstd``. Without that
  header the stream carries plain bytes and nothing below applies.
- With it, each direction begins with ONE marker byte chosen by that direction's sender:
  ``0x00`` raw (the rest of the direction is plain bytes) or ``0x01`` zstd (the rest is
  exactly one zstd frame, with content checksum, window at most 2 MiB, flushed at the
  end of every write so interactive protocols never stall, and finished at half-close).
  A sender that half-closes without having written anything still sends its marker.
- Each end decides for its own direction: the agent compresses iff the service has
  ``compress: true`` and the opener offered zstd; the workstation compresses its
  upstream iff an earlier stream to that service came back compressed.

Decompression is bounded whatever the peer sends. The compressed input is cut at zstd
block boundaries (`_FrameScanner`) and fed to the decompressor a few blocks at a time,
only when the reader wants more: a zstd block decodes to at most 128 KiB, so one feed
yields at most `MAX_PIECE_OUTPUT` bytes, and output beyond that (a decoder that does
not keep the format's promise) resets the stream with LIMIT_EXCEEDED. A frame that asks
for a window above `MAX_DECODER_WINDOW` is refused the same way; malformed input resets with
PROTOCOL_ERROR. A "zstd bomb" therefore costs the reader time, never memory: it is just
a lot of data delivered at the pace the reader takes it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

import zstandard as zstd

from relay.net.bytestream import ByteStream, StreamResetError
from relay.proto import ErrorCode
from relay.wire import CODEC_ZSTD, HEADER_CODEC

__all__ = [
    "CODEC_ZSTD",
    "HEADER_CODEC",
    "MARKER_RAW",
    "MARKER_ZSTD",
    "MAX_DECODER_WINDOW",
    "MAX_PIECE_OUTPUT",
    "CodecStats",
    "CodecStream",
    "offers_zstd",
]

MARKER_RAW: Final = 0x00
MARKER_ZSTD: Final = 0x01

MAX_WINDOW_LOG: Final = 21
MAX_DECODER_WINDOW: Final = 1 << MAX_WINDOW_LOG  # decoder memory per compressed direction
MAX_BLOCK: Final = 128 * 1024  # zstd's Block_Maximum_Size: a block never decodes to more
READ_SIZE: Final = 64 * 1024  # compressed bytes taken from the inner stream at once
BLOCKS_PER_PIECE: Final = 8
# Output of one feed: BLOCKS_PER_PIECE whole blocks, plus the part of a raw block that
# arrived in the same piece (at most the piece's own size).
MAX_PIECE_OUTPUT: Final = BLOCKS_PER_PIECE * MAX_BLOCK + READ_SIZE

_ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"


def offers_zstd(headers: Mapping[str, str]) -> bool:
    """True if the opener of a stream offered zstd (the `codec: zstd` OPEN header)."""
    return headers.get(HEADER_CODEC) == CODEC_ZSTD


@dataclass
class CodecStats:
    """Bytes through one CodecStream, for metrics: raw = application side, wire = stream side."""

    raw_out: int = 0
    wire_out: int = 0
    wire_in: int = 0
    raw_in: int = 0


class _CodecError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


# Scanner states
_MAGIC, _DESCRIPTOR, _FRAME_REST, _BLOCK_HEADER, _BODY, _CHECKSUM, _END = range(7)
_DICT_ID_SIZES: Final = (0, 1, 2, 4)
_FCS_SIZES: Final = (0, 2, 4, 8)


class _FrameScanner:
    """Walks the structure of one zstd frame (RFC 8878) to find where blocks end.

    It never decodes: it reads the frame header (to check the window) and the 3-byte
    block headers, so that input can be cut into pieces with a bounded number of blocks.
    """

    def __init__(self, max_window: int) -> None:
        self.max_window = max_window
        self.state = _MAGIC
        self.need = 4  # bytes wanted by the current state
        self.header = bytearray()  # bytes of a header being collected
        self.descriptor = 0
        self.checksum = False
        self.last_block = False

    @property
    def finished(self) -> bool:
        return self.state == _END

    def cut(self, data: memoryview, max_blocks: int) -> int:
        """How many bytes of `data` to feed next (up to `max_blocks` block ends); consumes them."""
        pos, size, ends = 0, len(data), 0
        while pos < size and ends < max_blocks:
            if self.state == _END:
                raise _CodecError(ErrorCode.PROTOCOL_ERROR, "data after the end of the zstd frame")
            if self.state == _BODY:
                take = min(self.need, size - pos)
                pos += take
                self.need -= take
            else:
                take = min(self.need - len(self.header), size - pos)
                self.header += data[pos : pos + take]
                pos += take
                if len(self.header) < self.need:
                    break
                header = bytes(self.header)
                self.header.clear()
                self._parse(header)
            if self.state == _BODY and self.need == 0:
                ends += 1
                self._after_block()
        return pos

    def _after_block(self) -> None:
        if not self.last_block:
            self.state, self.need = _BLOCK_HEADER, 3
        elif self.checksum:
            self.state, self.need = _CHECKSUM, 4
        else:
            self.state, self.need = _END, 0

    def _parse(self, header: bytes) -> None:
        state = self.state
        if state == _MAGIC:
            if header != _ZSTD_MAGIC:
                raise _CodecError(ErrorCode.PROTOCOL_ERROR, "not a zstd frame")
            self.state, self.need = _DESCRIPTOR, 1
        elif state == _DESCRIPTOR:
            fhd = header[0]
            fcs_flag, single = fhd >> 6, (fhd >> 5) & 1
            if (fhd >> 3) & 1:
                raise _CodecError(ErrorCode.PROTOCOL_ERROR, "reserved bit set in zstd frame header")
            self.descriptor = fhd
            self.checksum = bool((fhd >> 2) & 1)
            fcs_size = 1 if (single and fcs_flag == 0) else _FCS_SIZES[fcs_flag]
            self.state = _FRAME_REST
            self.need = (0 if single else 1) + _DICT_ID_SIZES[fhd & 3] + fcs_size
        elif state == _FRAME_REST:
            self._check_window(header)
            self.state, self.need = _BLOCK_HEADER, 3
        elif state == _BLOCK_HEADER:
            value = int.from_bytes(header, "little")
            self.last_block = bool(value & 1)
            block_type, block_size = (value >> 1) & 3, value >> 3
            if block_type == 3:
                raise _CodecError(ErrorCode.PROTOCOL_ERROR, "reserved zstd block type")
            if block_size > MAX_BLOCK:
                raise _CodecError(ErrorCode.PROTOCOL_ERROR, "zstd block larger than 128 KiB")
            self.state = _BODY
            self.need = 1 if block_type == 1 else block_size  # RLE: one byte, repeated
        elif state == _CHECKSUM:
            self.state, self.need = _END, 0

    def _check_window(self, rest: bytes) -> None:
        """The decoder allocates the window the frame declares: refuse a large one."""
        fhd = self.descriptor
        fcs_flag, single = fhd >> 6, (fhd >> 5) & 1
        if single:  # the window is the content size, the header's last field
            fcs_size = 1 if fcs_flag == 0 else _FCS_SIZES[fcs_flag]
            window = int.from_bytes(rest[len(rest) - fcs_size :], "little")
            if fcs_flag == 1:
                window += 256
        else:
            exponent, mantissa = rest[0] >> 3, rest[0] & 7
            base = 1 << (10 + exponent)
            window = base + (base // 8) * mantissa
        if window > self.max_window:
            raise _CodecError(
                ErrorCode.LIMIT_EXCEEDED,
                f"zstd frame wants a {window}-byte window, the limit is {self.max_window}",
            )


class CodecStream:
    """A ByteStream that compresses what it writes and decompresses what it reads.

    `send_zstd` is this end's choice for its own direction; what the peer chose is read
    from its marker (`peer_zstd`, None until known; `on_peer_marker` is called once with
    it). Use only on streams whose opener offered zstd (see `offers_zstd`).
    """

    def __init__(
        self,
        inner: ByteStream,
        send_zstd: bool,
        level: int = 3,
        *,
        on_peer_marker: Callable[[bool], None] | None = None,
        stats: CodecStats | None = None,
        max_window: int = MAX_DECODER_WINDOW,
        piece_output_limit: int = MAX_PIECE_OUTPUT,
    ) -> None:
        self.inner = inner
        self.send_zstd = send_zstd
        self.stats = stats if stats is not None else CodecStats()
        self.peer_zstd: bool | None = None
        self._on_peer_marker = on_peer_marker
        self._marker_sent = False
        self._eof_sent = False
        self._compressor: zstd.ZstdCompressionObj | None = None
        if send_zstd:
            params = zstd.ZstdCompressionParameters.from_level(level, write_checksum=True)
            if params.window_log > MAX_WINDOW_LOG:
                params = zstd.ZstdCompressionParameters.from_level(
                    level, window_log=MAX_WINDOW_LOG, write_checksum=True
                )
            self._compressor = zstd.ZstdCompressor(compression_params=params).compressobj()
        # read side
        self._max_window = max_window
        self._piece_output_limit = piece_output_limit
        self._decompressor: zstd.ZstdDecompressionObj | None = None
        self._scanner: _FrameScanner | None = None
        self._pending = memoryview(b"")  # compressed input not fed yet
        self._out = b""  # decompressed output not returned yet
        self._out_pos = 0
        self._read_done = False
        self._reset_code: int | None = None

    @property
    def headers(self) -> Mapping[str, str]:
        return self.inner.headers

    @property
    def buffered(self) -> int:
        """Bytes held on the read side (decompressed output plus unfed input)."""
        return len(self._out) - self._out_pos + len(self._pending)

    # -- write side

    def _marker(self) -> bytes:
        if self._marker_sent:
            return b""
        self._marker_sent = True
        return bytes((MARKER_ZSTD if self.send_zstd else MARKER_RAW,))

    async def send_marker(self) -> None:
        """Send this direction's marker now (it otherwise goes with the first write)."""
        marker = self._marker()
        if marker:
            self.stats.wire_out += 1
            await self.inner.write(marker)

    async def write(self, data: bytes) -> None:
        if not data:
            return
        if self._eof_sent:
            raise StreamResetError(ErrorCode.STREAM_CLOSED, "write after write_eof")
        if self._compressor is not None:
            payload = self._compressor.compress(data) + self._compressor.flush(
                zstd.COMPRESSOBJ_FLUSH_BLOCK
            )
        else:
            payload = data
        marker = self._marker()
        if marker:
            payload = marker + payload
        self.stats.raw_out += len(data)
        self.stats.wire_out += len(payload)
        await self.inner.write(payload)

    async def write_eof(self) -> None:
        if self._eof_sent:
            return
        self._eof_sent = True
        tail = self._marker()
        if self._compressor is not None:
            tail += self._compressor.flush(zstd.COMPRESSOBJ_FLUSH_FINISH)
        if tail:
            self.stats.wire_out += len(tail)
            await self.inner.write(tail)
        await self.inner.write_eof()

    def reset(self, code: int) -> None:
        self._reset_code = code
        self._out, self._out_pos, self._pending = b"", 0, memoryview(b"")
        self.inner.reset(code)

    # -- read side

    async def read(self, max_bytes: int = 65536) -> bytes:
        max_bytes = max(1, max_bytes)
        while True:
            if self._reset_code is not None:
                raise StreamResetError(self._reset_code)
            if self._out_pos < len(self._out):
                return self._take(max_bytes)
            if self._read_done:
                return b""
            if self._pending:
                self._feed()
                continue
            if self.peer_zstd is False:
                chunk = await self.inner.read(max_bytes)
                self.stats.wire_in += len(chunk)
                self.stats.raw_in += len(chunk)
                if not chunk:
                    self._read_done = True
                return chunk
            chunk = await self.inner.read(READ_SIZE)
            self.stats.wire_in += len(chunk)
            if not chunk:
                self._at_eof()
                return b""
            if self.peer_zstd is None:
                chunk = self._read_marker(chunk)
                if self.peer_zstd is False:
                    self.stats.raw_in += len(chunk)
                    if chunk:  # keep read()'s max_bytes promise
                        self._out, self._out_pos = chunk, 0
                    continue
            self._pending = memoryview(chunk)

    def _take(self, max_bytes: int) -> bytes:
        start, out = self._out_pos, self._out
        end = min(len(out), start + max_bytes)
        self._out_pos = end
        if start == 0 and end == len(out):
            self._out = b""
            self._out_pos = 0
            return out
        if end == len(out):
            chunk = out[start:end]
            self._out, self._out_pos = b"", 0
            return chunk
        return out[start:end]

    def _read_marker(self, chunk: bytes) -> bytes:
        marker = chunk[0]
        if marker not in (MARKER_RAW, MARKER_ZSTD):
            self._fail(_CodecError(ErrorCode.PROTOCOL_ERROR, f"unknown codec marker {marker}"))
        self.peer_zstd = marker == MARKER_ZSTD
        if self.peer_zstd:
            self._scanner = _FrameScanner(self._max_window)
            decompressor = zstd.ZstdDecompressor(max_window_size=self._max_window)
            self._decompressor = decompressor.decompressobj(read_across_frames=False)
        if self._on_peer_marker is not None:
            self._on_peer_marker(self.peer_zstd)
        return chunk[1:]

    def _feed(self) -> None:
        """Decompress the next piece of pending input: a bounded number of blocks."""
        assert self._scanner is not None and self._decompressor is not None
        try:
            n = self._scanner.cut(self._pending, BLOCKS_PER_PIECE)
            piece, self._pending = self._pending[:n], self._pending[n:]
            try:
                out = self._decompressor.decompress(piece)
            except zstd.ZstdError as exc:
                raise _CodecError(ErrorCode.PROTOCOL_ERROR, f"bad zstd data: {exc}") from None
            if len(out) > self._piece_output_limit:
                raise _CodecError(
                    ErrorCode.LIMIT_EXCEEDED,
                    f"zstd piece decoded to {len(out)} bytes, limit {self._piece_output_limit}",
                )
        except _CodecError as exc:
            self._fail(exc)
        if not self._pending:
            self._pending = memoryview(b"")
        self.stats.raw_in += len(out)
        self._out, self._out_pos = out, 0

    def _at_eof(self) -> None:
        if self.peer_zstd and not (self._scanner is not None and self._scanner.finished):
            self._fail(_CodecError(ErrorCode.PROTOCOL_ERROR, "stream ended inside the zstd frame"))
        self._read_done = True

    def _fail(self, exc: _CodecError) -> None:
        self.reset(exc.code)
        raise StreamResetError(exc.code, str(exc))
