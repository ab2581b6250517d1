"""An instance's dataset whose Pixel Data value is a view of the bytes held (sans-I/O).

pydicom reads each value as a copy of the bytes it is read from: every frames, rendered,
bulk or metadata request copied the whole Pixel Data of its instance, so a 500 MB
multi-frame instance cost 500 MB more per request under way for one frame of it (OHIF
asks for a multi-frame instance's frames several at once). Here pydicom reads the
elements before Pixel Data and those after it; Pixel Data itself becomes a memoryview of
the held bytes, found by reading its element header (its value up to the sequence
delimiter when of undefined length, as pydicom reads it). A deflated dataset is
inflated first (a copy, as before). Whatever this walk does not recognise is read by
pydicom whole, as before.
"""

from __future__ import annotations

import struct
from io import BytesIO
from typing import Final

from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag

from relay.dicom import rawds

__all__ = ["read"]

PIXEL_DATA: Final = 0x7FE00010
_UNDEFINED: Final = 0xFFFFFFFF
_ITEM: Final = 0xFFFEE000
_SEQUENCE_END: Final = 0xFFFEE0DD
# Explicit VRs whose length is 4 bytes after 2 reserved ones (PS3.5 7.1.2)
_LONG: Final = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT"})


def _at_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
    return int(tag) == PIXEL_DATA


def read(data: bytes, transfer_syntax: str) -> Dataset:
    """The dataset of `data` in `transfer_syntax`, its Pixel Data a view of `data`."""
    implicit, little, deflated = rawds.ts_encoding(transfer_syntax)
    if deflated:
        data = rawds.inflate(data, rawds.DEFAULT_MAX_INFLATED)
    fp = BytesIO(data)
    ds = read_dataset(fp, implicit, little, stop_when=_at_pixel_data)
    # The VR encoding pydicom found, not the one the syntax names: it reads a dataset
    # of explicit VRs sent as implicit (or the reverse) by the VRs it finds, and the
    # header read with the other gave the length of another value (wrong pixels served).
    as_read = ds.original_encoding[0]
    if as_read is not None:
        implicit = as_read
    start = fp.tell()
    if start >= len(data):
        return ds  # no Pixel Data
    found = _element(memoryview(data), start, implicit, little)
    if found is None:
        return read_dataset(BytesIO(data), implicit, little)
    vr, value, end, undefined = found
    if vr is None:  # implicit VR: as pydicom resolves Pixel Data's "OB or OW"
        vr = "OW" if int(ds.get("BitsAllocated", 16) or 16) > 8 else "OB"
    fp.seek(end)
    after = read_dataset(fp, implicit, little)
    ds.add(DataElement(PIXEL_DATA, vr, value, is_undefined_length=undefined,
                       validation_mode=config.IGNORE))  # fmt: skip
    ds.update(after)
    return ds


def _element(
    data: memoryview, start: int, implicit: bool, little: bool
) -> tuple[str | None, memoryview, int, bool] | None:
    """(VR or None when implicit, the value as a view, where the element ends, whether
    its length is undefined) of the element at `start`, which must be Pixel Data; None
    when it does not read as one."""
    order = "<" if little else ">"
    if start + 8 > len(data):
        return None
    group, element = struct.unpack_from(f"{order}HH", data, start)
    if (group << 16 | element) != PIXEL_DATA:
        return None
    vr: str | None = None
    if implicit:
        (length,) = struct.unpack_from(f"{order}L", data, start + 4)
        at = start + 8
    else:
        vr = bytes(data[start + 4 : start + 6]).decode("ascii", "replace")
        if vr not in _LONG or start + 12 > len(data):
            return None
        (length,) = struct.unpack_from(f"{order}L", data, start + 8)
        at = start + 12
    if length != _UNDEFINED:
        end = at + length
        return (vr, data[at:end], end, False) if end <= len(data) else None
    pos = at  # fragments: items up to the sequence delimiter
    while pos + 8 <= len(data):
        g, e, item_length = struct.unpack_from(f"{order}HHL", data, pos)
        if (g << 16 | e) == _SEQUENCE_END:
            return vr, data[at:pos], pos + 8, True
        if (g << 16 | e) != _ITEM or item_length == _UNDEFINED:
            return None
        pos += 8 + item_length
    return None
