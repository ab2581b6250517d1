"""Frames, HTJ2K, bulk data and rendering of instances stored in transfer syntaxes other
than plain little endian: the viewer must get the image's pixel values or a refusal,
never the bytes of another layout labelled Explicit VR Little Endian."""

from __future__ import annotations

import io
import zlib
from collections.abc import AsyncIterator

import imagecodecs
import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID

from relay.dicom import rawds
from relay.workstation.dicomweb import frames
from relay.workstation.dicomweb.server import DicomwebServer
from relay_dev.samples import EncodedInstance
from tests.workstation.dicomweb import test_server
from tests.workstation.dicomweb.test_server import SERIES, STUDY, ScriptedSource, get, parts

ELE = "1.2.840.10008.1.2.1"
ILE = "1.2.840.10008.1.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
BE = "1.2.840.10008.1.2.2"
ENCAPS = "1.2.840.10008.1.2.1.98"  # Encapsulated Uncompressed Explicit VR Little Endian
DEFLATED_FRAMES = "1.2.840.10008.1.2.8.1"  # Deflated Image Frame Compression
PRIVATE = "1.2.3.999.1"  # a syntax nobody here knows
OHIF = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
HTJ2K = 'multipart/related; type="image/jphc"; transfer-syntax=1.2.840.10008.1.2.4.201'
ASKS_LE = f'multipart/related; type="application/octet-stream"; transfer-syntax={ELE}'
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
ROWS, COLS, FRAMES = 16, 15, 2  # an odd frame size in 8 bits: encapsulated frames are padded


def pixel_values(bits: int, signed: bool = False) -> np.ndarray:
    """Two frames of distinct values: a swapped or shifted byte shows."""
    kind = ("<i" if signed else "<u") + str(bits // 8)
    base = np.arange(FRAMES * ROWS * COLS, dtype=np.int64) * 7 + 3
    if signed:
        base -= 900
    top = 1 << (bits - 1 if signed else bits)
    return (base % top).astype(kind).reshape(FRAMES, ROWS, COLS)


def image(sop: str, bits: int, signed: bool = False) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT_CLASS
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = SERIES
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = FRAMES
    ds.Rows, ds.Columns = ROWS, COLS
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = int(signed)
    return ds


def encapsulated(ds: Dataset, fragments: list[bytes]) -> None:
    ds.PixelData = encapsulate(fragments, has_bot=True)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True


def stored(ts: str, sop: str, values: np.ndarray, *, vr: str | None = None) -> EncodedInstance:
    """`values` as a PACS holding them in `ts` would send them."""
    bits = values.dtype.itemsize * 8
    ds = image(sop, bits, values.dtype.kind == "i")
    native_vr = vr or ("OB" if bits == 8 else "OW")
    if ts == BE:
        raw = values.astype(values.dtype.newbyteorder(">")).tobytes()
        if native_vr == "OW" and bits == 8:  # 8-bit samples in 16-bit words (PS3.5 D)
            raw = np.frombuffer(raw + b"\0" * (len(raw) % 2), "<u2").byteswap().tobytes()
        ds.PixelData = raw
        ds["PixelData"].VR = native_vr
        return EncodedInstance(CT_CLASS, sop, ts, rawds.encode_dataset(ds, BE))
    if ts in (ELE, ILE, DEFLATED):
        ds.PixelData = values.tobytes()
        ds["PixelData"].VR = native_vr
        data = rawds.encode_dataset(ds, ILE if ts == ILE else ELE)
        if ts == DEFLATED:
            z = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
            data = z.compress(data) + z.flush()
        return EncodedInstance(CT_CLASS, sop, ts, data)
    if ts == ENCAPS:
        encapsulated(ds, [f.tobytes() + b"\0" * (f.nbytes % 2) for f in values])
    else:  # each fragment one frame, deflated (1.2.840.10008.1.2.8.1 and our private one)
        encapsulated(ds, [zlib.compress(f.tobytes()) for f in values])
    return EncodedInstance(CT_CLASS, sop, ts, rawds.encode_dataset(ds, ELE))


U16 = pixel_values(16)
CASES = {  # SOP Instance UID -> (stored, what its frames are)
    "1.2.9.1": (stored(ENCAPS, "1.2.9.1", U16), U16),
    "1.2.9.2": (stored(BE, "1.2.9.2", U16), U16),
    "1.2.9.3": (stored(BE, "1.2.9.3", pixel_values(16, True)), pixel_values(16, True)),
    "1.2.9.4": (stored(BE, "1.2.9.4", pixel_values(8), vr="OW"), pixel_values(8)),
    "1.2.9.5": (stored(BE, "1.2.9.5", pixel_values(8), vr="OB"), pixel_values(8)),
    "1.2.9.6": (stored(DEFLATED, "1.2.9.6", U16), U16),
    "1.2.9.7": (stored(ENCAPS, "1.2.9.7", pixel_values(8)), pixel_values(8)),
    "1.2.9.8": (stored(ILE, "1.2.9.8", U16), U16),
}
UNCOMPRESSED = sorted(CASES)
COMPRESSED = {"1.2.9.20": stored(DEFLATED_FRAMES, "1.2.9.20", U16),
              "1.2.9.21": stored(PRIVATE, "1.2.9.21", U16)}  # fmt: skip
BE32 = stored(BE, "1.2.9.30", pixel_values(32))


@pytest.fixture
async def web() -> AsyncIterator[tuple[DicomwebServer, ScriptedSource]]:
    instances = [inst for inst, _ in CASES.values()] + [*COMPRESSED.values(), BE32]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(test_server, "CT", instances)  # the scripted PACS holds these
        async with test_server.scripted() as both:
            yield both


def url(srv: DicomwebServer, sop: str) -> str:
    return f"{srv.url}/studies/{STUDY}/series/{SERIES}/instances/{sop}"


def ts_of(content_type: str) -> str:
    return content_type.replace('"', "").partition("transfer-syntax=")[2].split(";")[0]


def as_values(frame: bytes, like: np.ndarray) -> np.ndarray:
    return np.frombuffer(frame, like.dtype.newbyteorder("<")).reshape(like.shape)


@pytest.mark.parametrize("sop", UNCOMPRESSED)
async def test_uncompressed_frames_are_the_pixel_values_in_explicit_vr_le(
    web: tuple[DicomwebServer, ScriptedSource], sop: str
) -> None:
    srv, _ = web
    _, values = CASES[sop]
    status, headers, body = await get(f"{url(srv, sop)}/frames/2,1", headers={"Accept": OHIF})
    assert status == 200, body
    got = parts(headers, body)
    assert [ts_of(ctype) for ctype, _ in got] == [ELE, ELE]
    assert np.array_equal(as_values(got[0][1], values[1]), values[1])
    assert np.array_equal(as_values(got[1][1], values[0]), values[0])
    # asked for by name, too: the frames are Explicit VR LE whatever the stored syntax
    status, headers, body = await get(f"{url(srv, sop)}/frames/1", headers={"Accept": ASKS_LE})
    assert status == 200 and as_values(parts(headers, body)[0][1], values[0]).tolist() == (
        values[0].tolist()
    )


@pytest.mark.parametrize("sop", UNCOMPRESSED)
async def test_htj2k_frames_encode_the_pixel_values(
    web: tuple[DicomwebServer, ScriptedSource], sop: str
) -> None:
    srv, _ = web
    _, values = CASES[sop]
    status, headers, body = await get(f"{url(srv, sop)}/frames/2", headers={"Accept": HTJ2K})
    assert status == 200, body
    [(ctype, stream)] = parts(headers, body)
    assert ts_of(ctype) == "1.2.840.10008.1.2.4.201"
    assert np.array_equal(imagecodecs.htj2k_decode(stream), values[1])
    # the bare codestream a progressive viewer asks for in byte ranges
    status, headers, body = await get(f"{url(srv, sop)}/frames/1",
                                      headers={"Accept": "image/jphc"})  # fmt: skip
    assert status == 200, body
    assert np.array_equal(imagecodecs.htj2k_decode(body), values[0])


@pytest.mark.parametrize("sop", sorted(COMPRESSED))
async def test_other_syntaxes_are_served_as_stored_and_labelled_so(
    web: tuple[DicomwebServer, ScriptedSource], sop: str
) -> None:
    srv, _ = web
    inst = COMPRESSED[sop]
    status, headers, body = await get(f"{url(srv, sop)}/frames/2", headers={"Accept": OHIF})
    assert status == 200, body
    [(ctype, frame)] = parts(headers, body)
    assert ts_of(ctype) == inst.transfer_syntax
    assert zlib.decompress(frame) == U16[1].tobytes()  # the fragment, without item tags
    for accept in (HTJ2K, ASKS_LE, "image/jphc"):  # conversions the relay does not make
        status, _, body = await get(f"{url(srv, sop)}/frames/1", headers={"Accept": accept})
        assert status == 406, (accept, body)


async def test_big_endian_layouts_read_differently_by_toolkits_are_refused(
    web: tuple[DicomwebServer, ScriptedSource],
) -> None:
    """32-bit samples in big endian OW: pydicom swaps 4 bytes, DCMTK 16-bit words."""
    srv, _ = web
    for accept in (OHIF, HTJ2K, "image/jphc"):
        status, _, body = await get(f"{url(srv, BE32.sop_instance)}/frames/1",
                                    headers={"Accept": accept})  # fmt: skip
        assert status == 406 and b"big endian" in body, (accept, body)
    for route in ("bulk/7FE00010", "frames/1/rendered", "rendered", "thumbnail"):
        status, _, body = await get(f"{url(srv, BE32.sop_instance)}/{route}")
        assert status == 406 and b"big endian" in body, (route, body)


@pytest.mark.parametrize("sop", UNCOMPRESSED)
async def test_bulk_pixel_data_is_little_endian_pixel_values(
    web: tuple[DicomwebServer, ScriptedSource], sop: str
) -> None:
    srv, _ = web
    _, values = CASES[sop]
    status, headers, body = await get(f"{url(srv, sop)}/bulk/7FE00010")
    assert status == 200, body
    [(ctype, value)] = parts(headers, body)
    assert ts_of(ctype) == ELE
    assert np.array_equal(as_values(value[: values.nbytes], values), values)


@pytest.mark.parametrize("sop", sorted(COMPRESSED))
async def test_bulk_pixel_data_of_other_syntaxes_is_each_frame_as_stored(
    web: tuple[DicomwebServer, ScriptedSource], sop: str
) -> None:
    srv, _ = web
    status, headers, body = await get(f"{url(srv, sop)}/bulk/7FE00010")
    assert status == 200, body
    got = parts(headers, body)
    assert [ts_of(ctype) for ctype, _ in got] == [COMPRESSED[sop].transfer_syntax] * 2
    assert [zlib.decompress(v) for _, v in got] == [f.tobytes() for f in U16]


async def test_bulk_data_of_a_big_endian_instance_is_little_endian(
    web: tuple[DicomwebServer, ScriptedSource],
) -> None:
    """Uncompressed bulk data is little endian (PS3.18 8.7.3.3.1), LUT data too."""
    srv, _ = web
    ds = image("1.2.9.40", 16)
    lut = np.arange(1024, dtype="<u2") * 3
    ds.add_new(0x00283006, "OW", lut.astype(">u2").tobytes())  # LUT Data, 2 KiB
    ds.PixelData = U16.astype(">u2").tobytes()
    ds["PixelData"].VR = "OW"
    test_server.CT.append(EncodedInstance(CT_CLASS, "1.2.9.40", BE, rawds.encode_dataset(ds, BE)))
    status, headers, body = await get(f"{url(srv, '1.2.9.40')}/bulk/00283006")
    assert status == 200, body
    assert np.array_equal(np.frombuffer(parts(headers, body)[0][1], "<u2"), lut)


@pytest.mark.parametrize("sop", UNCOMPRESSED)
async def test_rendered_frames_show_the_pixel_values(
    web: tuple[DicomwebServer, ScriptedSource], sop: str
) -> None:
    srv, _ = web
    _, values = CASES[sop]
    status, _, body = await get(f"{url(srv, sop)}/frames/2/rendered",
                                headers={"Accept": "image/png"})  # fmt: skip
    assert status == 200, body
    grey = np.asarray(Image.open(io.BytesIO(body)), dtype=np.float64)
    want = values[1].astype(np.float64)
    want = (want - want.min()) * (255.0 / (want.max() - want.min()))
    assert np.abs(grey - want).max() <= 1.0


def decoded(inst: EncodedInstance) -> Dataset:
    ds = rawds.decode_dataset(inst.data, inst.transfer_syntax)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(inst.transfer_syntax)
    return ds


def test_which_syntaxes_hold_uncompressed_frames() -> None:
    for ts in (ELE, ILE, DEFLATED, BE, ENCAPS):
        assert frames.uncompressed(ts) and frames.frame_syntax(ts) == ELE, ts
        assert frames.is_encapsulated(ts) == (ts == ENCAPS), ts
    for ts in (DEFLATED_FRAMES, PRIVATE, "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50",
               "1.2.840.10008.1.2.4.100", ""):  # fmt: skip
        assert not frames.uncompressed(ts) and frames.frame_syntax(ts) == ts, ts
        assert frames.is_encapsulated(ts), ts


def test_encapsulated_uncompressed_fragments_are_frames_without_their_padding() -> None:
    values = pixel_values(8)  # 16 x 15 bytes a frame: each fragment has a pad byte
    ds = decoded(CASES["1.2.9.7"][0])
    assert frames.get_frames(ds, ENCAPS, [2, 1]) == [values[1].tobytes(), values[0].tobytes()]
    ds.PixelData = encapsulate([values[0].tobytes() + b"\0", b"\0" * 10])
    with pytest.raises(frames.Unservable, match="fragment"):
        frames.get_frames(ds, ENCAPS, [2])


def test_fragments_that_are_not_one_per_frame_are_refused() -> None:
    ds = decoded(COMPRESSED["1.2.9.20"])
    ds.NumberOfFrames = 3  # two fragments, no way to tell the third frame
    ds.PixelData = encapsulate([b"AAAA", b"BB"], has_bot=False)
    with pytest.raises(frames.Unservable):
        frames.get_frames(ds, DEFLATED_FRAMES, [3])


async def test_bulk_data_follows_the_accept_header(
    web: tuple[DicomwebServer, ScriptedSource],
) -> None:
    """It was always multipart octet-stream whatever was asked: an Accept that no bulk
    answer can meet is 406 before any retrieval, and one naming another syntax than the
    answer's is 406 too (the relay does not transcode)."""
    srv, source = web
    plain, packed = UNCOMPRESSED[0], sorted(COMPRESSED)[0]
    before = source.retrieves
    status, _, body = await get(f"{url(srv, plain)}/bulk/7FE00010",
                                headers={"Accept": "application/dicom+json"})  # fmt: skip
    assert status == 406 and b"application/octet-stream" in body
    assert source.retrieves == before  # refused before anything was asked of the PACS
    as_ele = f'multipart/related; type="application/octet-stream"; transfer-syntax={ELE}'
    for sop, accept, expected in (
        (plain, OHIF, 200),
        (plain, as_ele, 200),
        (packed, OHIF, 200),
        (packed, as_ele, 406),  # stored compressed: answered as stored or not at all
        (plain, f"{as_ele}; q=0, */*", 406),  # the most specific range refuses it
    ):
        status, headers, body = await get(f"{url(srv, sop)}/bulk/7FE00010",
                                          headers={"Accept": accept})  # fmt: skip
        assert status == expected, (sop, accept, body)
        if status == 200:
            assert headers["Content-Type"].startswith("multipart/related")
