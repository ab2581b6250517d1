"""Synthetic but realistic DICOM studies for the demo, the tests and the benchmarks.

CT slices are 512x512, 12 bits stored in 16, drawn from an anatomical phantom (body outline,
lungs, spine, aorta, a lesion) that changes along the table, with Gaussian noise and a
circular field of view, so zstd has the kind of work real CT gives it (about 2:1, not 100:1).
MR slices are 256x256 brain-like images with Rician noise. Tags are the ones real modalities
write, UIDs are deterministic for a given seed. Generation is vectorised with numpy and reuses
a noise bank, so a 2,000-slice study takes seconds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian

from relay.dicom.rawds import encode_dataset

CT_IMAGE_STORAGE: Final = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE: Final = "1.2.840.10008.5.1.4.1.1.4"
UID_ROOT: Final = "1.2.826.0.1.3680043.10.1341"  # the relay's sample-data root
IMPLEMENTATION_UID: Final = UID_ROOT + ".0.1"


def derive_uid(*parts: object) -> str:
    """A deterministic UID under the sample root (at most 64 characters)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    number = int.from_bytes(digest[:16], "big")
    return f"{UID_ROOT}.{number}"[:64].rstrip(".")


@dataclass(frozen=True)
class EncodedInstance:
    """One instance as a PACS holds it: dataset bytes (no file meta) and their syntax."""

    sop_class: str
    sop_instance: str
    transfer_syntax: str
    data: bytes

    def file_bytes(self) -> bytes:
        """The instance as a DICOM Part 10 file (preamble, file meta, dataset)."""
        return part10(self.sop_class, self.sop_instance, self.transfer_syntax, self.data)


def part10(sop_class: str, sop_instance: str, transfer_syntax: str, data: bytes) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_UID)
    meta.ImplementationVersionName = "DMZRELAY"
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    return bytes(fp.getvalue()) + data


def encode_instance(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> EncodedInstance:
    return EncodedInstance(
        sop_class=str(ds.SOPClassUID),
        sop_instance=str(ds.SOPInstanceUID),
        transfer_syntax=str(transfer_syntax),
        data=encode_dataset(ds, transfer_syntax),
    )


@dataclass(frozen=True)
class StudySpec:
    """Patient and study level attributes shared by every instance of a study."""

    patient_name: str = "DOE^JANE"
    patient_id: str = "RELAY0001"
    birth_date: str = "19640312"
    sex: str = "F"
    study_uid: str = ""
    accession: str = "ACC0001"
    study_id: str = "1"
    study_date: str = "20240115"
    study_time: str = "101500"
    description: str = "CT CHEST ABDOMEN PELVIS W CONTRAST"
    referring: str = "SMITH^JOHN^^DR"
    institution: str = "DMZ RELAY GENERAL HOSPITAL"

    def with_uid(self, seed: object) -> StudySpec:
        if self.study_uid:
            return self
        return StudySpec(**{**self.__dict__, "study_uid": derive_uid("study", seed)})


# -- pixel data -----------------------------------------------------------------------


@lru_cache(maxsize=4)
def _grid(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    return (x - cols / 2) / (cols / 2), (y - rows / 2) / (rows / 2)


@lru_cache(maxsize=4)
def _noise_bank(size: int, seed: int) -> np.ndarray:
    """Standard normal noise, reused by sliding windows so each slice costs a slice copy."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal(size + 65_537).astype(np.float32)


def _noise(n: int, index: int, seed: int) -> np.ndarray:
    bank = _noise_bank(n, seed)
    offset = (index * 7919) % 65_537
    return bank[offset : offset + n]


def _ellipse(  # noqa: PLR0917
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float
) -> np.ndarray:
    inside: np.ndarray = ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1.0
    return inside


@lru_cache(maxsize=64)
def _ct_phantom(z_step: int, rows: int, cols: int) -> np.ndarray:
    """Hounsfield units of an axial slice at table position z_step/63 (0 = neck, 1 = pelvis)."""
    z = z_step / 63
    x, y = _grid(rows, cols)
    hu = np.full((rows, cols), -1000.0, dtype=np.float32)
    body_a, body_b = 0.78 + 0.08 * np.sin(z * np.pi), 0.55 + 0.05 * np.sin(z * np.pi)
    body = _ellipse(x, y, 0, 0.05, body_a, body_b)
    hu[body] = -90.0  # subcutaneous fat
    muscle = _ellipse(x, y, 0, 0.05, body_a - 0.06, body_b - 0.06)
    hu[muscle] = 45.0
    lung_size = max(0.0, 1.0 - 1.6 * z)  # lungs shrink towards the abdomen
    if lung_size > 0.05:
        for side in (-1, 1):
            lung = _ellipse(x, y, side * 0.33, -0.02, 0.27 * lung_size + 0.02, 0.36 * lung_size)
            hu[lung] = -850.0
            vessels = lung & (np.sin(x * 40 + side) * np.cos(y * 37) > 0.93)
            hu[vessels] = -200.0
    else:
        liver = _ellipse(x, y, -0.28, -0.05, 0.3, 0.28 * min(1.0, 2 * (z - 0.3) + 0.4))
        hu[liver & muscle] = 60.0
        kidney_l = _ellipse(x, y, -0.3, 0.25, 0.1, 0.13)
        kidney_r = _ellipse(x, y, 0.3, 0.25, 0.1, 0.13)
        hu[(kidney_l | kidney_r) & muscle] = 150.0
    spine = _ellipse(x, y, 0, 0.38, 0.09, 0.08)
    hu[spine] = 700.0
    hu[_ellipse(x, y, 0, 0.38, 0.05, 0.045)] = 250.0  # cancellous bone
    hu[_ellipse(x, y, 0.08, 0.22, 0.045, 0.045)] = 220.0  # aorta with contrast
    if 0.45 < z < 0.55:
        hu[_ellipse(x, y, -0.2, -0.1, 0.04, 0.035)] = 20.0  # hypodense lesion
    table = (y > 0.72) & (y < 0.76) & (np.abs(x) < 0.7)
    hu[table] = 300.0
    return hu


def ct_pixels(index: int, count: int, rows: int = 512, cols: int = 512, seed: int = 0) -> bytes:
    """Stored values (HU + 1024) of slice `index` of `count`, as little endian uint16."""
    z_step = round(63 * index / max(1, count - 1))
    hu = _ct_phantom(z_step, rows, cols)
    noise = _noise(rows * cols, index, seed).reshape(rows, cols)
    x, y = _grid(rows, cols)
    fov = x * x + y * y <= 1.0
    stored = np.where(fov, hu + 12.0 * noise + 1024.0, 0.0)
    return np.clip(stored, 0, 4095).astype("<u2").tobytes()


@lru_cache(maxsize=32)
def _mr_phantom(z_step: int, rows: int, cols: int) -> np.ndarray:
    z = z_step / 31
    x, y = _grid(rows, cols)
    s = np.zeros((rows, cols), dtype=np.float32)
    scale = 0.75 + 0.2 * np.sin(z * np.pi)
    head = _ellipse(x, y, 0, 0, 0.72 * scale, 0.88 * scale)
    s[head] = 350.0  # scalp
    s[_ellipse(x, y, 0, 0, 0.66 * scale, 0.82 * scale)] = 60.0  # skull
    brain = _ellipse(x, y, 0, 0, 0.62 * scale, 0.78 * scale)
    s[brain] = 520.0  # grey matter
    white = _ellipse(x, y, 0, 0, 0.5 * scale, 0.66 * scale) & (
        np.sin(x * 13 + z) * np.sin(y * 11) > -0.6
    )
    s[white] = 780.0
    for side in (-1, 1):
        s[_ellipse(x, y, side * 0.1 * scale, -0.05, 0.06 * scale, 0.22 * scale)] = 180.0
    return s


def mr_pixels(index: int, count: int, rows: int = 256, cols: int = 256, seed: int = 1) -> bytes:
    z_step = round(31 * index / max(1, count - 1))
    s = _mr_phantom(z_step, rows, cols)
    n = rows * cols
    re = s + 18.0 * _noise(n, index, seed).reshape(rows, cols)
    im = 18.0 * _noise(n, index + 101, seed).reshape(rows, cols)
    magnitude = np.sqrt(re * re + im * im)  # Rician, as magnitude MR is
    return np.clip(magnitude, 0, 4095).astype("<u2").tobytes()


# -- datasets -------------------------------------------------------------------------


def _base(study: StudySpec, modality: str, series_uid: str, series_number: int) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study.study_date
    ds.StudyTime = study.study_time
    ds.SeriesTime = study.study_time
    ds.AccessionNumber = study.accession
    ds.Modality = modality
    ds.Manufacturer = "DMZ Relay Samples"
    ds.InstitutionName = study.institution
    ds.ReferringPhysicianName = study.referring
    ds.StudyDescription = study.description
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.birth_date
    ds.PatientSex = study.sex
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = study.study_id
    ds.SeriesNumber = series_number
    ds.FrameOfReferenceUID = derive_uid("for", study.study_uid)
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    code = Dataset()
    code.CodeValue = "CTCAP" if modality == "CT" else "MRBRAIN"
    code.CodingSchemeDesignator = "99RELAY"
    code.CodeMeaning = study.description
    ds.ProcedureCodeSequence = DicomSequence([code])
    return ds


def ct_dataset(
    study: StudySpec,
    index: int,
    count: int,
    *,
    series_uid: str,
    series_number: int = 2,
    rows: int = 512,
    cols: int = 512,
    seed: int = 0,
    pixels: bool = True,
) -> Dataset:
    """CT slice `index` of `count`; without pixel data when `pixels` is False (headers)."""
    ds = _base(study, "CT", series_uid, series_number)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = derive_uid("ct", series_uid, index)
    ds.SeriesDescription = "AXIAL 1.25MM SOFT TISSUE"
    ds.ContentTime = f"{101500 + index % 60:06d}"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = "1.25"
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = "380"
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "160"
    ds.ExposureTime = "500"
    ds.XRayTubeCurrent = "250"
    ds.ConvolutionKernel = "STANDARD"
    ds.PatientPosition = "FFS"
    ds.InstanceNumber = index + 1
    z = -100.0 - 1.25 * index
    ds.ImagePositionPatient = ["-190", "-190", f"{z:.2f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SliceLocation = f"{z:.2f}"
    ds.Rows, ds.Columns = rows, cols
    ds.PixelSpacing = ["0.742188", "0.742188"]
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
    if pixels:
        ds.PixelData = ct_pixels(index, count, rows, cols, seed)
    return ds


def mr_dataset(
    study: StudySpec,
    index: int,
    count: int,
    *,
    series_uid: str,
    series_number: int = 3,
    rows: int = 256,
    cols: int = 256,
    seed: int = 1,
) -> Dataset:
    ds = _base(study, "MR", series_uid, series_number)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.SOPInstanceUID = derive_uid("mr", series_uid, index)
    ds.SeriesDescription = "AX T1 SE"
    ds.ContentTime = f"{111500 + index % 60:06d}"
    ds.BodyPartExamined = "HEAD"
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.SliceThickness = "5"
    ds.RepetitionTime = "500"
    ds.EchoTime = "12"
    ds.NumberOfAverages = "1"
    ds.ImagingFrequency = "63.86"
    ds.MagneticFieldStrength = "1.5"
    ds.SpacingBetweenSlices = "6"
    ds.EchoTrainLength = "1"
    ds.FlipAngle = "90"
    ds.PatientPosition = "HFS"
    ds.InstanceNumber = index + 1
    z = 20.0 + 6 * index
    ds.ImagePositionPatient = ["-120", "-120", f"{z:.1f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SliceLocation = f"{z:.1f}"
    ds.Rows, ds.Columns = rows, cols
    ds.PixelSpacing = ["0.9375", "0.9375"]
    ds.WindowCenter, ds.WindowWidth = "500", "1000"
    ds.PixelData = mr_pixels(index, count, rows, cols, seed)
    return ds


def ct_series(
    study: StudySpec,
    count: int,
    *,
    series_number: int = 2,
    rows: int = 512,
    cols: int = 512,
    seed: int = 0,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> Iterator[EncodedInstance]:
    series_uid = derive_uid("series", study.study_uid, series_number)
    for i in range(count):
        ds = ct_dataset(
            study, i, count, series_uid=series_uid, series_number=series_number,
            rows=rows, cols=cols, seed=seed,
        )  # fmt: skip
        yield encode_instance(ds, transfer_syntax)


def mr_series(
    study: StudySpec,
    count: int,
    *,
    series_number: int = 3,
    rows: int = 256,
    cols: int = 256,
    seed: int = 1,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> Iterator[EncodedInstance]:
    series_uid = derive_uid("series", study.study_uid, series_number)
    for i in range(count):
        ds = mr_dataset(
            study, i, count, series_uid=series_uid, series_number=series_number,
            rows=rows, cols=cols, seed=seed,
        )  # fmt: skip
        yield encode_instance(ds, transfer_syntax)


CT_STUDY: Final = StudySpec()
MR_STUDY: Final = StudySpec(
    patient_name="ROE^RICHARD",
    patient_id="RELAY0002",
    birth_date="19581103",
    sex="M",
    accession="ACC0002",
    study_id="7",
    study_date="20240212",
    study_time="083000",
    description="MRI BRAIN WO CONTRAST",
    referring="JONES^MARY^^DR",
)


def make_study(
    count: int,
    *,
    modality: str = "CT",
    spec: StudySpec | None = None,
    seed: int = 0,
    rows: int | None = None,
    cols: int | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> list[EncodedInstance]:
    """One study of `count` instances in one series (CT 512x512 or MR 256x256)."""
    if modality == "CT":
        base = (spec or CT_STUDY).with_uid(("CT", seed, count))
        return list(
            ct_series(base, count, rows=rows or 512, cols=cols or 512, seed=seed,
                      transfer_syntax=transfer_syntax)
        )  # fmt: skip
    if modality == "MR":
        base = (spec or MR_STUDY).with_uid(("MR", seed, count))
        return list(
            mr_series(base, count, rows=rows or 256, cols=cols or 256, seed=seed,
                      transfer_syntax=transfer_syntax)
        )  # fmt: skip
    raise ValueError(f"unknown modality {modality!r}")


def demo_studies(ct_slices: int = 40, mr_slices: int = 24) -> list[EncodedInstance]:
    """What `relay demo` loads: a CT study and an MR study of two patients."""
    return make_study(ct_slices, modality="CT") + make_study(mr_slices, modality="MR")


class SyntheticStudy:
    """A CT study generated on demand, for studies too large to hold (memory tests).

    `header(i)` is the instance without pixel data (cheap, for indexing and C-FIND);
    `instance(i)` encodes it in full, the same bytes every time.
    """

    def __init__(
        self, count: int, *, rows: int = 512, cols: int = 512, seed: int = 7,
        spec: StudySpec | None = None,
    ) -> None:  # fmt: skip
        self.count = count
        self.rows, self.cols, self.seed = rows, cols, seed
        self.spec = (spec or StudySpec(patient_id="RELAYBIG", accession="ACCBIG")).with_uid(
            ("big", seed, count, rows, cols)
        )
        self.series_uid = derive_uid("series", self.spec.study_uid, 2)

    @classmethod
    def of_size(
        cls, total_bytes: int, *, rows: int = 512, cols: int = 512, seed: int = 7
    ) -> SyntheticStudy:
        """Enough slices for at least `total_bytes` of dataset bytes."""
        per = rows * cols * 2 + 2048
        return cls(max(1, -(-total_bytes // per)), rows=rows, cols=cols, seed=seed)

    def dataset(self, index: int, *, pixels: bool = True) -> Dataset:
        return ct_dataset(
            self.spec, index, self.count, series_uid=self.series_uid,
            rows=self.rows, cols=self.cols, seed=self.seed, pixels=pixels,
        )  # fmt: skip

    def instance(self, index: int) -> EncodedInstance:
        return encode_instance(self.dataset(index))

    def header(self, index: int) -> Dataset:
        """Instance `index` without its pixel data: for indexes and C-FIND."""
        return self.dataset(index, pixels=False)


def instances_by_uid(instances: Sequence[EncodedInstance]) -> dict[str, EncodedInstance]:
    return {inst.sop_instance: inst for inst in instances}
