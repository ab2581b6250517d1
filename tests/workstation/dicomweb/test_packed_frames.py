"""Native frames not laid out as Rows x Columns x SamplesPerPixel whole bytes: YBR_FULL_422
(two samples a pixel, PS3.3 C.7.6.3.1.2; multi-frame ultrasound) and 1-bit data whose
frames do not start on a byte. The frames endpoint gives each frame's own bytes and the
rendered frame shows what pydicom decodes, frame for frame."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels.processing import convert_color_space
from pydicom.pixels.utils import get_expected_length, pack_bits, pixel_array
from pydicom.uid import UID

from relay.dicom import rawds
from relay.workstation.dicomweb.server import DicomwebServer
from relay_dev.samples import EncodedInstance
from tests.workstation.dicomweb import test_server
from tests.workstation.dicomweb.test_server import SERIES, STUDY, get, parts

ELE = "1.2.840.10008.1.2.1"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
SC_SINGLE_BIT = "1.2.840.10008.5.1.4.1.1.7.1"
YBR_SOP, BITS_SOP = "1.2.9.422", "1.2.9.1001"
ROWS, COLS = 4, 6  # a YBR_FULL_422 frame: 48 bytes (it was cut as 72)
BIT_ROWS, BIT_COLS, BIT_FRAMES = 3, 5, 3  # 15 bits a frame: frame 2 starts in byte 1


def _base(sop: str, sop_class: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, SERIES
    ds.SeriesNumber = ds.InstanceNumber = 1
    ds.PixelRepresentation = 0
    return ds


def _ybr_422(rgb: np.ndarray) -> bytes:
    """RGB frames as native YBR_FULL_422: Y Y Cb Cr for each two pixels of a row."""
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL").astype(np.uint16)
    pairs = ybr.reshape(*ybr.shape[:-2], ybr.shape[-2] // 2, 2, 3)
    chroma = (pairs[..., 0, 1:] + pairs[..., 1, 1:]) // 2
    return (
        np.concatenate([pairs[..., 0, :1], pairs[..., 1, :1], chroma], -1)
        .astype(np.uint8)
        .tobytes()
    )


def ybr_instance() -> tuple[EncodedInstance, bytes]:
    ds = _base(YBR_SOP, US_MULTIFRAME)
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.NumberOfFrames, ds.Rows, ds.Columns = 2, ROWS, COLS
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    rng = np.random.default_rng(422)
    value = _ybr_422(rng.integers(0, 256, (2, ROWS, COLS, 3), dtype=np.uint8))
    ds.PixelData = value
    ds["PixelData"].VR = "OB"
    assert len(value) == get_expected_length(ds) == 2 * ROWS * COLS * 2
    return EncodedInstance(US_MULTIFRAME, YBR_SOP, ELE, rawds.encode_dataset(ds, ELE)), value


def bits_instance() -> EncodedInstance:
    ds = _base(BITS_SOP, SC_SINGLE_BIT)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.NumberOfFrames, ds.Rows, ds.Columns = BIT_FRAMES, BIT_ROWS, BIT_COLS
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 0
    bits = (np.arange(BIT_FRAMES * BIT_ROWS * BIT_COLS) * 7 % 3 == 0).astype(np.uint8)
    ds.PixelData = pack_bits(bits)
    ds["PixelData"].VR = "OB"
    return EncodedInstance(SC_SINGLE_BIT, BITS_SOP, ELE, rawds.encode_dataset(ds, ELE))


YBR, YBR_VALUE = ybr_instance()
BITS = bits_instance()


@pytest.fixture
async def web() -> AsyncIterator[DicomwebServer]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(test_server, "CT", [YBR, BITS])  # the scripted PACS holds these
        async with test_server.scripted() as (srv, _):
            yield srv


def url(srv: DicomwebServer, sop: str) -> str:
    return f"{srv.url}/studies/{STUDY}/series/{SERIES}/instances/{sop}"


def pydicoms(inst: EncodedInstance, index: int) -> np.ndarray:
    """Frame `index` (0-based) as pydicom decodes it from the whole instance (RGB for
    YBR), scaled to 0..255 as a rendered frame is. pydicom 3.0.2's `index=` fails on 1-bit
    frames that do not start on a byte ("cannot reshape"): all frames are decoded."""
    ds = rawds.decode_dataset(inst.data, inst.transfer_syntax)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(inst.transfer_syntax)
    values = np.asarray(pixel_array(ds)[index], dtype=np.float64)  # whole: see above
    scaled: np.ndarray = (values - values.min()) * (255.0 / (values.max() - values.min()))
    return scaled


async def rendered(srv: DicomwebServer, sop: str, number: int) -> np.ndarray:
    status, _, body = await get(f"{url(srv, sop)}/frames/{number}/rendered",
                                headers={"Accept": "image/png"})  # fmt: skip
    assert status == 200, body
    return np.asarray(Image.open(io.BytesIO(body)), dtype=np.float64)


async def test_ybr_full_422_frames_are_two_samples_a_pixel(web: DicomwebServer) -> None:
    """Each frame was cut as 3 bytes a pixel: frame 2 was past the value's end (a 404)
    and a frame 1 of 72 bytes held half of frame 2."""
    size = ROWS * COLS * 2
    for number in (1, 2):
        status, headers, body = await get(f"{url(web, YBR_SOP)}/frames/{number}")
        assert status == 200, body
        [(_, frame)] = parts(headers, body)
        assert frame == YBR_VALUE[(number - 1) * size : number * size]


async def test_a_rendered_ybr_full_422_frame_is_pydicoms_conversion(web: DicomwebServer) -> None:
    for number in (1, 2):
        got = await rendered(web, YBR_SOP, number)
        assert got.shape == (ROWS, COLS, 3)
        assert np.abs(got - pydicoms(YBR, number - 1)).max() <= 1.0


async def test_one_bit_frames_not_on_a_byte_boundary_render(web: DicomwebServer) -> None:
    """Since 57a9538 each frame is cut out of the value (a 406: "1-bit frames that do not
    end on a byte boundary"); now by its bits, equal to pydicom's decoding of them all."""
    for number in range(1, BIT_FRAMES + 1):
        got = await rendered(web, BITS_SOP, number)
        assert got.shape == (BIT_ROWS, BIT_COLS)
        assert np.array_equal(got, pydicoms(BITS, number - 1))


async def test_one_bit_frames_not_on_a_byte_boundary_are_406_as_frames(
    web: DicomwebServer,
) -> None:
    """No such frame is a run of the value's bytes: a 406 saying so (it was a 404, as if
    the frame did not exist)."""
    status, _, body = await get(f"{url(web, BITS_SOP)}/frames/2")
    assert status == 406 and b"byte boundary" in body
