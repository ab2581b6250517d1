"""Part 10 wrapping, frames, DICOM JSON with BulkDataURIs, rendering and the Host check."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID

from relay.dicom import rawds
from relay.workstation.dicomweb import dicomjson, frames, part10, render
from relay.workstation.dicomweb.guard import allowed_hosts, host_allowed
from relay.workstation.dicomweb.retrieve import decode
from relay_dev import samples

ELE = "1.2.840.10008.1.2.1"
RLE = "1.2.840.10008.1.2.5"


@pytest.fixture(scope="module")
def ct() -> samples.EncodedInstance:
    return samples.demo_studies(ct_slices=2, mr_slices=1)[0]


def decoded(inst: samples.EncodedInstance) -> Dataset:
    ds = rawds.decode_dataset(inst.data, inst.transfer_syntax)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(inst.transfer_syntax)
    return ds


def test_part10_wraps_the_exact_dataset_bytes_and_splits_them_back(
    ct: samples.EncodedInstance,
) -> None:
    data = part10.wrap(ct.sop_class, ct.sop_instance, ct.transfer_syntax, ct.data)
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.SOPInstanceUID == ct.sop_instance
    assert ds.file_meta.TransferSyntaxUID == ct.transfer_syntax
    meta, offset = part10.split(data)
    assert data[offset:] == ct.data
    assert meta[0x00020003] == ct.sop_instance


TRUNCATED_META = b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff"


@pytest.mark.parametrize("data", [b"", b"x" * 200, TRUNCATED_META])
def test_part10_split_refuses_what_is_not_a_part10_file(data: bytes) -> None:
    with pytest.raises(part10.Part10Error):
        part10.split(data)


def test_native_frames_are_cut_from_the_pixel_data(ct: samples.EncodedInstance) -> None:
    ds = decoded(ct)
    [frame] = frames.get_frames(ds, ct.transfer_syntax, [1])
    assert frame == ds.PixelData
    pixels = np.frombuffer(frame, dtype=ds.pixel_array.dtype).reshape(ds.Rows, ds.Columns)
    assert np.array_equal(pixels, ds.pixel_array)
    with pytest.raises(frames.FrameError):
        frames.get_frames(ds, ct.transfer_syntax, [2])


def test_multiframe_native_and_encapsulated_frames() -> None:
    ds = Dataset()
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.BitsAllocated = 2, 3, 1, 16
    ds.NumberOfFrames = 3
    ds.PixelData = b"".join(bytes([n]) * 12 for n in range(3))
    assert frames.get_frames(ds, ELE, [3, 1]) == [b"\x02" * 12, b"\x00" * 12]
    ds.PixelData = encapsulate([b"AAAA", b"BB", b"CCCCCC"])
    assert frames.get_frames(ds, "1.2.840.10008.1.2.4.50", [2]) == [b"BB"]


@pytest.mark.parametrize("text", ["0", "a", "1,,2", "-1", "1" * 12, "1,2,1"])
def test_malformed_frame_lists(text: str) -> None:
    with pytest.raises(ValueError):
        frames.frame_numbers(text)
    assert frames.frame_numbers("3, 1") == [3, 1]


# Digits str.isdigit() takes besides ASCII's: Arabic-Indic one (int() reads it as 1, so
# frame 1 was served), superscript two (int() refuses it: its Python error was the 400's
# text), fullwidth five.
OTHER_DIGITS = ["\u0661", "\u00b2", "\uff15", "1,\u0662"]


@pytest.mark.parametrize("text", OTHER_DIGITS)
def test_numbers_in_urls_are_ascii_digits(text: str) -> None:
    with pytest.raises(ValueError, match="whole numbers from 1"):
        frames.frame_numbers(text)
    with pytest.raises(ValueError, match="expected viewport"):
        render.viewport(f"{text},10")
    with pytest.raises(ValueError, match="expected quality"):
        render.quality(text)
    assert render.viewport("10, 20") == (10, 20) and render.quality("75") == 75


def test_metadata_has_every_attribute_and_bulk_uris_for_pixel_data(
    ct: samples.EncodedInstance,
) -> None:
    ds = decoded(ct)
    doc = dicomjson.to_json(ds, bulk_base="http://127.0.0.1:1/dicom-web/x")
    assert doc["7FE00010"] == {
        "vr": "OW",
        "BulkDataURI": "http://127.0.0.1:1/dicom-web/x/bulk/7FE00010",
    }
    for elem in ds:
        assert f"{int(elem.tag):08X}" in doc, elem.keyword
    back = Dataset.from_json({k: v for k, v in doc.items() if k != "7FE00010"})
    assert back.PatientName == ds.PatientName and back.Rows == ds.Rows
    assert dicomjson.bulk_value(ds, 0x7FE00010) == ds.PixelData


def test_rendered_frames_are_images_of_the_frame(ct: samples.EncodedInstance) -> None:
    ds = decoded(ct)
    png = render.render_frame(ds, 1, "image/png", (64, 64))
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and max(image.size) == 64
    assert len(np.unique(np.asarray(image))) > 10  # not a uniform picture
    jpeg = render.render_frame(ds, 1, "image/jpeg")
    assert Image.open(io.BytesIO(jpeg)).size == (ds.Columns, ds.Rows)
    with pytest.raises(render.RenderError):
        render.render_frame(ds, 2, "image/png")
    with pytest.raises(ValueError):
        render.viewport("0,10")


def _rle_frames(extended: bool) -> bytes:
    """Three 64 x 64 frames in RLE Lossless, the second far larger compressed than the
    others; `extended`: located by an Extended Offset Table (7FE0,0001/0002)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(ELE)
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", "1.2.3.4"
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation, ds.NumberOfFrames = 15, 0, 3
    noise = np.random.default_rng(7).integers(0, 65535, (64, 64), dtype=np.uint16)
    ramp = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    ds.PixelData = np.stack([ramp, noise, ramp[::-1]]).tobytes()
    ds.compress(RLE, encoding_plugin="pydicom", encapsulate_ext=extended)
    assert ("ExtendedOffsetTable" in ds) == extended
    return rawds.encode_dataset(ds, RLE)


def test_every_frame_of_an_instance_with_an_extended_offset_table_renders() -> None:
    """The one-frame dataset rendered kept the whole instance's Extended Offset Table, by
    which pydicom cut the frame: no frame of such an instance rendered (RenderError)."""
    for number in (1, 2, 3):
        images = [render.render_frame(decode(_rle_frames(extended), RLE), number, "image/png")
                  for extended in (False, True)]  # fmt: skip
        assert images[0] == images[1], number


def test_a_frame_too_large_to_render_is_refused_from_its_header(
    ct: samples.EncodedInstance,
) -> None:
    """A decompression bomb (a small instance claiming a huge frame) is refused before
    anything is decoded or allocated."""
    ds = decoded(ct)
    ds.Rows = ds.Columns = 6000  # 36 M values
    with pytest.raises(render.RenderError, match="more than"):
        render.render_frame(ds, 1, "image/png")


def test_without_a_viewport_a_rendered_frame_is_within_max_side(
    ct: samples.EncodedInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(render, "MAX_SIDE", 100)
    png = render.render_frame(decoded(ct), 1, "image/png")
    assert max(Image.open(io.BytesIO(png)).size) == 100


def test_the_host_header_must_name_loopback() -> None:
    allowed = allowed_hosts([8042])
    for ok in ("127.0.0.1:8042", "localhost:8042", "LOCALHOST:8042", "[::1]:8042", "127.0.0.1"):
        assert host_allowed(ok, allowed), ok
    for bad in ("evil.example:8042", "127.0.0.1.evil.example:8042", "localhost:8043",
                "10.0.0.1:8042", "", None, "localhost.evil:8042"):  # fmt: skip
        assert not host_allowed(bad, allowed), bad
