"""Instances without their pixels, for a viewer that needs a series' metadata first.

A web viewer (OHIF) shows nothing before it has the WADO-RS metadata of the whole series;
through the relay that used to mean the whole series crossing the link. A retrieve stream
opened with `dicom-content: headers` (relay.wire) gets each instance with the value of
its top-level Pixel Data (7FE0,0010) emptied: every other byte is the PACS's (the element
header stays, with length 0, so the Pixel Data's VR and presence survive; elements after
it are kept). Pixel Data inside a sequence item (an icon image) is not touched.

`strip_pixel_data` is the agent's side, `pixel_data_length` the workstation's check that
the agent honoured the request (an older agent ignores the header and sends full
instances). Sans-I/O; reuses rawds's element walker, never pydicom.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, replace
from typing import Final

from relay.dicom.codec import Instance
from relay.dicom.rawds import _LONG_VRS, MalformedDataset, _Walker, inflate, ts_encoding

__all__ = ["PixelSpan", "find_pixel_data", "pixel_data_length", "strip_instance",
           "strip_pixel_data"]  # fmt: skip

PIXEL_DATA: Final = 0x7FE00010
_UNDEFINED: Final = 0xFFFFFFFF
MAX_INFLATED: Final = 1 << 30  # a deflated dataset is inflated at most this far


@dataclass(frozen=True)
class PixelSpan:
    """Where the top-level Pixel Data element lies: [start, end) with its header
    [start, value) and the length field at `length_at` (`length_size` bytes)."""

    start: int
    value: int
    end: int
    length_at: int
    length_size: int
    undefined: bool

    @property
    def value_length(self) -> int:
        return self.end - self.value


def find_pixel_data(data: bytes, implicit: bool, little: bool) -> PixelSpan | None:
    """The top-level Pixel Data of an (inflated) dataset, or None; MalformedDataset if the
    elements before it (or its own length) do not fit."""
    walker = _Walker(data, implicit, little, {})
    end = len(data)
    pos = 0
    while pos < end:
        if end - pos < 8:
            raise MalformedDataset(f"{end - pos} stray bytes at offset {pos}")
        start = pos
        tag = walker.tag(pos)
        vr: bytes | None = None
        if implicit:
            length_at, size = pos + 4, 4
            pos += 8
        else:
            vr = data[pos + 4 : pos + 6]
            if vr in _LONG_VRS:
                if end - pos < 12:
                    raise MalformedDataset(f"truncated element header at {pos}")
                length_at, size = pos + 8, 4
                pos += 12
            else:
                length_at, size = pos + 6, 2
                pos += 8
        length = walker.u32(data, length_at)[0] if size == 4 else walker.u16(data, length_at)[0]
        undefined = size == 4 and length == _UNDEFINED
        if undefined:
            fragments = tag == PIXEL_DATA or vr in (b"OB", b"OW")
            inner = _Walker(data, True, True, {}) if vr == b"UN" else walker
            after = inner.items(pos, end, 0, fragments, until_delimiter=True)
        else:
            after = pos + length
            if after > end:
                raise MalformedDataset(f"element of {length} bytes runs past the end at {pos}")
        if tag == PIXEL_DATA:
            return PixelSpan(start, pos, after, length_at, size, undefined)
        if tag > PIXEL_DATA:
            return None  # elements are in ascending order: there is none
        pos = after
    return None


def strip_pixel_data(data: bytes, transfer_syntax: str) -> bytes:
    """The dataset with its top-level Pixel Data value emptied (length 0); unchanged when
    there is none. A deflated dataset is inflated, stripped and deflated again."""
    implicit, little, deflated = ts_encoding(transfer_syntax)
    raw = inflate(data, MAX_INFLATED) if deflated else data
    span = find_pixel_data(raw, implicit, little)
    if span is None:
        return data
    fmt = ("<" if little else ">") + ("I" if span.length_size == 4 else "H")
    head = raw[span.start : span.length_at] + struct.pack(fmt, 0)
    out = raw[: span.start] + head + raw[span.end :]
    if not deflated:
        return out
    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(out) + packer.flush()


def strip_instance(msg: Instance) -> Instance:
    """`msg` with its pixels left out; a dataset that cannot be walked goes unchanged (the
    workstation then sees pixels and does without the headers-only answer)."""
    try:
        stripped = strip_pixel_data(msg.dataset, msg.transfer_syntax)
    except (MalformedDataset, zlib.error, struct.error, IndexError):
        return msg
    return replace(msg, dataset=stripped)


def pixel_data_length(data: bytes, transfer_syntax: str) -> int:
    """Bytes of top-level Pixel Data value in a dataset (0: none or emptied); -1 for an
    undefined length (encapsulated fragments: an unstripped instance)."""
    implicit, little, deflated = ts_encoding(transfer_syntax)
    raw = inflate(data, MAX_INFLATED) if deflated else data
    span = find_pixel_data(raw, implicit, little)
    if span is None:
        return 0
    return -1 if span.undefined else span.value_length
