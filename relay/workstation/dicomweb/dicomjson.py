"""Datasets as application/dicom+json (PS3.18 annex F), with BulkDataURI for large values.

Top-level binary values larger than `BULK_THRESHOLD` (and Pixel Data always) are not
inlined: they get a BulkDataURI under the instance's URL (`.../bulk/GGGGEEEE`), which
`bulk_value()` serves. Binary values inside sequences are small in practice and stay
inline (InlineBinary), so a bulk URI never needs a sequence path.
"""

from __future__ import annotations

from typing import Any, Final

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

__all__ = ["BULK_THRESHOLD", "BULK_VRS", "bulk_value", "to_json", "to_json_list"]

BULK_THRESHOLD: Final = 1024  # bytes: a larger binary value becomes a BulkDataURI
BULK_VRS: Final = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
PIXEL_DATA: Final = 0x7FE00010
# Query/retrieve plumbing that is no attribute of the object itself.
_DROP: Final = frozenset({0x00080052, 0x00080054, 0x00080056})  # level, AE title, availability


def _is_bulk(elem: DataElement) -> bool:
    if elem.tag == PIXEL_DATA:
        return True
    if elem.VR not in BULK_VRS or elem.value is None:
        return False
    try:
        return len(elem.value) > BULK_THRESHOLD
    except TypeError:
        return False


def to_json(ds: Dataset, bulk_base: str | None = None) -> dict[str, Any]:
    """One dataset as a DICOM JSON object; `bulk_base` (an instance URL) turns large
    binary values into BulkDataURIs, None inlines them (QIDO answers hold none)."""
    out: dict[str, Any] = {}
    for elem in ds:
        tag = int(elem.tag)
        if tag in _DROP:
            continue
        key = f"{tag:08X}"
        if bulk_base is not None and _is_bulk(elem):
            out[key] = {"vr": elem.VR, "BulkDataURI": f"{bulk_base}/bulk/{key}"}
            continue
        try:
            out[key] = elem.to_json_dict(bulk_data_element_handler=None,
                                         bulk_data_threshold=1 << 30)  # fmt: skip
        except (ValueError, TypeError):  # a value pydicom cannot show: leave it out
            continue
    return out


def to_json_list(datasets: list[Dataset]) -> list[dict[str, Any]]:
    return [to_json(ds) for ds in datasets]


def bulk_value(ds: Dataset, tag: int) -> bytes | memoryview | None:
    """The raw bytes behind a BulkDataURI (a top-level binary value), or None; Pixel
    Data read by pixelview is a view of the instance's bytes."""
    elem = ds.get(tag)
    if elem is None or not isinstance(elem, DataElement):
        return None
    value = elem.value
    if isinstance(value, memoryview):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    return None
