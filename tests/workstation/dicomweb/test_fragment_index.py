"""The frames of an encapsulated multi-frame instance: its item headers are walked once
for all of its frame requests (OHIF asks them one request each; each walked the whole
value, so an instance's frames cost its frame count squared), and the table so made is
counted in the holding area with the instance, never used to cut another value."""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator, Iterator

import numpy as np
import pytest
from pydicom.encaps import encapsulate

from relay.dicom import rawds
from relay.workstation.dicomweb import fragments
from relay.workstation.dicomweb.fragments import FragmentIndex
from relay.workstation.dicomweb.server import DicomwebServer
from relay_dev.samples import EncodedInstance
from tests.workstation.dicomweb import test_server
from tests.workstation.dicomweb.test_frame_syntaxes import image
from tests.workstation.dicomweb.test_server import SERIES, STUDY, get, parts

ELE = "1.2.840.10008.1.2.1"
ENCAPS = "1.2.840.10008.1.2.1.98"  # Encapsulated Uncompressed Explicit VR Little Endian
DEFLATED_FRAMES = "1.2.840.10008.1.2.8.1"  # Deflated Image Frame Compression
OHIF = {"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}
FRAMES, ROWS, COLS = 12, 16, 15
VALUES = (np.arange(FRAMES * ROWS * COLS) * 5 % 256).astype(np.uint8).reshape(FRAMES, ROWS, COLS)


def stored(ts: str, sop: str) -> tuple[EncodedInstance, list[bytes]]:
    """FRAMES frames one fragment each, with an offset table; and what each frame is."""
    ds = image(sop, 8)
    ds.NumberOfFrames = FRAMES
    if ts == ENCAPS:  # the frames, each padded to even in its fragment
        frames = [f.tobytes() for f in VALUES]
    else:  # served as stored: each fragment, pad byte and all
        frames = [(z := zlib.compress(f.tobytes())) + b"\0" * (len(z) % 2) for f in VALUES]
    ds.PixelData = encapsulate([f + b"\0" * (len(f) % 2) for f in frames], has_bot=True)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return EncodedInstance(ds.SOPClassUID, sop, ts, rawds.encode_dataset(ds, ELE)), frames


CASES = {"1.2.9.60": stored(DEFLATED_FRAMES, "1.2.9.60"), "1.2.9.61": stored(ENCAPS, "1.2.9.61")}


@pytest.fixture
def walks(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Each walk of a value's item headers, by its length."""
    seen: list[int] = []
    walk = fragments.walk

    def counted(value: memoryview) -> object:
        seen.append(len(value))
        return walk(value)

    monkeypatch.setattr(fragments, "walk", counted)
    yield seen


@pytest.fixture
async def web() -> AsyncIterator[DicomwebServer]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(test_server, "CT", [inst for inst, _ in CASES.values()])
        async with test_server.scripted() as (srv, _):
            yield srv


@pytest.mark.parametrize("sop", sorted(CASES))
async def test_frame_requests_of_an_instance_walk_its_fragments_once(
    web: DicomwebServer, walks: list[int], sop: str
) -> None:
    _, frames = CASES[sop]
    base = f"{web.url}/studies/{STUDY}/series/{SERIES}/instances/{sop}"
    for number in range(1, FRAMES + 1):
        status, headers, body = await get(f"{base}/frames/{number}", headers=OHIF)
        assert status == 200, body
        assert [frame for _, frame in parts(headers, body)] == [frames[number - 1]]
    assert len(walks) == 1  # it was FRAMES: one walk of every item header per request
    retriever = web.service.retriever
    flight = retriever.flights[(STUDY, SERIES)]
    item = flight.by_uid[sop]
    # its table counts in the holding area with it: 12 bytes a frame
    assert item.fragments.nbytes == 12 * FRAMES
    assert flight.size == sum(i.footprint for i in flight.items) + item.fragments.nbytes
    assert retriever.held == flight.size


async def test_rendering_and_bulk_data_use_the_same_table(
    web: DicomwebServer, walks: list[int]
) -> None:
    sop = "1.2.9.61"  # Encapsulated Uncompressed: rendered from its one fragment
    base = f"{web.url}/studies/{STUDY}/series/{SERIES}/instances/{sop}"
    for number in (3, 7):
        status, _, body = await get(f"{base}/frames/{number}/rendered",
                                    headers={"Accept": "image/png"})  # fmt: skip
        assert status == 200, body
    status, _, body = await get(f"{base}/bulk/7FE00010")
    assert status == 200, body
    assert len(walks) == 1


def test_a_table_never_cuts_a_value_it_was_not_made_from() -> None:
    _, frames = CASES["1.2.9.60"]
    value = memoryview(encapsulate(frames, has_bot=True))
    table = fragments.one_per_fragment(value, FRAMES)
    assert table is not None and bytes(table.frame(value, 2) or b"") == frames[1]
    changed = bytearray(value)  # same length, frame 1's item header not an item's
    changed[table.starts[0] - 8 : table.starts[0] - 4] = bytes(4)
    other = memoryview(changed)
    assert table.fits(other, FRAMES) and table.frame(other, 1) is None
    shorter = memoryview(encapsulate([b"ab", b"cd"], has_bot=True))
    index = FragmentIndex()
    assert index.table(value, FRAMES) is not None
    made = index.table(shorter, 2)  # another value: walked anew, the table replaced
    assert made is not None and bytes(made.frame(shorter, 2) or b"") == b"cd"


def test_the_tables_growth_is_reported_once(walks: list[int]) -> None:
    value = memoryview(encapsulate([b"ab", b"cd", b"ef"], has_bot=True))
    grown: list[int] = []
    index = FragmentIndex(on_built=grown.append)
    for _ in range(5):
        assert index.table(value, 3) is not None
    assert index.table(value, 4) is None and index.table(value, 4) is None  # not 4 frames
    assert grown == [36] and index.nbytes == 36 and len(walks) == 2
