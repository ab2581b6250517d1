"""relay.codecs.pixels: a codestream's header is checked before the decoder sees it.

OpenJPH 0.26 dies on some malformed headers (SIGFPE, SIGSEGV) or loops for minutes, and
CharLS 2.4 spends seconds on a cut-short JPEG-LS scan. The workstation decodes in its own
process, so `decode` refuses any header our encoder would not have written, as a
PixelCodecError (a PixelMismatchError on the wire). Inputs that used to kill or hang the
interpreter are decoded in a child process, so this suite survives them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

import numpy as np
import pytest

from relay.codecs import EncodedPixels, PixelCodecError, PixelFormat, decode, encode
from tests.codecs.pixel_data import Image, pixel_values

_ROOT: Final = Path(__file__).resolve().parents[2]
GRAY16: Final = PixelFormat(64, 80, 1, 16, False, 0, 1)
RGB8: Final = PixelFormat(64, 80, 3, 8, False, 0, 1)
Mutation = Callable[[bytes], bytes]

_CHILD: Final = r"""
import json, sys
from relay.codecs import pixels as px
fmt = px.PixelFormat.from_wire(json.loads(sys.argv[2]))
try:
    px.decode(px.EncodedPixels(sys.argv[1], fmt, (sys.stdin.buffer.read(),)))
    print("decoded")
except px.PixelCodecError as exc:
    print("refused:", exc)
"""


def _frame(codec: str, fmt: PixelFormat = GRAY16, seed: int = 3) -> bytes:
    enc = encode(fmt, pixel_values(Image(fmt, fmt.bits), seed), codec)
    assert enc is not None
    return enc.frames[0]


def _put(data: bytes, at: int, value: int, size: int) -> bytes:
    out = bytearray(data)
    out[at : at + size] = value.to_bytes(size, "big")
    return bytes(out)


def _decode_in_child(codec: str, fmt: PixelFormat, frame: bytes) -> str:
    """`decode` in a fresh interpreter: 'refused: ...', 'decoded', or how the child died."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, codec, json.dumps(fmt.to_wire())],
            input=frame,
            capture_output=True,
            timeout=10,
            cwd=_ROOT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "still decoding after 10 s"
    if done.returncode != 0:
        return f"died with exit code {done.returncode}"
    return done.stdout.decode().strip()


def _refused(codec: str, fmt: PixelFormat, frame: bytes) -> str:
    with pytest.raises(PixelCodecError, match=f"{codec} codestream") as caught:
        decode(EncodedPixels(codec, fmt, (frame,)))
    return str(caught.value)


# -- HTJ2K: SIZ at offset 2 (Lsiz 4, Rsiz 6, Xsiz 8, Ysiz 12, XOsiz 16, YOsiz 20, XTsiz 24,
# YTsiz 28, XTOsiz 32, YTOsiz 36, Csiz 40, then Ssiz/XRsiz/YRsiz per component from 42)


def _main_segment(frame: bytes, marker: bytes) -> int:
    """Offset of `marker` among the main header's segments (after SIZ, before SOT)."""
    pos = 2
    while frame[pos : pos + 2] != marker:
        assert frame[pos : pos + 2] != b"\xff\x90", f"no {marker.hex()} before the tile"
        pos += 2 + int.from_bytes(frame[pos + 2 : pos + 4], "big")
    return pos


def _without_qcd_exponents(frame: bytes) -> bytes:
    qcd = _main_segment(frame, b"\xff\x5c")
    length = int.from_bytes(frame[qcd + 2 : qcd + 4], "big")
    return frame[: qcd + 2] + b"\x00\x03" + frame[qcd + 4 : qcd + 5] + frame[qcd + 2 + length :]


def _insert_main(frame: bytes, segment: bytes) -> bytes:
    """`segment` added to the main header, before COD."""
    at = _main_segment(frame, b"\xff\x52")
    return frame[:at] + segment + frame[at:]


CRASHERS: Final[
    dict[str, Mutation]
] = {  # each killed or hung the interpreter before the header check
    "tile width 0 (SIGFPE)": lambda f: _put(f, 24, 0, 4),
    "tile height 0 (SIGFPE)": lambda f: _put(f, 28, 0, 4),
    "QCD without exponents (SIGSEGV)": _without_qcd_exponents,
    "image offsets past the image (minutes of CPU)": lambda f: _put(
        _put(f, 16, 255, 4), 20, 0xFF000000, 4
    ),
}


@pytest.mark.parametrize("name", list(CRASHERS))
def test_htj2k_headers_that_crashed_or_hung_openjph_are_refused(name: str) -> None:
    frame = CRASHERS[name](_frame("htj2k"))
    assert _decode_in_child("htj2k", GRAY16, frame).startswith("refused: htj2k codestream")


def test_a_crashing_htj2k_frame_is_a_pixel_mismatch_on_the_wire() -> None:
    """The exact type the receiving paths handle: they distrust the codec and resume."""
    child = r"""
import sys
from relay.codecs import pixels as px
from relay.dicom import codec as dc
fmt = px.PixelFormat(64, 80, 1, 16, False, 0, 1)
pix = bytes(fmt.nbytes)
ds = b"\xe0\x7f\x10\x00OW\x00\x00" + len(pix).to_bytes(4, "little") + pix
frame = bytearray(px.encode(fmt, pix, "htj2k").frames[0])
frame[28:32] = bytes(4)  # SIZ tile height 0
enc = px.EncodedPixels("htj2k", fmt, (bytes(frame),))
inst = dc.Instance("1.2.3", "1.2.3.4", "1.2.840.10008.1.2.1", ds)
wire = dc.MessageCodec().encode(inst, dc.PixelPart(enc, 12))
try:
    dc.MessageCodec(accept_pixels=True).decode_frame(wire)
except dc.PixelMismatchError as exc:
    print("mismatch:", exc.codec)
"""
    done = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, timeout=10, cwd=_ROOT, check=False
    )
    assert (done.returncode, done.stdout.decode().strip()) == (0, "mismatch: htj2k")


HTJ2K_OTHERS: Final[
    dict[str, Mutation]
] = {  # what our encoder never writes, refused before any decoding
    "another width": lambda f: _put(_put(f, 8, 81, 4), 24, 81, 4),
    "another height": lambda f: _put(_put(f, 12, 63, 4), 28, 63, 4),
    "two tiles": lambda f: _put(f, 24, 40, 4),
    "a tile offset": lambda f: _put(f, 32, 5, 4),
    "8 bits for a 16-bit image": lambda f: _put(f, 42, 7, 1),
    "signed samples": lambda f: _put(f, 42, 0x8F, 1),
    "subsampling": lambda f: _put(f, 43, 2, 1),
    "not HTJ2K (Rsiz)": lambda f: _put(f, 6, 0, 2),
    "six levels": lambda f: _put(f, _main_segment(f, b"\xff\x52") + 9, 6, 1),
    "LRCP order": lambda f: _put(f, _main_segment(f, b"\xff\x52") + 5, 0, 1),
    "32x32 code blocks": lambda f: _put(f, _main_segment(f, b"\xff\x52") + 10, 3, 1),
    "irreversible 9/7": lambda f: _put(f, _main_segment(f, b"\xff\x52") + 13, 0, 1),
    "QCD exponent out of range": lambda f: _put(f, _main_segment(f, b"\xff\x5c") + 5, 0xF8, 1),
    "QCD of scalar quantization": lambda f: _put(f, _main_segment(f, b"\xff\x5c") + 4, 0x22, 1),
    "a POC segment": lambda f: _insert_main(f, b"\xff\x5f\x00\x09\x00\x00\x00\x01\x06\x01\x02"),
    "a second COM segment": lambda f: _insert_main(f, b"\xff\x64\x00\x05\x00\x01x"),
    "no EOC": lambda f: f[:-2],
    "bytes after EOC": lambda f: f + b"\x00",
    "tile-part length short of EOC": lambda f: _put(
        f, _main_segment(f, b"\xff\x90") + 6, len(f) - _main_segment(f, b"\xff\x90") - 3, 4
    ),
    "garbage only": lambda f: b"\x00" * 64,
}


@pytest.mark.parametrize("name", list(HTJ2K_OTHERS))
def test_htj2k_headers_our_encoder_never_writes_are_refused(name: str) -> None:
    _refused("htj2k", GRAY16, HTJ2K_OTHERS[name](_frame("htj2k")))


def test_an_rgb_htj2k_header_must_use_the_colour_transform() -> None:
    frame = _frame("htj2k", RGB8)
    decode(EncodedPixels("htj2k", RGB8, (frame,)))  # as written: fine
    assert "colour transform" in _refused(
        "htj2k", RGB8, _put(frame, _main_segment(frame, b"\xff\x52") + 8, 0, 1)
    )


# -- JPEG-LS ----------------------------------------------------------------------------


def test_a_cut_short_jpegls_scan_is_refused_at_once() -> None:
    """The reviewer's frame (one byte changed, cut at 6800 of 8322): CharLS 2.4 read past
    the end for about 2**31 zero bits (5 s of CPU) before it said so."""
    img = np.random.default_rng(1).integers(0, 4000, (64, 80)).astype(np.uint16)
    enc = encode(GRAY16, img.tobytes(), "jpegls")
    assert enc is not None
    frame = bytearray(enc.frames[0])
    frame[1505] = 37
    started = time.process_time()
    assert "EOI" in _refused("jpegls", GRAY16, bytes(frame[:6800]))
    assert time.process_time() - started < 0.5


def _jls_segment(frame: bytes, marker: int) -> int:
    pos = 2
    while frame[pos + 1] != marker:
        assert frame[pos + 1] != 0xDA, f"no FF{marker:02X} before the scan"
        pos += 2 + int.from_bytes(frame[pos + 2 : pos + 4], "big")
    return pos


def _insert_before(frame: bytes, marker: int, segment: bytes) -> bytes:
    at = _jls_segment(frame, marker)
    return frame[:at] + segment + frame[at:]


# SOF55: FFF7 L P Y X Nf (C H/V Tq)..; SOS: FFDA L Ns (C Tm).. NEAR ILV Al; LSE: FFF8 L ID MAXVAL..
JPEGLS_CASES: Final[dict[str, Mutation]] = {
    "another height": lambda f: _put(f, _jls_segment(f, 0xF7) + 5, 63, 2),
    "another width": lambda f: _put(f, _jls_segment(f, 0xF7) + 7, 81, 2),
    "12 bits": lambda f: _put(f, _jls_segment(f, 0xF7) + 4, 12, 1),
    "subsampling": lambda f: _put(f, _jls_segment(f, 0xF7) + 11, 0x21, 1),
    "near-lossless": lambda f: _put(f, _jls_segment(f, 0xDA) + 7, 1, 1),
    "line interleave for one component": lambda f: _put(f, _jls_segment(f, 0xDA) + 8, 1, 1),
    "a point transform": lambda f: _put(f, _jls_segment(f, 0xDA) + 9, 1, 1),
    "another MAXVAL": lambda f: _put(f, _jls_segment(f, 0xF8) + 5, 4095, 2),
    "another threshold": lambda f: _put(f, _jls_segment(f, 0xF8) + 7, 3, 2),
    "a restart interval": lambda f: _insert_before(f, 0xDA, b"\xff\xdd\x00\x04\x00\x01"),
    "a mapping table": lambda f: _insert_before(f, 0xDA, b"\xff\xf8\x00\x06\x02\x01\x01\x00"),
    "a marker inside the scan": lambda f: f[:-200] + b"\xff\xd0" + f[-200:],
    "no EOI": lambda f: f[:-2],
    "bytes after EOI": lambda f: f + b"\x00",
    "no SOI": lambda f: f[2:],
}


@pytest.mark.parametrize("name", list(JPEGLS_CASES))
def test_jpegls_headers_our_encoder_never_writes_are_refused(name: str) -> None:
    _refused("jpegls", GRAY16, JPEGLS_CASES[name](_frame("jpegls")))


def test_an_rgb_jpegls_frame_is_one_interleaved_scan() -> None:
    frame = _frame("jpegls", RGB8)
    decode(EncodedPixels("jpegls", RGB8, (frame,)))
    assert "interleave" in _refused(
        "jpegls", RGB8, _put(frame, _jls_segment(frame, 0xDA) + 12, 0, 1)
    )


# -- what our encoder writes passes --------------------------------------------------


@pytest.mark.parametrize("codec", ["htj2k", "jpegls"])
@pytest.mark.parametrize(
    "fmt",
    [
        PixelFormat(1, 64, 1, 16, True, 0, 1),
        PixelFormat(64, 1, 1, 8, False, 0, 1),
        PixelFormat(300, 1, 3, 8, False, 1, 2),
        PixelFormat(8, 8, 3, 16, True, 0, 1),
        PixelFormat(512, 512, 1, 16, False, 0, 1),
    ],
)
def test_odd_shapes_our_encoder_writes_pass_the_checks(codec: str, fmt: PixelFormat) -> None:
    pixels = pixel_values(Image(fmt, fmt.bits), 5)
    enc = encode(fmt, pixels, codec, verify=False)
    assert enc is not None
    assert decode(enc) == pixels
