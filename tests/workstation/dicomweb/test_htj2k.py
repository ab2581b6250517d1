"""HTJ2K frames for browsers: which answer an Accept header gets, exact round trips over
pixel formats, and the frames route over real HTTP (scripted source of test_server)."""

from __future__ import annotations

import email
import email.policy
from collections.abc import AsyncIterator

import imagecodecs
import numpy as np
import pytest
from pydicom.dataset import Dataset

from relay.dicom import rawds
from relay.workstation.dicomweb import htj2k, media
from relay.workstation.dicomweb.htj2k import Choice, Unsupported, choose, encodable, encode_frames
from relay.workstation.dicomweb.server import DicomwebServer
from tests.workstation.dicomweb.test_server import CT, SERIES, STUDY, ScriptedSource, get, scripted

LE = "1.2.840.10008.1.2.1"
OCTET = ("application/octet-stream",)
OHIF = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
TS202 = "1.2.840.10008.1.2.4.202"
JPHC = 'multipart/related; type="image/jphc"; transfer-syntax=1.2.840.10008.1.2.4.201'


def pick(accept: str, stored: str = LE, *, can: bool = True) -> Choice:
    native = stored == LE
    types = media.frame_media_type(stored)
    return choose(media.parse_accept(accept), types, stored, native, can)


def test_native_stays_native_unless_htj2k_is_asked_for() -> None:
    assert pick(OHIF) == Choice("application/octet-stream")
    assert pick(f'multipart/related; type="application/octet-stream"; transfer-syntax={LE}') == (
        Choice("application/octet-stream")
    )
    assert pick(JPHC) == Choice("image/jphc", "1.2.840.10008.1.2.4.201")
    octet202 = f'multipart/related; type="application/octet-stream"; transfer-syntax={TS202}'
    assert pick(octet202) == Choice("application/octet-stream", "1.2.840.10008.1.2.4.202")
    # the client's order decides: HTJ2K first, native as a fallback
    assert pick(f"{JPHC}, {OHIF};q=0.5") == Choice("image/jphc", "1.2.840.10008.1.2.4.201")
    assert pick(f"{JPHC};q=0.5, {OHIF}") == Choice("application/octet-stream")


def test_htj2k_only_from_native_exactly_encodable_data() -> None:
    with pytest.raises(media.AcceptError, match="exactly"):
        pick(JPHC, can=False)
    assert pick(f"{JPHC}, {OHIF}", can=False) == Choice("application/octet-stream")
    jpeg = "1.2.840.10008.1.2.4.50"  # stored compressed: served as stored, never transcoded
    with pytest.raises(media.AcceptError):
        pick(JPHC, jpeg)
    assert pick(OHIF, jpeg) == Choice("application/octet-stream")
    with pytest.raises(media.AcceptError):
        pick('multipart/related; type="application/octet-stream"; transfer-syntax=1.2.3')


def image_ds(bits: int, signed: bool, rows: int, cols: int, samples: int = 1) -> Dataset:
    ds = Dataset()
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.SamplesPerPixel = samples
    ds.PixelRepresentation = int(signed)
    if samples > 1:
        ds.PlanarConfiguration = 0
    return ds


@pytest.mark.parametrize(
    "fmt",
    [
        (8, False, 64, 64, 1, 0, 256),
        (8, True, 33, 17, 1, -128, 128),
        (16, False, 512, 512, 1, 0, 65536),
        (16, True, 64, 48, 1, -32768, 32768),
        (16, False, 31, 7, 1, 0, 4096),  # 12 bits used in 16, odd size
        (16, True, 5, 3, 1, -2048, 2048),
        (8, False, 40, 30, 3, 0, 256),  # RGB
    ],
    ids=["u8", "s8-odd", "u16-512", "s16", "u12-odd", "s12-tiny", "rgb8"],
)
def test_frames_round_trip_exactly(fmt: tuple[int, bool, int, int, int, int, int]) -> None:
    bits, signed, rows, cols, samples, low, high = fmt
    ds = image_ds(bits, signed, rows, cols, samples)
    dtype = np.dtype(("<i" if signed else "<u") + str(bits // 8))
    shape = (rows, cols, samples) if samples > 1 else (rows, cols)
    rng = np.random.default_rng(bits + rows)
    pixels = [rng.integers(low, high, shape).astype(dtype) for _ in range(3)]  # 3 frames
    pixels[1][:] = pixels[1].flat[0]  # a flat frame, too
    assert encodable(ds)
    encoded = encode_frames(ds, [p.tobytes() for p in pixels])
    for want, stream in zip(pixels, encoded, strict=True):
        assert stream[:2] == b"\xff\x4f"  # a bare codestream (image/jphc)
        cod = stream.find(b"\xff\x52")
        assert stream[cod + 5] == 2  # RPCL progression: valid for .202 too
        assert stream[cod + 13] == 1  # the reversible 5/3 wavelet: lossless
        assert stream[: stream.find(b"\xff\x90")].find(b"\xff\x55") > 0  # TLM (.202)
        back = imagecodecs.htj2k_decode(stream)
        assert back.dtype == want.dtype and np.array_equal(back, want)


@pytest.mark.parametrize(
    "ds",
    [
        image_ds(32, False, 8, 8),
        image_ds(1, False, 8, 8),
        image_ds(16, False, 8, 8, samples=3),
        image_ds(16, False, 0, 8),
    ],
    ids=["32-bit", "1-bit", "rgb16", "no-size"],
)
def test_formats_that_are_not_taken_exactly_are_refused(ds: Dataset) -> None:
    assert not encodable(ds)
    with pytest.raises(Unsupported):
        encode_frames(ds, [b"\0" * 64])


def test_a_frame_of_the_wrong_length_and_too_many_frames_are_refused() -> None:
    ds = image_ds(8, False, 4, 4)
    with pytest.raises(Unsupported, match="length"):
        encode_frames(ds, [b"\0" * 15])
    with pytest.raises(Unsupported, match="more than"):
        encode_frames(ds, [b"\0" * 16] * (htj2k.MAX_FRAMES + 1))


@pytest.fixture
async def web() -> AsyncIterator[tuple[DicomwebServer, ScriptedSource]]:
    async with scripted() as both:
        yield both


def parts(headers: dict[str, str], body: bytes) -> list[tuple[str, bytes]]:
    head = f"Content-Type: {headers['Content-Type']}\r\n\r\n".encode()
    msg = email.message_from_bytes(head + body, policy=email.policy.HTTP)
    out = []
    for p in msg.iter_parts():
        payload = p.get_payload(decode=True)
        assert isinstance(payload, bytes)
        out.append((str(p["Content-Type"]), payload))
    return out


async def test_the_frames_route_answers_htj2k_when_asked(
    web: tuple[DicomwebServer, ScriptedSource],
) -> None:
    srv, _ = web
    inst = CT[1]
    url = f"{srv.url}/studies/{STUDY}/series/{SERIES}/instances/{inst.sop_instance}/frames"
    status, headers, body = await get(f"{url}/1", headers={"Accept": JPHC})
    assert status == 200, body
    assert headers["Content-Type"].startswith('multipart/related; type="image/jphc"')
    [(ctype, stream)] = parts(headers, body)
    assert ctype.replace('"', "") == "image/jphc; transfer-syntax=1.2.840.10008.1.2.4.201"
    ds = rawds.decode_dataset(inst.data, inst.transfer_syntax)
    want = np.frombuffer(ds.PixelData, dtype="<u2" if ds.PixelRepresentation == 0 else "<i2")
    back = imagecodecs.htj2k_decode(stream)
    assert np.array_equal(back.reshape(-1), want) and len(np.unique(want)) > 10
    assert len(stream) < len(ds.PixelData)  # smaller on the wire than the native frame
    # OHIF's default stays native; a syntax we cannot make is 406; too many frames 400
    status, headers, body = await get(f"{url}/1", headers={"Accept": OHIF})
    assert status == 200 and parts(headers, body)[0][1] == ds.PixelData
    jls = 'multipart/related; type="image/jls"; transfer-syntax=1.2.840.10008.1.2.4.80'
    status, _, _ = await get(f"{url}/1", headers={"Accept": jls})
    assert status == 406
    many = ",".join(["1"] * (htj2k.MAX_FRAMES + 1))
    assert (await get(f"{url}/{many}", headers={"Accept": JPHC}))[0] == 400
    assert srv.service.frames_encoded == 1
