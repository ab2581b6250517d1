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

import re
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import numpy as np

JPEGLS: Final = "jpegls"
HTJ2K: Final = "htj2k"
JPEGXL: Final = "jpegxl"
CODECS: Final = (JPEGLS, HTJ2K, JPEGXL)
# libjxl's effort-1 lossless encoder (imagecodecs 2026.3.6) corrupts the heap and aborts
# the process on noise-like 16-bit frames whose values span 2**14 or more (128x128 and
# 256x256 every time; "free(): invalid next size"), whatever their offset; 2**13 never
# did over 88 sizes from 1x1 to 512x700. Wider frames go by another codec.
JPEGXL_MAX_SPAN: Final = 1 << 13
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
_U16BE = struct.Struct(">H").unpack_from
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
            frame = _to_codec(arr[index], fmt)
            if not _within_limits(frame, codec):
                return None
            frames.append(_encode_frame(frame, codec))
        out = EncodedPixels(codec, fmt, tuple(frames))
        if verify and not round_trips(out, pixels):
            return None
    except (PixelCodecError, RuntimeError, ValueError):  # imagecodecs errors are RuntimeErrors
        return None
    return out


def takes(fmt: PixelFormat, pixels: bytes | memoryview, codec: str) -> bool:
    """Whether `encode` tries `codec` on these pixels: `supports` for the format, and the
    codec's own limits on the values (JPEG XL: JPEGXL_MAX_SPAN)."""
    if len(pixels) != fmt.nbytes or not supports(fmt, codec):
        return False
    arr = _samples(pixels, fmt)
    return all(_within_limits(_to_codec(arr[i], fmt), codec) for i in range(fmt.frames))


def _within_limits(frame: np.ndarray, codec: str) -> bool:
    """A codec-ready frame's values within what `codec` encodes safely."""
    if codec != JPEGXL or frame.dtype.itemsize == 1 or frame.size == 0:
        return True
    return int(frame.max()) - int(frame.min()) < JPEGXL_MAX_SPAN


def round_trips(encoded: EncodedPixels, pixels: bytes | memoryview) -> bool:
    """Whether `encoded` decodes to exactly `pixels` (the agent's check)."""
    try:
        return decode(encoded) == pixels
    except PixelCodecError:
        return False


def decode(encoded: EncodedPixels) -> bytes:
    """The native pixel bytes back; PixelCodecError if a codestream is not what it claims.

    Each frame's header is checked first (`_check_header`): the decoders run in this
    process and some of their failures on bad input are not errors but signals or loops.
    """
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
        _check_header(data, encoded.codec, fmt)
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


# -- headers: what our encoder writes, and nothing else ------------------------------
#
# The workstation decodes in its own process, and the decoders are not safe on any input:
# OpenJPH 0.26 divides by a zero tile size (SIGFPE), reads before its quantisation table
# when QCD has no exponents (SIGSEGV, fixed upstream in 0.27), and loops for minutes on
# image offsets past the image; CharLS 2.4 reads about 2**31 zero bits (5 s of CPU) past
# the end of a scan that is not closed by a marker. A frame comes from the agent through
# the sealed session, so this is defence in depth against a broken or hostile agent: each
# frame must have the header our own encoder writes for the announced format, checked in
# Python before the decoder sees a byte. JPEG XL is left to libjxl (fuzzed upstream; no
# crash or hang in ours).

_J2K_SIZ: Final = struct.Struct(">HHHIIIIIIIIH")  # marker, Lsiz, Rsiz, Xsiz .. YTOsiz, Csiz
_J2K_COD: Final = struct.Struct(">HHBBHBBBBBB")  # ..., Scod, order, layers, MCT, levels, xcb, ..
_J2K_SOT: Final = struct.Struct(">HHHIBBH")  # marker, Lsot, Isot, Psot, TPsot, TNsot, then SOD
_HT_RSIZ: Final = 0x4000  # Part 15 (HTJ2K), no profile
_HT_PCAP: Final = 0x00020000  # CAP: Part 15 only
_HT_RPCL: Final = 2  # OpenJPH's default progression order
_HT_LEVELS: Final = 5  # OpenJPH's default decomposition levels (whatever the image size)
_HT_BLOCK: Final = 4  # 64x64 code blocks (2**(4+2))
_HT_STYLE: Final = 0x40  # HT code blocks, no other option
_HT_REVERSIBLE: Final = 1  # the 5/3 integer wavelet
_HT_GUARD_NO_QUANT: Final = 0x20  # one guard bit, no quantisation (reversible)
_HT_COD: Final = (12, 0, _HT_RPCL, 1, _HT_LEVELS, _HT_BLOCK, _HT_BLOCK, _HT_STYLE, _HT_REVERSIBLE)
"""COD but its colour transform: Lcod (no precincts), Scod, order, layers, levels, xcb, ycb,
style, wavelet."""
_SOC, _SIZ, _CAP, _COD, _QCD, _COM = 0xFF4F, 0xFF51, 0xFF50, 0xFF52, 0xFF5C, 0xFF64
_SOT, _SOD, _EOC = 0xFF90, 0xFF93, b"\xff\xd9"
_HT_MAIN: Final = {_CAP: 1, _COD: 1, _QCD: 1}  # and at most one COM: the library's version

_JLS_SOI, _JLS_EOI = b"\xff\xd8", b"\xff\xd9"
_JLS_APP8, _JLS_SOF55, _JLS_LSE, _JLS_SOS = 0xE8, 0xF7, 0xF8, 0xDA
_JLS_MARKER: Final = re.compile(b"\xff[\x80-\xff]")  # in a JPEG-LS scan, FF 0xxxxxxx is data


def _check_header(data: bytes, codec: str, fmt: PixelFormat) -> None:
    """Raise PixelCodecError unless `data` is laid out as our encoder writes `fmt`."""
    try:
        if codec == HTJ2K:
            _check_htj2k(data, fmt)
        elif codec == JPEGLS:
            _check_jpegls(data, fmt)
    except (struct.error, IndexError):
        raise PixelCodecError(f"{codec} codestream: header cut short") from None


def _refuse(codec: str, what: str) -> PixelCodecError:
    return PixelCodecError(f"{codec} codestream: {what}")


def _segments(data: bytes, pos: int, stop: int, codec: str) -> dict[int, list[int]]:
    """Offsets of the marker segments from `pos` up to the marker `stop` (by marker)."""
    found: dict[int, list[int]] = {}
    while True:
        marker, length = struct.unpack_from(">HH", data, pos)
        if marker == stop:
            found.setdefault(stop, []).append(pos)
            return found
        if marker >> 8 != 0xFF or length < 2 or pos + 2 + length > len(data):
            raise _refuse(codec, f"no marker segment at byte {pos}")
        found.setdefault(marker, []).append(pos)
        pos += 2 + length


def _check_htj2k(data: bytes, fmt: PixelFormat) -> None:
    """One tile and one tile-part covering the image, OpenJPH's defaults, reversible.

    That is what `htj2k_encode(frame, reversible=True)` writes: SIZ (the image, one
    tile, no offsets, each component of the allocated bits, unsigned since signed
    samples go as offset binary), CAP, COD, QCD, one COM (the library's version), then
    the tile-part up to EOC. Anything else (another tiling, offsets, subsampling, more
    levels, precincts, POC, per-component COC/QCC) is refused before OpenJPH reads it.
    """
    codec, mct = HTJ2K, int(fmt.samples == 3)
    (soc,) = struct.unpack_from(">H", data, 0)
    siz = _J2K_SIZ.unpack_from(data, 2)
    marker, lsiz, rsiz, xsiz, ysiz, xo, yo, xt, yt, xto, yto, csiz = siz
    if soc != _SOC or marker != _SIZ or lsiz != 38 + 3 * fmt.samples or csiz != fmt.samples:
        raise _refuse(codec, "no SIZ of the announced components after SOC")
    if rsiz != _HT_RSIZ:
        raise _refuse(codec, f"Rsiz {rsiz:#06x} is not plain HTJ2K")
    if (xsiz, ysiz, xt, yt) != (fmt.columns, fmt.rows, fmt.columns, fmt.rows):
        raise _refuse(codec, f"image {xsiz}x{ysiz} in tiles of {xt}x{yt}, not one tile")
    if xo or yo or xto or yto:
        raise _refuse(codec, "image or tile offsets")
    component = bytes((fmt.bits - 1, 1, 1))  # unsigned, no subsampling
    if data[2 + _J2K_SIZ.size : 2 + _J2K_SIZ.size + 3 * csiz] != component * csiz:
        raise _refuse(codec, "components are not unsigned, full size, of the allocated bits")
    found = _segments(data, 2 + _J2K_SIZ.size + 3 * csiz, _SOT, codec)
    sot = found.pop(_SOT)[0]
    counts = {m: len(v) for m, v in found.items()}
    if counts not in (_HT_MAIN, {**_HT_MAIN, _COM: 1}):
        raise _refuse(codec, "main header is not SIZ, CAP, COD, QCD and at most one COM")
    cap = found[_CAP][0]
    if data[cap + 2 : cap + 8] != b"\x00\x08" + _HT_PCAP.to_bytes(4, "big"):
        raise _refuse(codec, "CAP is not HTJ2K's")
    _, lcod, scod, order, layers, cmct, levels, xcb, ycb, style, wavelet = _J2K_COD.unpack_from(
        data, found[_COD][0]
    )
    if (lcod, scod, order, layers, levels, xcb, ycb, style, wavelet) != _HT_COD:
        raise _refuse(codec, "COD is not reversible HT coding with OpenJPH's defaults")
    if cmct != mct:
        raise _refuse(codec, "colour transform " + ("missing" if mct else "on one component"))
    qcd = found[_QCD][0]
    lqcd, sqcd = struct.unpack_from(">HB", data, qcd + 2)
    exponents = data[qcd + 5 : qcd + 2 + lqcd]
    low, high = fmt.bits + mct - 1, fmt.bits + mct + 2  # B + gain - guard, gains 0..3
    if (
        lqcd != 4 + 3 * _HT_LEVELS
        or sqcd != _HT_GUARD_NO_QUANT
        or any(e & 7 or not low <= e >> 3 <= high for e in exponents)
    ):
        raise _refuse(codec, "QCD is not one exponent per subband, unquantised, in range")
    _, lsot, isot, psot, tpsot, tnsot, sod = _J2K_SOT.unpack_from(data, sot)
    if (lsot, isot, tpsot, tnsot, sod) != (10, 0, 0, 1, _SOD) or sot + psot != len(data) - 2:
        raise _refuse(codec, "not one tile-part that runs to EOC")
    if data[-2:] != _EOC:
        raise _refuse(codec, "no EOC at the end")


def _check_jpegls(data: bytes, fmt: PixelFormat) -> None:
    """SOI, SPIFF, SOF55 of the announced format, default LSE, one lossless scan, EOI.

    CharLS checks that its bit reader did not run dry only where the scan meets a marker,
    not at the end of the buffer: a scan cut short costs seconds. So the scan must end at
    the EOI that closes the frame, with no marker before it (no restarts, no second
    scan), and the header may hold nothing our encoder does not write: no restart
    interval, mapping tables, near-lossless or point transform, subsampling.
    """
    codec = JPEGLS
    if data[:2] != _JLS_SOI:
        raise _refuse(codec, "no SOI")
    found: dict[int, list[int]] = {}
    pos = 2
    while data[pos + 1] != _JLS_SOS:
        marker, length = data[pos + 1], int(_U16BE(data, pos + 2)[0])
        if data[pos] != 0xFF or length < 2:
            raise _refuse(codec, f"no marker segment at byte {pos}")
        found.setdefault(marker, []).append(pos)
        pos += 2 + length
    sos = pos
    counts = {m: len(v) for m, v in found.items()}
    if counts.get(_JLS_SOF55) != 1 or counts.get(_JLS_LSE, 0) > 1 or counts.get(_JLS_APP8, 0) > 2:
        raise _refuse(codec, "header is not SPIFF, SOF55 and at most one LSE")
    if set(counts) - {_JLS_SOF55, _JLS_LSE, _JLS_APP8} or data[sos] != 0xFF:
        raise _refuse(codec, "header has markers our encoder never writes")
    sof = found[_JLS_SOF55][0]
    lf, bits, rows, columns, nf = struct.unpack_from(">HBHHB", data, sof + 2)
    want = (8 + 3 * fmt.samples, fmt.bits, fmt.rows, fmt.columns, fmt.samples)
    if (lf, bits, rows, columns, nf) != want:
        raise _refuse(codec, f"SOF55 says {columns}x{rows}, {nf} components of {bits} bits")
    if any(data[sof + 11 + 3 * c : sof + 13 + 3 * c] != b"\x11\x00" for c in range(nf)):
        raise _refuse(codec, "SOF55 components are subsampled")
    if _JLS_LSE in found:
        lse = found[_JLS_LSE][0]
        if data[lse + 2 : lse + 15] != _jls_default_presets(fmt.bits):
            raise _refuse(codec, "LSE is not the default coding parameters")
    ls, ns = struct.unpack_from(">HB", data, sos + 2)
    near, ilv, al = struct.unpack_from(">BBB", data, sos + 5 + 2 * ns)
    if ls != 6 + 2 * ns or ns != fmt.samples or near or al:
        raise _refuse(codec, "SOS is not one lossless scan of every component")
    if any(data[sos + 6 + 2 * c] for c in range(ns)):
        raise _refuse(codec, "SOS asks for a mapping table")
    if ilv not in ((0,) if ns == 1 else (1, 2)):
        raise _refuse(codec, f"interleave mode {ilv} for {ns} components")
    end = _JLS_MARKER.search(data, sos + 2 + ls)
    if end is None or end.start() != len(data) - 2 or data[-2:] != _JLS_EOI:
        raise _refuse(codec, "the scan does not run to the EOI that ends the frame")


def _jls_default_presets(bits: int) -> bytes:
    """The LSE (type 1) CharLS writes: Ll, ID, MAXVAL and ISO 14495-1's default T1..RESET."""
    maxval = (1 << bits) - 1
    factor = (min(maxval, 4095) + 128) >> 8  # C.2.4.1.1.1, NEAR 0, MAXVAL >= 128
    t1 = min(max(factor * (3 - 2) + 2, 1), maxval)
    t2 = min(max(factor * (7 - 3) + 3, t1), maxval)
    t3 = min(max(factor * (21 - 4) + 4, t2), maxval)
    return struct.pack(">HBHHHHH", 13, 1, maxval, t1, t2, t3, 64)
