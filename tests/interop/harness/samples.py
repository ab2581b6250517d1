"""Small, valid DICOM instances made on the fly, to fill a PACS in tests.

pydicom is imported inside the functions: the harness is loaded by every test
session, and nothing outside these helpers should pay for (or see) pydicom.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from dataclasses import dataclass
from pathlib import Path

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"


@dataclass(frozen=True)
class SampleSeries:
    """What ``write_ct_series`` wrote: one series of one study of one patient."""

    paths: tuple[Path, ...]
    sop_instance_uids: tuple[str, ...]
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    patient_name: str


def _pixels(rows: int, columns: int, seed: int) -> bytes:
    """Deterministic 12-bit pattern in 16-bit little-endian words, different per ``seed``."""
    words = array("H", ((r * 31 + c * 17 + seed * 101) & 0x0FFF for r in range(rows)
                        for c in range(columns)))  # fmt: skip
    if sys.byteorder != "little":
        words.byteswap()
    return words.tobytes()


def write_ct_series(
    out_dir: Path,
    count: int,
    *,
    patient_name: str = "Test^Patient",
    patient_id: str = "DMZR0001",
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    rows: int = 64,
    columns: int = 64,
) -> SampleSeries:
    """Write ``count`` CT Image Storage instances (16-bit, explicit VR little endian).

    Each has a fresh SOP Instance UID and its own pixel pattern; study and series UIDs
    are generated unless given. Files are ``out_dir/CT<n>.dcm`` (``out_dir`` is created).
    """
    # Imported here, not at the top: see the module docstring.
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, generate_uid

    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_instance_uid or generate_uid()
    series_uid = series_instance_uid or generate_uid()
    frame_uid = generate_uid()
    paths: list[Path] = []
    sop_uids: list[str] = []
    for index in range(count):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(CT_IMAGE_STORAGE)
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = UID(EXPLICIT_VR_LITTLE_ENDIAN)

        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = "20240101"
        ds.StudyTime = "120000"
        ds.StudyID = "1"
        ds.AccessionNumber = "ACC" + patient_id[-6:]
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "DMZ Relay test study"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 1
        ds.Modality = "CT"
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.Manufacturer = "DMZ Relay tests"
        ds.InstanceNumber = index + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [0, 0, float(index)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceThickness = 1.0
        ds.PixelSpacing = [0.5, 0.5]
        ds.KVP = 120
        ds.AcquisitionNumber = 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = columns
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.PixelData = _pixels(rows, columns, index)
        ds["PixelData"].VR = "OW"

        path = out_dir / f"CT{index + 1:04d}.dcm"
        if int(pydicom.__version__.split(".")[0]) >= 3:
            ds.save_as(path, enforce_file_format=True)
        else:  # pydicom 2.x
            ds.is_little_endian = True
            ds.is_implicit_VR = False
            ds.save_as(path, write_like_original=False)
        paths.append(path)
        sop_uids.append(sop_uid)
    return SampleSeries(
        tuple(paths), tuple(sop_uids), study_uid, series_uid, patient_id, patient_name
    )


def fingerprint(path: Path) -> tuple[str, str]:
    """(SOP Instance UID, SHA-256 of the pixel data): equal for the same image, whatever
    file meta or transfer-syntax-neutral re-encoding a hop may have applied."""
    from pydicom import dcmread

    ds = dcmread(path)
    return str(ds.SOPInstanceUID), hashlib.sha256(ds.PixelData).hexdigest()
