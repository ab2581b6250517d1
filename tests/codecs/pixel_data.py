"""Datasets with native pixel data of any format, encoded by pydicom (tests of relay.codecs)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from relay.codecs import PixelFormat
from relay.dicom.rawds import encode_dataset

EXPLICIT = str(ExplicitVRLittleEndian)
IMPLICIT = str(ImplicitVRLittleEndian)


@dataclass(frozen=True)
class Image:
    """What a dataset's pixel data says: the format and BitsStored."""

    fmt: PixelFormat
    stored: int
    photometric: str = ""


def pixel_values(image: Image, seed: int) -> bytes:
    """Samples within BitsStored: a smooth ramp (what codecs like) plus noise (what they hate)."""
    fmt, rng = image.fmt, np.random.default_rng(seed)
    shape = (fmt.frames, fmt.rows, fmt.columns, fmt.samples)
    lo, hi = (-(1 << (image.stored - 1)), (1 << (image.stored - 1)) - 1) if fmt.signed else (
        0, (1 << image.stored) - 1)  # fmt: skip
    ramp = np.linspace(lo, hi, num=int(np.prod(shape))).reshape(shape)
    noise = rng.integers(-(hi - lo) // 8, (hi - lo) // 8 + 1, size=shape)
    values = np.clip(ramp + noise, lo, hi).astype(np.int64)
    if fmt.samples == 3 and fmt.planar:
        values = values.transpose(0, 3, 1, 2)  # frames of RR..GG..BB..
    kind = ("<i2" if fmt.signed else "<u2") if fmt.bits == 16 else ("i1" if fmt.signed else "u1")
    return values.astype(kind).tobytes()


def dataset_bytes(image: Image, pixels: bytes, ts: str = EXPLICIT, *, extra: bool = True) -> bytes:
    """A secondary-capture-like dataset around `pixels` (pydicom pads an odd value)."""
    fmt = image.fmt
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.PatientName = "Test^Pixels"
    if extra:  # a sequence before the image tags: the scanner must step over it
        item = Dataset()
        item.CodeValue = "T-D1100"
        ds.AnatomicRegionSequence = [item]
    ds.SamplesPerPixel = fmt.samples
    ds.PhotometricInterpretation = image.photometric or (
        "RGB" if fmt.samples == 3 else "MONOCHROME2")  # fmt: skip
    if fmt.samples == 3:
        ds.PlanarConfiguration = fmt.planar
    if fmt.frames > 1:
        ds.NumberOfFrames = fmt.frames
    ds.Rows = fmt.rows
    ds.Columns = fmt.columns
    ds.BitsAllocated = fmt.bits
    ds.BitsStored = image.stored
    ds.HighBit = image.stored - 1
    ds.PixelRepresentation = int(fmt.signed)
    ds.PixelData = pixels
    ds["PixelData"].VR = "OW" if fmt.bits == 16 else "OB"
    ds.add_new(0x7FE10010, "OB", b"trailing private data after the pixels")
    return encode_dataset(ds, ts)
