"""DICOM Part 10 files (sans-I/O): wrap the PACS's dataset bytes, and unwrap an upload.

WADO-RS sends application/dicom, which is a Part 10 file: a 128-byte preamble, `DICM`,
the File Meta Information (group 0002, explicit VR little endian), then the dataset. The
dataset bytes are the PACS's, untouched; only the meta group is ours. STOW-RS receives
such files: `split()` finds the meta group's end without decoding the dataset.
"""

from __future__ import annotations

import struct
from typing import Final

__all__ = ["Part10Error", "split", "wrap"]

# DMZ Relay's implementation UID (a UUID-derived 2.25 UID).
IMPLEMENTATION_CLASS_UID: Final = "2.25.198230922603483480284594485289728044084"
IMPLEMENTATION_VERSION: Final = "DMZRELAY_01"
_LONG_VRS: Final = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC",
                              b"UN", b"UR", b"UT", b"UV"})  # fmt: skip
MAX_META: Final = 64 * 1024


class Part10Error(ValueError):
    """Not a Part 10 file we can read."""


def _element(group_elem: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr in (b"UI", b"OB") else b" "
    tag = struct.pack("<HH", group_elem >> 16, group_elem & 0xFFFF)
    if vr in _LONG_VRS:
        return tag + vr + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return tag + vr + struct.pack("<H", len(value)) + value


def wrap(sop_class: str, sop_instance: str, transfer_syntax: str, dataset: bytes) -> bytes:
    """A Part 10 file around `dataset` (bytes in `transfer_syntax`)."""
    body = b"".join(
        (
            _element(0x00020001, b"OB", b"\x00\x01"),
            _element(0x00020002, b"UI", sop_class.encode("ascii")),
            _element(0x00020003, b"UI", sop_instance.encode("ascii")),
            _element(0x00020010, b"UI", transfer_syntax.encode("ascii")),
            _element(0x00020012, b"UI", IMPLEMENTATION_CLASS_UID.encode("ascii")),
            _element(0x00020013, b"SH", IMPLEMENTATION_VERSION.encode("ascii")),
        )
    )
    group_length = _element(0x00020000, b"UL", struct.pack("<I", len(body)))
    return b"\x00" * 128 + b"DICM" + group_length + body + dataset


def split(data: bytes) -> tuple[dict[int, str], int]:
    """The meta group's text values by tag, and the offset where the dataset starts."""
    if len(data) < 132 or data[128:132] != b"DICM":
        raise Part10Error("no DICM prefix: not a DICOM Part 10 file")
    pos = 132
    meta: dict[int, str] = {}
    while pos + 8 <= len(data):
        group, elem = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > len(data):
                raise Part10Error("truncated file meta information")
            (length,) = struct.unpack_from("<I", data, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            start = pos + 8
        end = start + length
        if end > len(data) or end - 132 > MAX_META:
            raise Part10Error("file meta information longer than the file or the limit")
        if vr in (b"UI", b"SH", b"AE"):
            meta[(group << 16) | elem] = data[start:end].decode("ascii", "replace").rstrip("\x00 ")
        pos = end
    for tag, name in ((0x00020010, "Transfer Syntax UID"), (0x00020002, "SOP Class UID"),
                      (0x00020003, "SOP Instance UID")):  # fmt: skip
        if not meta.get(tag):
            raise Part10Error(f"the file meta information has no {name}")
    return meta, pos
