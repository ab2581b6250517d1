"""Find native pixel data in a dataset's bytes, encode it losslessly, decode it back.

Pure functions over bytes, no I/O and no pydicom (a small element scanner reads the few
tags needed). Samples are encoded at their full allocated width (8 or 16 bits), signed
ones as offset binary (XOR of the sign bit: order-preserving, so the codec's prediction
still works), which makes the transform exact by construction; `encode` also decodes its
own output and compares, and returns None unless the bytes come back identical, except
where the caller skips that for a `proven` codec and format (the agent still checks a
sample of those; the workstation checks a CRC of every instance).

What is never encoded (the instance then goes as before, zstd on the whole dataset): any
transfer syntax but implicit/explicit VR little endian, encapsulated or absent pixel
data, bits allocated other than 8/16, samples per pixel other than 1/3, subsampled YBR,
a pixel data length other than the image's size (or that size plus one pad byte), more
frames than `max_frames`, and values outside BitsStored (garbage in the high bits).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import numpy as np

JPEGLS: Final = "jpegls"
HTJ2K: Final = "htj2k"
JPEGXL: Final = "jpegxl"
CODECS: Final = (JPEGLS, HTJ2K, JPEGXL)
"""Codec names on the wire (the workstation's `dicom-pixels` header lists those it decodes)."""
PROVEN_CODECS: Final = frozenset({JPEGLS, HTJ2K})
"""Lossless by construction: on grayscale, `proven` lets the agent skip its check."""

NATIVE_LE: Final = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"})
_PHOTOMETRIC: Final = frozenset(
    {"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_RCT", "YBR_ICT"}
)
_MAX_FRAMES: Final = 1024  # matches DicomLimits.max_list: one length per frame in the header
_MIN_PIXELS: Final = 64  # smaller images are not worth a codestream header

_PIXEL_DATA: Final = 0x7FE00010
_TAGS: Final = {
    0x00280002: "samples",
    0x00280004: "photometric",
    0x00280006: "planar",
    0x00280008: "frames",
    0x00280010: "rows",
    0x00280011: "columns",
    0x00280100: "bits_allocated",
    0x00280101: "bits_stored",
    0x00280103: "signed",
}
_LONG_VRS: Final = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_UNDEFINED: Final = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_U16 = struct.Struct("<H").unpack_from
_U32 = struct.Struct("<I").unpack_from
_TAG = struct.Struct("<HH").unpack_from


class PixelCodecError(ValueError):
    """Encoded pixels that do not decode to the announced format."""


@dataclass(frozen=True)
class PixelFormat:
    """The shape of native pixel data: what a codec needs to know, and what the wire says."""

    rows: int
    columns: int
    samples: int  # 1 or 3
    bits: int  # allocated: 8 or 16
    signed: bool
    planar: int  # 0: RGBRGB..., 1: RR..GG..BB.. (samples == 3 only)
    frames: int

    @property
    def frame_bytes(self) -> int:
        return self.rows * self.columns * self.samples * (self.bits // 8)

    @property
    def nbytes(self) -> int:
        return self.frame_bytes * self.frames

    def check(self, max_bytes: int, max_frames: int = _MAX_FRAMES) -> None:
        """Raise ValueError unless this is a format we encode, within the limits."""
        if self.bits not in (8, 16) or self.samples not in (1, 3):
            raise ValueError(f"unsupported format: {self.bits} bits, {self.samples} samples")
        if self.planar not in (0, 1) or (self.planar and self.samples != 3):
            raise ValueError("bad planar configuration")
        if not (1 <= self.rows <= 0xFFFF and 1 <= self.columns <= 0xFFFF):
            raise ValueError("bad image size")
        if not 1 <= self.frames <= max_frames:
            raise ValueError(f"frames not within 1..{max_frames}")
        if self.nbytes > max_bytes:
            raise ValueError(f"pixel data above {max_bytes} bytes")

    def to_wire(self) -> list[int]:
        return [self.rows, self.columns, self.samples, self.bits, int(self.signed),
                self.planar, self.frames]  # fmt: skip

    @classmethod
    def from_wire(cls, value: object) -> PixelFormat:
        if (
            not isinstance(value, list)
            or len(value) != 7
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            raise ValueError("pixel format is not a list of 7 integers")
        rows, cols, samples, bits, signed, planar, frames = value
        if signed not in (0, 1):
            raise ValueError("pixel format: signed must be 0 or 1")
        return cls(rows, cols, samples, bits, bool(signed), planar, frames)


@dataclass(frozen=True)
class PixelLayout:
    """Where the pixel values sit in the dataset's bytes (a pad byte, if any, stays out)."""

    fmt: PixelFormat
    offset: int

    @property
    def end(self) -> int:
        return self.offset + self.fmt.nbytes


@dataclass(frozen=True)
class EncodedPixels:
    """The pixel values of one instance as codestreams, one per frame."""

    codec: str
    fmt: PixelFormat
    frames: tuple[bytes, ...]

    @property
    def nbytes(self) -> int:
        return sum(len(f) for f in self.frames)


# -- finding the pixel data ---------------------------------------------------------


def find_pixels(
    data: bytes, transfer_syntax: str, *, max_bytes: int = 1 << 30, max_frames: int = _MAX_FRAMES
) -> PixelLayout | None:
    """The native pixel data of `data` if it is something we encode, else None."""
    if transfer_syntax not in NATIVE_LE:
        return None
    try:
        found = _scan(data, implicit=transfer_syntax == "1.2.840.10008.1.2")
        if found is None or _PIXEL_DATA not in found:
            return None
        values = {name: data[pos : pos + n] for tag, name in _TAGS.items()
                  if tag in found for pos, n in (found[tag],)}  # fmt: skip

        def us(name: str, default: int | None = None) -> int:
            raw = values.get(name)
            if raw is None or len(raw) != 2:
                if default is None:
                    raise ValueError(f"{name} missing")
                return default
            return int(_U16(raw)[0])

        photometric = values.get("photometric", b"").strip(b"\x00 ").decode("ascii")
        frames_text = values.get("frames", b"").strip(b"\x00 ").decode("ascii")
        fmt = PixelFormat(
            rows=us("rows"),
            columns=us("columns"),
            samples=us("samples"),
            bits=us("bits_allocated"),
            signed=bool(us("signed", 0)),
            planar=us("planar", 0) if us("samples") == 3 else 0,
            frames=int(frames_text) if frames_text else 1,
        )
        fmt.check(max_bytes, max_frames)
        stored = us("bits_stored")
    except (ValueError, struct.error, IndexError, UnicodeDecodeError):
        return None
    if photometric not in _PHOTOMETRIC or not 1 <= stored <= fmt.bits:
        return None
    offset, length = found[_PIXEL_DATA]
    if length != fmt.nbytes and not (fmt.nbytes % 2 and length == fmt.nbytes + 1):
        return None
    if fmt.rows * fmt.columns < _MIN_PIXELS:
        return None
    if stored < fmt.bits and not _fits(data[offset : offset + fmt.nbytes], fmt, stored):
        return None
    return PixelLayout(fmt, offset)


def _scan(buf: bytes, implicit: bool) -> dict[int, tuple[int, int]] | None:
    """Top-level elements we care about: tag -> (value offset, length). None if encapsulated."""
    found: dict[int, tuple[int, int]] = {}
    pos, end = 0, len(buf)
    while pos + 8 <= end:
        group, elem = _TAG(buf, pos)
        tag = group << 16 | elem
        vr, length, vpos = _header(buf, pos, implicit)
        if length == _UNDEFINED:
            if tag == _PIXEL_DATA:
                return None
            pos = _skip_items(buf, vpos, implicit or vr == b"UN")
            continue
        if vpos + length > end:
            raise ValueError("element runs past the end")
        if tag in _TAGS or tag == _PIXEL_DATA:
            found[tag] = (vpos, length)
        if tag == _PIXEL_DATA:
            break
        pos = vpos + length
    return found


def _header(buf: bytes, pos: int, implicit: bool) -> tuple[bytes | None, int, int]:
    if implicit:
        return None, int(_U32(buf, pos + 4)[0]), pos + 8
    vr = bytes(buf[pos + 4 : pos + 6])
    if vr in _LONG_VRS:
        return vr, int(_U32(buf, pos + 8)[0]), pos + 12
    return vr, int(_U16(buf, pos + 6)[0]), pos + 8


def _skip_items(buf: bytes, pos: int, implicit: bool, depth: int = 0) -> int:
    """Past an undefined-length sequence (its delimiter included)."""
    if depth > 32:
        raise ValueError("sequences nested too deeply")
    while True:
        group, elem = _TAG(buf, pos)
        tag, length = group << 16 | elem, int(_U32(buf, pos + 4)[0])
        pos += 8
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            raise ValueError("expected an item")
        if length != _UNDEFINED:
            pos += length
            continue
        while True:  # an undefined-length item: its elements up to the item delimiter
            group, elem = _TAG(buf, pos)
            if group << 16 | elem == _ITEM_END:
                pos += 8
                break
            vr, n, vpos = _header(buf, pos, implicit)
            if n == _UNDEFINED:
                pos = _skip_items(buf, vpos, implicit or vr == b"UN", depth + 1)
            else:
                pos = vpos + n
            if pos > len(buf):
                raise ValueError("item runs past the end")


def _fits(pixels: bytes, fmt: PixelFormat, stored: int) -> bool:
    """True when every value is within BitsStored (no stray bits above it)."""
    arr = _samples(pixels, fmt)
    if fmt.signed:
        low, high = -(1 << (stored - 1)), (1 << (stored - 1)) - 1
        return bool(arr.min() >= low and arr.max() <= high)
    return bool(int(arr.max()) >> stored == 0)


# -- encode / decode ----------------------------------------------------------------


def available() -> tuple[str, ...]:
    """The codecs this process can encode and decode (none without imagecodecs)."""
    try:
        import imagecodecs
    except ImportError:
        return ()
    have = {
        JPEGLS: imagecodecs.JPEGLS.available,
        HTJ2K: imagecodecs.HTJ2K.available,
        JPEGXL: imagecodecs.JPEGXL.available,
    }
    return tuple(name for name in CODECS if have[name])


def supports(fmt: PixelFormat, codec: str) -> bool:
    """Whether `codec` is tried on pixels of this format at all.

    JPEG XL only for one sample per pixel: libjxl 0.11's fastest lossless mode (effort 1)
    gave back different values for about 2% of small 8-bit RGB images here (mid-range
    values; the verification in `encode` caught each), never for grayscale.
    """
    return codec in CODECS and (codec != JPEGXL or fmt.samples == 1)


def proven(fmt: PixelFormat, codec: str) -> bool:
    """Whether `codec` is exact on this format by construction, so that an instance may
    go without the decode-and-compare (the brief's "or the codec is proven exact").

    JPEG-LS (near-lossless distance 0) and reversible HTJ2K (the 5/3 integer wavelet)
    are lossless by their definitions, and our sample mapping is a bijection; the
    evidence that the libraries and the mapping hold to it is a property test over any
    grayscale values (tests/codecs/test_pixels.py). Not JPEG XL (libjxl's effort 1 was
    caught inexact on RGB), and not colour, where no such test runs.
    """
    return codec in PROVEN_CODECS and fmt.samples == 1


def encode(
    fmt: PixelFormat, pixels: bytes | memoryview, codec: str, *, verify: bool = True
) -> EncodedPixels | None:
    """`pixels` (fmt.nbytes of native samples) as one codestream per frame, or None.

    None when the codec does not take this format (`supports`), fails, or (with
    `verify`) when decoding its output does not give back exactly `pixels`: the caller
    then sends the instance the old way. Without `verify` only for `proven` formats.
    """
    if len(pixels) != fmt.nbytes or not supports(fmt, codec):
        return None
    arr = _samples(pixels, fmt)
    frames = []
    try:
        for index in range(fmt.frames):
            frames.append(_encode_frame(_to_codec(arr[index], fmt), codec))
        out = EncodedPixels(codec, fmt, tuple(frames))
        if verify and not round_trips(out, pixels):
            return None
    except (PixelCodecError, RuntimeError, ValueError):  # imagecodecs errors are RuntimeErrors
        return None
    return out


def round_trips(encoded: EncodedPixels, pixels: bytes | memoryview) -> bool:
    """Whether `encoded` decodes to exactly `pixels` (the agent's check)."""
    try:
        return decode(encoded) == pixels
    except PixelCodecError:
        return False


def decode(encoded: EncodedPixels) -> bytes:
    """The native pixel bytes back; PixelCodecError if a codestream is not what it claims."""
    import numpy

    fmt = encoded.fmt
    if len(encoded.frames) != fmt.frames or encoded.codec not in CODECS:
        raise PixelCodecError("frames or codec do not match the format")
    dtype = numpy.dtype("<u2" if fmt.bits == 16 else "u1")
    shape = (fmt.rows, fmt.columns) if fmt.samples == 1 else (fmt.rows, fmt.columns, 3)
    parts = []
    for data in encoded.frames:
        # Decode into an array of the announced shape: a codestream claiming more pixels
        # fails here instead of making the decoder allocate what it claims.
        out = numpy.empty(shape, dtype)
        try:
            got = _decode_frame(data, encoded.codec, out)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise PixelCodecError(f"{encoded.codec} frame does not decode: {exc}") from None
        if got.shape != shape or got.dtype != dtype:
            raise PixelCodecError(f"{encoded.codec} frame decodes to {got.shape} {got.dtype}")
        parts.append(_from_codec(got, fmt))
    return b"".join(parts)


def _samples(pixels: bytes | memoryview, fmt: PixelFormat) -> np.ndarray:
    """Frames as an array (frames, ...) of the stored sample type."""
    import numpy

    kind = ("<i2" if fmt.signed else "<u2") if fmt.bits == 16 else ("i1" if fmt.signed else "u1")
    arr = numpy.frombuffer(pixels, dtype=kind, count=fmt.nbytes // (fmt.bits // 8))
    if fmt.samples == 1:
        return arr.reshape(fmt.frames, fmt.rows, fmt.columns)
    if fmt.planar:
        return arr.reshape(fmt.frames, 3, fmt.rows, fmt.columns)
    return arr.reshape(fmt.frames, fmt.rows, fmt.columns, 3)


def _to_codec(frame: np.ndarray, fmt: PixelFormat) -> np.ndarray:
    """Unsigned, pixel-interleaved samples: what the codecs take."""
    import numpy

    unsigned = numpy.dtype("<u2" if fmt.bits == 16 else "u1")
    out = frame.view(unsigned)
    if fmt.signed:
        out = out ^ unsigned.type(1 << (fmt.bits - 1))
    if fmt.planar:
        out = out.transpose(1, 2, 0)
    return numpy.ascontiguousarray(out)


def _from_codec(arr: np.ndarray, fmt: PixelFormat) -> bytes:
    if fmt.signed:
        arr = arr ^ arr.dtype.type(1 << (fmt.bits - 1))
    if fmt.planar:
        arr = arr.transpose(2, 0, 1)
    return bytes(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())


def _encode_frame(frame: np.ndarray, codec: str) -> bytes:
    import imagecodecs

    if codec == JPEGLS:
        return bytes(imagecodecs.jpegls_encode(frame, level=0))
    if codec == JPEGXL:
        # Lossless at effort 1: its fastest mode, about HTJ2K's speed with 5% fewer bytes
        # on CT (docs/internals/codecs.md). One thread: parallelism is the pool's to choose.
        return bytes(imagecodecs.jpegxl_encode(frame, lossless=True, effort=1, numthreads=1))
    return bytes(imagecodecs.htj2k_encode(frame, reversible=True))


def _decode_frame(data: bytes, codec: str, out: np.ndarray) -> Any:
    import imagecodecs

    if codec == JPEGLS:
        return imagecodecs.jpegls_decode(data, out=out)
    if codec == JPEGXL:
        return imagecodecs.jpegxl_decode(data, numthreads=1, out=out)
    return imagecodecs.htj2k_decode(data, out=out)
