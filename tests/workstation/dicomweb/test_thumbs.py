"""Which frame a series or study thumbnail shows (pure) and the rendered routes that use it
(over real HTTP, with the scripted source of test_server)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from pydicom.dataset import Dataset
from pydicom.pixels.utils import pixel_array

from relay.dicom import rawds
from relay.workstation.dicomweb import render
from relay.workstation.dicomweb.retrieve import decode
from relay.workstation.dicomweb.server import DicomwebServer
from relay.workstation.dicomweb.thumbs import DEFAULT_THUMBNAIL, image_of, middle_frame
from tests.workstation.dicomweb import test_server as server_module
from tests.workstation.dicomweb.test_server import CT, SERIES, STUDY, ScriptedSource, get, scripted


@dataclass
class Item:
    sop_instance: str
    transfer_syntax: str
    data: bytes


def item(number: int, *, pixels: bool = True, frames: int = 1) -> Item:
    base = CT[0]
    ds = rawds.decode_dataset(base.data, base.transfer_syntax)
    ds.InstanceNumber = number
    ds.SOPInstanceUID = f"1.2.3.{number}"
    if frames > 1:
        ds.NumberOfFrames = frames
    if not pixels:
        del ds.PixelData
    return Item(ds.SOPInstanceUID, base.transfer_syntax, rawds.encode_dataset(ds))


def middle(items: list[Item]) -> tuple[Item, int] | None:
    """middle_frame over the items that image_of finds an image in, as app.py calls it."""
    images = []
    for i in items:
        found = image_of(i.data, i.transfer_syntax)
        if found is not None:
            images.append((i, *found))
    return middle_frame(images)


def test_the_middle_image_by_instance_number() -> None:
    items = [item(n) for n in (5, 1, 3, 2, 4)]
    chosen = middle(items)
    assert chosen is not None and chosen[0].sop_instance == "1.2.3.3" and chosen[1] == 1


# The last item's bytes are no dataset at all: pydicom warns as it gives up on them.
@pytest.mark.filterwarnings("ignore:Expected explicit VR:UserWarning")
def test_instances_without_pixels_are_skipped_and_none_is_none() -> None:
    items = [item(1), item(2, pixels=False), item(3, pixels=False)]
    chosen = middle(items)
    assert chosen is not None and chosen[0].sop_instance == "1.2.3.1"
    assert middle([item(1, pixels=False)]) is None
    assert middle([Item("1.2", "1.2.840.10008.1.2.1", b"\xff" * 10)]) is None


def test_a_multi_frame_instance_shows_its_middle_frame() -> None:
    chosen = middle([item(1, frames=5)])
    assert chosen is not None and chosen[1] == 3


def _expected(size: tuple[int, int] | None) -> bytes:
    by_number = sorted(
        CT, key=lambda i: int(rawds.decode_dataset(i.data, i.transfer_syntax).InstanceNumber)
    )
    mid = by_number[len(by_number) // 2]
    return render.render_frame(decode(mid.data, mid.transfer_syntax), 1, "image/png", size)


@pytest.fixture
async def web() -> AsyncIterator[tuple[DicomwebServer, ScriptedSource]]:
    async with scripted() as both:
        yield both


async def test_series_and_study_rendered_and_thumbnails(
    web: tuple[DicomwebServer, ScriptedSource],
) -> None:
    srv, source = web
    png = {"Accept": "image/png"}
    series = f"{srv.url}/studies/{STUDY}/series/{SERIES}"
    status, headers, body = await get(f"{series}/rendered", headers=png)
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert body == _expected(None)
    status, _, body = await get(f"{srv.url}/studies/{STUDY}/rendered", headers=png)
    assert status == 200 and body == _expected(None)
    status, _, body = await get(f"{srv.url}/studies/{STUDY}/thumbnail", headers=png)
    assert status == 200 and body == _expected(DEFAULT_THUMBNAIL)
    status, _, body = await get(f"{series}/thumbnail?viewport=32,32", headers=png)
    assert status == 200 and body == _expected((32, 32))
    inst = f"{series}/instances/{CT[0].sop_instance}"
    status, headers, _ = await get(f"{inst}/thumbnail")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    status, _, _ = await get(f"{inst}/frames/1/thumbnail", headers=png)
    assert status == 200
    assert source.retrieves == 1  # one series retrieval for all of it
    assert (await get(f"{series}/rendered", headers={"Accept": "image/gif"}))[0] == 406
    assert (await get(f"{series}/rendered?viewport=0,9"))[0] == 400
    assert (await get(f"{srv.url}/studies/1.2.3/rendered"))[0] == 404
    assert (await get(f"{srv.url}/studies/{STUDY}/series/1.2.3/thumbnail"))[0] == 404
    source.down = True
    assert (await get(f"{srv.url}/studies/{STUDY}/series/9.9/rendered"))[0] == 502


async def test_renders_wait_for_a_cpu_slot(web: tuple[DicomwebServer, ScriptedSource]) -> None:
    """Rendering is CPU-bound: it takes one of the encoders' slots, so renders at once
    are bounded whoever asks for how many."""
    srv, _ = web
    inst = f"{srv.url}/studies/{STUDY}/series/{SERIES}/instances/{CT[0].sop_instance}"
    assert (await get(f"{inst}/rendered"))[0] == 200  # retrieved: the next one is quick
    slots = srv.service.encoders
    taken = 0
    while not slots.locked():
        await slots.acquire()
        taken += 1
    pending = asyncio.ensure_future(get(f"{inst}/rendered"))
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(pending), 0.3)
    finally:
        for _ in range(taken):
            slots.release()
    status, _, body = await pending
    assert status == 200 and body[:2] == b"\xff\xd8"  # a JPEG


async def test_quality_is_taken_and_checked(web: tuple[DicomwebServer, ScriptedSource]) -> None:
    srv, _ = web
    inst = f"{srv.url}/studies/{STUDY}/series/{SERIES}/instances/{CT[0].sop_instance}"
    sizes = []
    for q in (5, 95):
        status, headers, body = await get(f"{inst}/rendered?quality={q}")
        assert status == 200 and headers["Content-Type"] == "image/jpeg"
        sizes.append(len(body))
    assert sizes[0] < sizes[1]
    for bad in ("0", "101", "high", ""):
        status, _, body = await get(f"{inst}/thumbnail?quality={bad}")
        assert status == 400 and b"quality" in body, bad


async def test_thumbnails_are_bounded_as_rendered_frames_are(
    web: tuple[DicomwebServer, ScriptedSource], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A series whose images claim a frame over MAX_FRAME_VALUES: every thumbnail and
    rendering of it is refused from the header (406), nothing decoded; a multi-frame
    instance's thumbnail decodes its middle frame only."""
    srv, _ = web
    decoded: list[bytes] = []  # the Pixel Data of each dataset decoded
    real = pixel_array

    def counted(ds: Dataset, index: int | None = None) -> object:
        assert index is None and "NumberOfFrames" not in ds  # a dataset of that frame
        decoded.append(bytes(ds.PixelData))
        return real(ds, index=index)

    monkeypatch.setattr(render, "pixel_array", counted)
    huge = []
    for inst in server_module.CT:
        ds = rawds.decode_dataset(inst.data, inst.transfer_syntax)
        ds.Rows = ds.Columns = 6000  # 36 M values claimed by a few KB
        huge.append(dataclasses.replace(inst, data=rawds.encode_dataset(ds)))
    monkeypatch.setattr(server_module, "CT", huge)
    series = f"{srv.url}/studies/{STUDY}/series/{SERIES}"
    for url in (f"{srv.url}/studies/{STUDY}/thumbnail", f"{series}/thumbnail",
                f"{series}/instances/{CT[0].sop_instance}/frames/1/thumbnail"):  # fmt: skip
        status, _, body = await get(url)
        assert status == 406 and b"more than" in body, (url, body)
    assert decoded == []


def test_a_multi_frame_thumbnail_decodes_its_middle_frame_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decoded: list[bytes] = []  # the Pixel Data of each dataset decoded
    real = pixel_array

    def counted(ds: Dataset, index: int | None = None) -> object:
        assert index is None and "NumberOfFrames" not in ds  # a dataset of that frame
        decoded.append(bytes(ds.PixelData))
        return real(ds, index=index)

    monkeypatch.setattr(render, "pixel_array", counted)
    base = rawds.decode_dataset(CT[0].data, CT[0].transfer_syntax)
    base.NumberOfFrames = 5
    one = len(base.PixelData)
    base.PixelData = b"".join(bytes([n]) * one for n in range(5))  # frame n: bytes of n
    multi = Item("1.2.3.9", CT[0].transfer_syntax, rawds.encode_dataset(base))
    chosen = middle([multi])
    assert chosen is not None and chosen[1] == 3
    ds = decode(multi.data, multi.transfer_syntax)
    png = render.render_frame(ds, chosen[1], "image/png", DEFAULT_THUMBNAIL)
    assert png.startswith(b"\x89PNG") and decoded == [bytes([2]) * one]
