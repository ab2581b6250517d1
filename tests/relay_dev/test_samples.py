"""Sample studies: realistic enough to exercise the relay (tags, pixel statistics, zstd)."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import zstandard

from relay.dicom import rawds
from relay_dev import samples


def test_ct_study_has_realistic_tags_and_pixels() -> None:
    study = samples.make_study(8)
    assert len({i.sop_instance for i in study}) == 8
    ds = pydicom.dcmread(io.BytesIO(study[3].file_bytes()))
    assert ds.Modality == "CT"
    assert ds.SOPClassUID == samples.CT_IMAGE_STORAGE
    assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored) == (512, 512, 16, 12)
    assert ds.RescaleType == "HU" and float(ds.RescaleIntercept) == -1024
    assert ds.InstanceNumber == 4
    assert ds.PatientID and ds.StudyInstanceUID and ds.AccessionNumber
    hu = ds.pixel_array.astype(np.float64) - 1024
    inside = hu[200:300, 150:350]
    assert -200 < np.median(inside) < 200  # soft tissue in the middle of the body
    assert hu.min() < -900  # air
    assert hu.max() > 500  # bone
    assert 5 < np.std(hu[250:260, 250:260]) < 100  # noise, not a flat image


def test_ct_compresses_like_real_ct_not_like_zeros_or_noise() -> None:
    data = samples.make_study(3)[1].data
    ratio = len(data) / len(zstandard.ZstdCompressor(level=3).compress(data))
    assert 1.5 < ratio < 6


def test_mr_series() -> None:
    study = samples.make_study(4, modality="MR")
    ds = pydicom.dcmread(io.BytesIO(study[0].file_bytes()))
    assert ds.Modality == "MR" and ds.SOPClassUID == samples.MR_IMAGE_STORAGE
    assert (ds.Rows, ds.Columns) == (256, 256)
    assert float(ds.MagneticFieldStrength) == 1.5
    px = ds.pixel_array
    assert px.max() > 400 and px.mean() > 20


def test_generation_is_deterministic() -> None:
    a = samples.make_study(2, seed=4, rows=64, cols=64)
    b = samples.make_study(2, seed=4, rows=64, cols=64)
    assert a == b
    assert samples.make_study(2, seed=5, rows=64, cols=64) != a


def test_synthetic_study_matches_its_headers_and_is_repeatable() -> None:
    big = samples.SyntheticStudy.of_size(3 * 600_000, rows=256, cols=256)
    inst = big.instance(5)
    assert big.count * len(inst.data) >= 3 * 600_000 > (big.count - 1) * len(inst.data)
    assert inst == big.instance(5)
    header = big.header(5)
    assert str(header.SOPInstanceUID) == inst.sop_instance
    assert "PixelData" not in header
    full = rawds.decode_dataset(inst.data, inst.transfer_syntax)
    del full.PixelData
    assert full == header


def test_demo_studies_are_two_patients() -> None:
    insts = samples.demo_studies(ct_slices=3, mr_slices=2)
    patients = {str(rawds.decode_dataset(i.data, i.transfer_syntax).PatientID) for i in insts}
    assert len(insts) == 5 and len(patients) == 2


def test_part10_file_reads_back_with_the_same_dataset_bytes() -> None:
    from pynetdicom.dsutils import split_dataset

    inst = samples.make_study(1, rows=16, cols=16)[0]
    blob = inst.file_bytes()
    meta = pydicom.dcmread(io.BytesIO(blob)).file_meta
    assert meta.TransferSyntaxUID == inst.transfer_syntax
    offset = len(blob) - len(inst.data)
    assert blob[offset:] == inst.data
    assert meta.MediaStorageSOPInstanceUID == inst.sop_instance
    del split_dataset
