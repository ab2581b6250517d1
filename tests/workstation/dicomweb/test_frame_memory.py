"""One frame out of a multi-frame instance costs about that frame, not the instance: the
frames route and rendering cut the asked frame out of the Pixel Data value (views of the
fragments, the words around it swapped for big endian) instead of copying or joining every
frame first. Measured as tracemalloc's peak against the sizes, a ratio, never a time."""

from __future__ import annotations

import functools
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset

from relay.dicom import rawds
from relay.workstation.dicomweb import dicomjson, frames, render, thumbs
from relay.workstation.dicomweb.retrieve import decode
from relay_dev.samples import EncodedInstance
from tests.workstation.dicomweb.test_frame_syntaxes import (
    BE,
    CT_CLASS,
    DEFLATED_FRAMES,
    ELE,
    ENCAPS,
    decoded,
    encapsulated,
    image,
)

COUNT, SIDE = 64, 256  # 64 frames of 128 KiB: an 8 MiB instance
VALUES = (
    (np.arange(COUNT * SIDE * SIDE, dtype=np.uint32) % 4000)
    .astype("<u2")
    .reshape(COUNT, SIDE, SIDE)
)
FRAME = VALUES[0].nbytes


def held(ts: str) -> bytes:
    """The 64 frames stored as `ts`: the bytes the server holds of the instance."""
    ds = image("1.2.9.50", 16)
    ds.NumberOfFrames = COUNT
    ds.Rows = ds.Columns = SIDE
    if ts == ENCAPS:
        encapsulated(ds, [f.tobytes() for f in VALUES])
    elif ts == DEFLATED_FRAMES:
        encapsulated(ds, [zlib.compress(f.tobytes(), 1) for f in VALUES])
    else:
        order = ">u2" if ts == BE else "<u2"
        ds.PixelData = VALUES.astype(order).tobytes()
        ds["PixelData"].VR = "OW"
    return rawds.encode_dataset(ds, BE if ts == BE else ELE)


def instance(ts: str) -> Dataset:
    """The 64 frames stored as `ts`, decoded as the server decodes an instance."""
    return decode(held(ts), ts)


def peak(work: Callable[[], Any]) -> int:
    """Bytes allocated at most while `work` runs, beyond what was held before."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        work()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("ts", [ENCAPS, BE, ELE, DEFLATED_FRAMES])
def test_one_frame_costs_about_one_frame(ts: str) -> None:
    ds = instance(ts)
    [frame] = frames.get_frames(ds, ts, [37])
    want = VALUES[36].tobytes() if ts != DEFLATED_FRAMES else zlib.compress(VALUES[36].tobytes(), 1)
    assert frame == want
    size = len(frame)
    # was: every frame copied (Encapsulated Uncompressed twice, big endian swapped whole)
    assert peak(lambda: frames.get_frames(ds, ts, [37])) < 3 * size


@pytest.mark.parametrize("ts", [ENCAPS, BE, ELE, DEFLATED_FRAMES])
def test_a_frame_comes_out_of_the_held_bytes(ts: str) -> None:
    """From the bytes held to the frame, as the frames route goes: the decoded dataset's
    Pixel Data is a view of them (pixelview.py), so the instance is not copied once
    more per request either (pydicom's read did: 1x the instance for one frame)."""
    data = held(ts)
    [frame] = frames.get_frames(decode(data, ts), ts, [37])
    size = len(frame)
    assert peak(lambda: frames.get_frames(decode(data, ts), ts, [37])) < 3 * size + 64 * 1024
    doc = dicomjson.to_json(decode(data, ts), bulk_base="http://127.0.0.1/x")
    assert "BulkDataURI" in doc["7FE00010"]
    assert peak(lambda: dicomjson.to_json(decode(data, ts), bulk_base="x")) < len(data) / 20


def test_looking_for_a_series_thumbnail_copies_no_image() -> None:
    """thumbs.image_of reads each instance of a series for its Instance Number and
    frames: pydicom's read copied each one's Pixel Data to look at its header."""
    data = held(ELE)
    assert thumbs.image_of(data, ELE) == (1, COUNT)
    assert peak(lambda: thumbs.image_of(data, ELE)) < len(data) / 20


def test_rendering_one_encapsulated_uncompressed_frame_copies_no_other() -> None:
    ds = instance(ENCAPS)
    value = len(ds.PixelData)
    used = peak(lambda: render.render_frame(ds, 37, "image/png"))
    # The frame's own decoding and windowing (float64) take ~14 frames; joining every
    # frame into one native value first took twice the value.
    assert used < 20 * FRAME < value / 2
    assert len(ds.PixelData) == value  # the caller's dataset untouched


def test_bulk_pixel_data_is_made_in_one_copy() -> None:
    for ts in (ENCAPS, BE):
        ds = instance(ts)
        value = frames.native_pixels(ds, ts)
        assert bytes(value) == VALUES.tobytes(), ts
        assert peak(functools.partial(frames.native_pixels, ds, ts)) < 1.1 * len(value), ts


def test_big_endian_frames_of_odd_size_are_cut_as_from_the_whole_value() -> None:
    """8-bit samples in big endian OW words with an odd frame size: a frame starts or ends
    inside a word; only the words around it are swapped, to the same bytes."""
    values = (np.arange(3 * 3 * 5) % 251).astype("u1").reshape(3, 3, 5)
    ds = image("1.2.9.51", 8)
    ds.NumberOfFrames, ds.Rows, ds.Columns = 3, 3, 5
    raw = values.tobytes() + b"\0"  # 45 bytes, padded to whole words
    ds.PixelData = np.frombuffer(raw, "<u2").byteswap().tobytes()
    ds["PixelData"].VR = "OW"
    back = decoded(EncodedInstance(CT_CLASS, "1.2.9.51", BE, rawds.encode_dataset(ds, BE)))
    assert frames.get_frames(back, BE, [2, 3, 1]) == [values[i].tobytes() for i in (1, 2, 0)]
    assert frames.native_pixels(back, BE)[:45] == values.tobytes()


def test_fragments_grouped_by_the_offset_table_are_still_joined_into_frames() -> None:
    """Two fragments a frame, as the Basic Offset Table says: pydicom's grouping, each
    frame asked for joined, the others only passed over."""
    ds = instance(DEFLATED_FRAMES)
    ds.NumberOfFrames = 2
    table = np.array([0, 8 + 4 + 8 + 2], "<u4").tobytes()  # frame 1: AAAA + BB
    items = b"".join(
        b"\xfe\xff\x00\xe0" + len(v).to_bytes(4, "little") + v
        for v in (table, b"AAAA", b"BB", b"CCCCCC")
    )
    ds.PixelData = items
    assert frames.get_frames(ds, DEFLATED_FRAMES, [2, 1]) == [b"CCCCCC", b"AAAABB"]
    ds.NumberOfFrames = 3
    with pytest.raises(frames.Unservable):
        frames.get_frames(ds, DEFLATED_FRAMES, [1])
    with pytest.raises(frames.Unservable, match="one fragment each"):
        frames.get_frames(ds, ENCAPS, [1])  # Encapsulated Uncompressed: one fragment a frame
