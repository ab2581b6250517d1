"""Frames as HTJ2K for browsers (PS3.18 8.7.3, issue 14): lossless, sans-I/O.

The relay otherwise serves the PACS's bytes as stored. When a request for frames asks for
an HTJ2K transfer syntax (1.2.840.10008.1.2.4.201 lossless, .202 lossless RPCL, .203) and
the stored pixel data is uncompressed (frames.py: native, big endian or encapsulated
uncompressed, whose frames it gives as little-endian values), each frame is encoded with
imagecodecs (OpenJPH): reversible 5/3 wavelet, RPCL order with TLM markers, which is a
valid codestream for all three syntaxes. Every frame is decoded again and compared with
the stored pixels before it is sent; a pixel format the codec does not take exactly
(1-bit, 32-bit, float, planar colour...) is `Unsupported` and the request falls back to
what else it accepts, or 406.

`choose` walks the Accept ranges best first: native when a range accepts the stored
syntax (OHIF's default `transfer-syntax=*` stays native), HTJ2K when a range asks for it.
A single-part `image/jphc` range (one frame only) is answered with the bare codestream,
which is what a progressive viewer fetches in byte ranges (byterange.py, issue 14); its
syntax is .202 (RPCL) unless the range names another of the three.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import numpy as np
from pydicom.dataset import Dataset

from relay.workstation.dicomweb.media import (
    FRAME_TYPES,
    AcceptError,
    MediaRange,
    acceptable,
    candidate,
    frame_media_type,
    negotiate,
    quality,
    syntaxes_to_try,
)

__all__ = [
    "HTJ2K",
    "MAX_FRAMES",
    "RPCL",
    "Choice",
    "Unsupported",
    "choose",
    "encode_frames",
    "satisfiable",
]

HTJ2K: Final = frozenset({
    "1.2.840.10008.1.2.4.201",  # HTJ2K Image Compression (Lossless Only)
    "1.2.840.10008.1.2.4.202",  # HTJ2K with RPCL Options Image Compression (Lossless Only)
    "1.2.840.10008.1.2.4.203",  # HTJ2K Image Compression
})  # fmt: skip
MEDIA_TYPE: Final = "image/jphc"
RPCL: Final = "1.2.840.10008.1.2.4.202"  # what our codestreams are (and a bare one says)
MAX_FRAMES: Final = 256  # frames one request may have encoded (CPU per request)
_PART_TYPES: Final = (MEDIA_TYPE, "application/octet-stream")


class Unsupported(ValueError):
    """This pixel data cannot be encoded exactly."""


@dataclass(frozen=True)
class Choice:
    """The part type to answer with, and the syntax to encode to (None: as stored)."""

    part_type: str
    encode_to: str | None = None
    single: bool = False  # the bare codestream of one frame, not a multipart body


def _asks_htj2k(r: MediaRange) -> bool:
    if r.type == MEDIA_TYPE:
        return r.params.get("transfer-syntax", RPCL) in HTJ2K
    return r.params.get("transfer-syntax") in HTJ2K


def choose(ranges: list[MediaRange], native_types: tuple[str, ...], stored: str,
           native: bool, encodable: bool, *, one_frame: bool = False) -> Choice:  # fmt: skip
    """What to answer a frames request with; AcceptError (406) when nothing fits.

    `stored`: the syntax frames are served in as they are (frames.frame_syntax);
    `native`: the stored syntax is uncompressed; `encodable`: its pixels can be HTJ2K;
    `one_frame`: one frame is asked for, so a single-part `image/jphc` range can be met.
    An answer the most specific range matching it gives q=0 is never chosen."""
    for r in acceptable(ranges):
        choices = _choices_of(r, native_types, stored, native=native, encodable=encodable,
                              one_frame=one_frame)  # fmt: skip
        for found in choices:
            syntax = found.encode_to or stored
            if quality(ranges, *candidate(not found.single, found.part_type, syntax)) > 0:
                return found
    if native and not encodable and any(_asks_htj2k(r) for r in acceptable(ranges)):
        raise AcceptError("this pixel format cannot be encoded as HTJ2K exactly")
    raise AcceptError(
        f"the stored transfer syntax is {stored}; frames are served as stored or, from "
        "native pixel data, as HTJ2K (transfer-syntax=1.2.840.10008.1.2.4.201/202/203)"
    )


def _choices_of(r: MediaRange, native_types: tuple[str, ...], stored: str, *, native: bool,
                encodable: bool, one_frame: bool) -> Iterator[Choice]:  # fmt: skip
    """What range `r` alone allows answering with, preferred first (choose's arguments)."""
    if r.type == MEDIA_TYPE:  # single part: only the bare codestream of one frame
        if one_frame and native and encodable and _asks_htj2k(r):
            yield Choice(MEDIA_TYPE, r.params.get("transfer-syntax", RPCL), single=True)
        return
    for part in native_types:  # as stored, when this range alone allows it
        if _allows([r], part, stored):
            yield Choice(part)
    wanted = r.params.get("transfer-syntax")
    if not (native and encodable and wanted in HTJ2K):
        return
    if r.type not in ("multipart/related", "multipart/*", "*/*"):
        return
    inner = r.inner or "*/*"
    for part in _PART_TYPES:
        if inner in ("*/*", "image/*", part):
            yield Choice(part, wanted)


def _allows(ranges: list[MediaRange], part: str, stored: str) -> bool:
    try:
        negotiate(ranges, True, (part,), stored)
    except AcceptError:
        return False
    return True


def satisfiable(ranges: list[MediaRange], one_frame: bool) -> bool:
    """Whether a frames request with these ranges could be answered for some stored
    syntax and pixel format: one that never could is 406 before anything is retrieved."""
    # every syntax with a frame type of its own stands for itself: `*/*` takes its image/jpeg
    for stored in dict.fromkeys((*syntaxes_to_try(ranges), *FRAME_TYPES)):
        types = frame_media_type(stored)
        for native, can in ((True, True), (False, False)):
            try:
                choose(ranges, types, stored, native, can, one_frame=one_frame)
            except AcceptError:
                continue
            return True
    return False


def _layout(ds: Dataset) -> tuple[np.dtype[np.generic], tuple[int, ...]]:
    """The numpy type and shape of one native frame; Unsupported when not encodable."""
    bits = int(ds.get("BitsAllocated", 0) or 0)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if bits not in (8, 16):
        raise Unsupported(f"{bits} bits allocated")
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise Unsupported("float pixel data")
    if rows <= 0 or cols <= 0:
        raise Unsupported("no image size")
    if samples == 1:
        shape: tuple[int, ...] = (rows, cols)
    elif samples == 3 and int(ds.get("PlanarConfiguration", 0) or 0) == 0 and bits == 8:
        shape = (rows, cols, 3)
    else:
        raise Unsupported(f"{samples} samples per pixel")
    kind = ("i" if signed else "u") + str(bits // 8)
    return np.dtype("<" + kind), shape


def encodable(ds: Dataset) -> bool:
    try:
        _layout(ds)
    except Unsupported:
        return False
    return True


def encode_frames(ds: Dataset, frames: list[bytes]) -> list[bytes]:
    """Each native frame as a lossless HTJ2K codestream, checked by decoding it again."""
    import imagecodecs

    dtype, shape = _layout(ds)
    if len(frames) > MAX_FRAMES:
        raise Unsupported(f"more than {MAX_FRAMES} frames in one HTJ2K request")
    out = []
    for frame in frames:
        pixels = np.frombuffer(frame, dtype=dtype)
        if pixels.size != int(np.prod(shape)):
            raise Unsupported("a frame of unexpected length")
        pixels = pixels.reshape(shape)
        encoded = bytes(imagecodecs.htj2k_encode(pixels, reversible=True, tlm=True))
        back = imagecodecs.htj2k_decode(encoded)
        if back.shape != pixels.shape or not np.array_equal(back, pixels):
            raise Unsupported("the HTJ2K round trip is not exact")
        out.append(encoded)
    return out
