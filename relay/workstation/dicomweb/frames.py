"""Frames out of an instance's Pixel Data (sans-I/O; PS3.18 section 8.3.5.1.3).

Which syntaxes hold what (PS3.5 section 8 and annex A):
- native little endian (Implicit and Explicit VR LE; Deflated Explicit VR LE, whose
  dataset `rawds.decode_dataset` has inflated): the value is the frames back to back,
  Rows x Columns x SamplesPerPixel x BitsAllocated/8 bytes each (two thirds of that in
  YBR_FULL_422; `_frame_size`, the one place), cut as they are;
- Explicit VR Big Endian (retired, still held by PACS): the same layout with each sample
  most significant byte first; 16-bit samples (and 8-bit ones in OW words, annex D) are
  swapped back. 1-, 32- and 64-bit samples in big endian OW are read differently by
  toolkits (pydicom swaps whole samples, DCMTK 16-bit words): refused (`Unservable`)
  rather than guessed, since a viewer must never be shown wrong pixels;
- Encapsulated Uncompressed Explicit VR LE (1.2.840.10008.1.2.1.98): each fragment is
  one native frame, plus a pad byte when its length is odd;
- every other syntax, unknown ones included: encapsulated, one frame per fragment or as
  the Basic Offset Table says (pydicom's frame generator), served only as stored.

The first three are `uncompressed`: their frames come out as little-endian pixel values,
served as Explicit VR LE (`frame_syntax`) and encodable as HTJ2K. Frame numbers are
1-based; a number past the last frame is a `FrameError` (the HTTP layer answers 404), a
malformed list 400, frames that cannot be given exactly `Unservable` (406).
"""

from __future__ import annotations

from typing import Final, TypeAlias

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames

from relay.workstation.dicomweb import fragments
from relay.workstation.dicomweb.media import EXPLICIT_LE, IMPLICIT_LE

__all__ = [
    "BIG_ENDIAN",
    "ENCAPSULATED_UNCOMPRESSED",
    "BitPacked",
    "FrameError",
    "Octets",
    "Unservable",
    "bit_packed_frame",
    "check",
    "frame_numbers",
    "frame_syntax",
    "get_frames",
    "is_encapsulated",
    "little_endian",
    "native_pixels",
    "uncompressed",
]

MAX_FRAMES_PER_REQUEST: Final = 4096
# A value's bytes: held, made, or a view of the held ones (pixelview.py)
Octets: TypeAlias = bytes | bytearray | memoryview
DEFLATED_LE: Final = "1.2.840.10008.1.2.1.99"
BIG_ENDIAN: Final = "1.2.840.10008.1.2.2"
ENCAPSULATED_UNCOMPRESSED: Final = "1.2.840.10008.1.2.1.98"
# Pixel Data a value of little-endian frames back to back, once the dataset is read.
_NATIVE_LE: Final = frozenset({IMPLICIT_LE, EXPLICIT_LE, DEFLATED_LE})
# Bytes a value's numbers have, by VR (PS3.5 6.2): what big endian swaps in bulk data.
_WORD: Final = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}


class FrameError(ValueError):
    """No such frame (404), or no pixel data."""


class Unservable(ValueError):
    """The frames exist but cannot be given exactly as the syntax they would be served in
    says (406): never a guess at pixel values."""


class BitPacked(Unservable):
    """1-bit frames that do not each start on a byte: no frame is a run of the value's
    bytes, so none is served as one (406); rendering cuts one by its bits instead
    (`bit_packed_frame`)."""


def frame_numbers(text: str) -> list[int]:
    """`1,2,3` -> [1, 2, 3]; ValueError naming what is wrong (a repeat included: an answer
    holds each frame at most once, so it is never larger than the instance's pixels).
    ASCII digits only: str.isdigit() also takes other scripts' digits (which int() reads)
    and superscripts (which it refuses)."""
    items = text.split(",")
    if len(items) > MAX_FRAMES_PER_REQUEST:
        raise ValueError(f"more than {MAX_FRAMES_PER_REQUEST} frames in one request")
    out: dict[int, None] = {}
    for raw in items:
        item = raw.strip()
        if not (item.isascii() and item.isdigit()) or len(item) > 9 or int(item) < 1:
            raise ValueError(f"frame numbers are whole numbers from 1, got {item[:20]!r}")
        if int(item) in out:  # each would be a copy of the frame in one answer
            raise ValueError(f"frame {int(item)} is asked for twice")
        out[int(item)] = None
    return list(out)


def uncompressed(transfer_syntax: str) -> bool:
    """Frames of this syntax come out of `get_frames` as little-endian pixel values."""
    return transfer_syntax in _NATIVE_LE or transfer_syntax in (
        BIG_ENDIAN,
        ENCAPSULATED_UNCOMPRESSED,
    )


def is_encapsulated(transfer_syntax: str) -> bool:
    """Pixel Data of this syntax is fragments (every syntax not known to be native)."""
    return not (transfer_syntax in _NATIVE_LE or transfer_syntax == BIG_ENDIAN)


def frame_syntax(transfer_syntax: str) -> str:
    """The syntax `get_frames`' frames are in: Explicit VR LE for uncompressed pixel data
    (what every viewer decodes), else the stored syntax (the relay does not transcode)."""
    return EXPLICIT_LE if uncompressed(transfer_syntax) else transfer_syntax


def _pixel_bytes(ds: Dataset) -> Octets:
    """The Pixel Data value: a view of the instance's bytes when read by pixelview."""
    value = ds.get("PixelData")
    if not isinstance(value, bytes | bytearray | memoryview) or not len(value):
        raise FrameError("the instance has no pixel data")
    return value


def _pixel_value(ds: Dataset) -> memoryview:
    """The Pixel Data value as a view: frames are cut out of it, never the whole copied."""
    return memoryview(_pixel_bytes(ds))


def _frame_count(ds: Dataset) -> int:
    return int(ds.get("NumberOfFrames", 1) or 1)


def _frame_size(ds: Dataset, count: int) -> int:
    """Bytes of one native frame, as pydicom's get_expected_length counts them: native
    YBR_FULL_422 holds two samples a pixel, not three (Y Y Cb Cr for two pixels, PS3.3
    C.7.6.3.1.2); frames of 1 bit must end on a byte boundary (`BitPacked` else)."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.BitsAllocated)
    if bits % 8:
        if bits != 1:
            raise FrameError(f"cannot cut frames of {bits} bits allocated")
        size_bits = rows * cols * samples
        if count > 1 and size_bits % 8:
            raise BitPacked(
                "1-bit frames that do not end on a byte boundary are not served "
                "as frames (ask for the rendered frame)"
            )
        return (size_bits + 7) // 8
    size = rows * cols * samples * bits // 8
    if str(ds.get("PhotometricInterpretation", "")) == "YBR_FULL_422":
        size = size // 3 * 2
    return size


def bit_packed_frame(ds: Dataset, number: int) -> bytes:
    """Frame `number` of native 1-bit data whose frames do not start on a byte (`BitPacked`)
    as a value of that frame alone, its first pixel in bit 0: its bits unpacked from the
    bytes around them only (pydicom 3.0's `pixel_array(index=)` fails on such frames, and
    decoding them all for one costs every frame)."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    bits = rows * cols * int(ds.get("SamplesPerPixel", 1) or 1)
    data = _pixel_value(ds)
    start = (number - 1) * bits
    first, end = start // 8, (start + bits + 7) // 8
    if end > len(data):
        raise FrameError("the pixel data is shorter than its frames")
    around = np.unpackbits(np.frombuffer(data[first:end], np.uint8), bitorder="little")
    own = around[start - first * 8 : start - first * 8 + bits]
    return np.packbits(own, bitorder="little").tobytes()


def _big_endian_word(ds: Dataset) -> int:
    """Bytes swapped together to make big endian Pixel Data little endian: 1 (none) or 2;
    Unservable for the layouts toolkits disagree on."""
    bits = int(ds.get("BitsAllocated", 0) or 0)
    vr = ds["PixelData"].VR if "PixelData" in ds else "OB"
    if bits == 8 and vr == "OB":
        return 1
    if bits == 16 or (bits == 8 and vr == "OW"):  # 8-bit samples in 16-bit words: annex D
        return 2
    raise Unservable(
        f"{bits}-bit pixel data in big endian {vr} is read differently by DICOM toolkits; "
        "the relay does not guess (ask the PACS for a little-endian syntax)"
    )


def _swapped(data: memoryview) -> bytes:
    """16-bit words of big endian data as little endian (an odd last byte: a zero pad
    byte is swapped in before it and cut off after, as the whole value's pad would be)."""
    even: bytes | memoryview = bytes(data) + b"\0" if len(data) % 2 else data
    return np.frombuffer(even, dtype=">u2").astype("<u2").tobytes()[: len(data)]


def _big_endian_frame(ds: Dataset, data: memoryview, first: int, size: int) -> bytes:
    """Bytes first..first+size of the Pixel Data as little endian: the words around
    them alone are swapped (a frame of odd size starts or ends inside a word)."""
    if _big_endian_word(ds) == 1:
        return bytes(data[first : first + size])
    start = first - first % 2
    end = min(len(data), first + size + (first + size) % 2)
    return _swapped(data[start:end])[first - start : first - start + size]


def _from_big_endian(ds: Dataset, data: memoryview) -> bytes | bytearray:
    """The Pixel Data value of an Explicit VR Big Endian dataset as little endian, made
    in one copy (swapped in place)."""
    out = bytearray(data)
    if _big_endian_word(ds) == 1:
        return out
    if len(out) % 2:
        out.append(0)
    np.frombuffer(out, dtype="<u2").byteswap(inplace=True)
    del out[len(data) :]
    return out


def check(ds: Dataset, transfer_syntax: str) -> None:
    """Unservable when no frame of this instance can be given exactly (before choosing
    what to answer with, so that the refusal says why)."""
    if transfer_syntax == BIG_ENDIAN and "PixelData" in ds:
        _big_endian_word(ds)


def _table(ds: Dataset, value: memoryview, count: int) -> fragments.FrameTable | None:
    """The value's frame table: the held instance's (walked once for all its requests),
    else walked for this request (a dataset decoded without its instance's index)."""
    index = fragments.index_of(ds)
    if index is None:
        return fragments.one_per_fragment(value, count)
    return index.table(value, count)


def _views(table: fragments.FrameTable | None, value: memoryview,
           numbers: list[int]) -> list[memoryview] | None:  # fmt: skip
    """Frames `numbers` as views of their fragments, each where the table says; None
    without a table (not one fragment a frame) or when one is not there."""
    if table is None:
        return None
    views = [table.frame(value, n) for n in numbers]
    return None if any(v is None for v in views) else [v for v in views if v is not None]


def _wanted(ds: Dataset, data: memoryview, transfer_syntax: str, count: int,
            numbers: list[int]) -> list[bytes]:  # fmt: skip
    """Frames `numbers` of encapsulated pixel data, as stored, each copied alone (the
    others are neither copied nor joined); Unservable when the fragments do not say
    where `count` frames are (a video stream, a missing offset table)."""
    table = _table(ds, data, count)
    views = _views(table, data, numbers)
    if views is None:
        if transfer_syntax == ENCAPSULATED_UNCOMPRESSED:
            raise Unservable(f"the fragments are not {count} frames of one fragment each")
        # pydicom's generator wants bytes: a copy of a view (this path is rare: several
        # fragments a frame, or no offset table and not one fragment a frame)
        return _by_pydicom(bytes(_pixel_bytes(ds)), count, numbers)
    if transfer_syntax != ENCAPSULATED_UNCOMPRESSED:
        return [bytes(view) for view in views]
    size = _frame_size(ds, 1)  # each fragment a frame, so 1-bit frames end on a byte
    if table is None or table.uniform != size + size % 2:  # every fragment, not just these
        raise Unservable(f"a fragment is not one frame of {size} bytes")
    return [bytes(view[:size]) for view in views]


def _by_pydicom(data: bytes, count: int, numbers: list[int]) -> list[bytes]:
    """Frames of fragments grouped otherwise (an offset table of several fragments a
    frame, or none): pydicom's frame generator, keeping only the frames asked for."""
    wanted = set(numbers)
    kept: dict[int, bytes] = {}
    found = 0
    try:
        for found, frame in enumerate(generate_frames(data, number_of_frames=count), 1):
            if found in wanted:
                kept[found] = frame
    except Exception as exc:  # pydicom raises ValueError, struct.error, ...
        raise Unservable(f"the fragments do not divide into {count} frames: {exc}") from None
    if found != count:
        raise Unservable(f"the fragments hold {found} frames, not {count}")
    return [kept[n] for n in numbers]


def get_frames(ds: Dataset, transfer_syntax: str, numbers: list[int]) -> list[bytes]:
    """The frames `numbers` of the dataset's Pixel Data, in that order, in
    `frame_syntax(transfer_syntax)`; only those frames are copied out of the value."""
    data = _pixel_value(ds)
    count = _frame_count(ds)
    for n in numbers:
        if n > count:
            raise FrameError(f"frame {n} is past the last frame ({count})")
    if is_encapsulated(transfer_syntax):
        return _wanted(ds, data, transfer_syntax, count, numbers)
    size = _frame_size(ds, count)
    if size <= 0 or len(data) < size * count:
        raise FrameError("the pixel data is shorter than its frames")
    if transfer_syntax == BIG_ENDIAN:
        return [_big_endian_frame(ds, data, (n - 1) * size, size) for n in numbers]
    return [bytes(data[(n - 1) * size : n * size]) for n in numbers]


def native_pixels(ds: Dataset, transfer_syntax: str) -> Octets:
    """The whole Pixel Data of an `uncompressed` syntax as a native Explicit VR LE value
    (for bulk data), made in at most one copy; Unservable when frames would not join
    into one."""
    if transfer_syntax in _NATIVE_LE:
        return _pixel_bytes(ds)
    data = _pixel_value(ds)
    count = _frame_count(ds)
    if transfer_syntax == BIG_ENDIAN:
        return _from_big_endian(ds, data)
    try:
        _frame_size(ds, count)  # frames that would not join into one native value
    except FrameError as exc:
        raise Unservable(str(exc)) from None
    table = _table(ds, data, count)
    views = _views(table, data, list(range(1, count + 1)))
    if table is None or views is None:
        raise Unservable(f"the fragments are not {count} frames of one fragment each")
    size = _frame_size(ds, 1)
    if table.uniform != size + size % 2:
        raise Unservable(f"a fragment is not one frame of {size} bytes")
    return b"".join(f[:size] for f in views)


def little_endian(ds: Dataset, tag: int, value: Octets, transfer_syntax: str) -> Octets:
    """A bulk value other than Pixel Data as PS3.18 8.7.3.3.1 serves uncompressed bulk
    data: little endian (its VR says the size of the numbers to swap)."""
    if transfer_syntax != BIG_ENDIAN:
        return value
    word = _WORD.get(ds[tag].VR, 1)
    if word == 1:
        return value
    if len(value) % word:
        raise Unservable(f"a {ds[tag].VR} value of {len(value)} bytes")
    return np.frombuffer(value, dtype=f">u{word}").astype(f"<u{word}").tobytes()
