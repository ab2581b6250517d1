"""Frames out of an instance's Pixel Data, as stored (sans-I/O; PS3.18 section 8.3.5.1.3).

Native pixel data is cut into frames of Rows x Columns x SamplesPerPixel x
BitsAllocated/8 bytes (the bytes as the PACS stored them, little endian); encapsulated
pixel data yields each frame's compressed bytes. Frame numbers are 1-based; a number
past the last frame is a `FrameError` (the HTTP layer answers 404), a malformed list 400.
"""

from __future__ import annotations

from typing import Final

from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames

from relay.workstation.dicomweb.media import FRAME_TYPES

__all__ = ["FrameError", "frame_numbers", "get_frames"]

MAX_FRAMES_PER_REQUEST: Final = 4096


class FrameError(ValueError):
    """No such frame (404), or no pixel data."""


def frame_numbers(text: str) -> list[int]:
    """`1,2,3` -> [1, 2, 3]; ValueError naming what is wrong (a repeat included: an answer
    holds each frame at most once, so it is never larger than the instance's pixels)."""
    items = text.split(",")
    if len(items) > MAX_FRAMES_PER_REQUEST:
        raise ValueError(f"more than {MAX_FRAMES_PER_REQUEST} frames in one request")
    out: dict[int, None] = {}
    for raw in items:
        item = raw.strip()
        if not item.isdigit() or len(item) > 9 or int(item) < 1:
            raise ValueError(f"frame numbers are whole numbers from 1, got {item[:20]!r}")
        if int(item) in out:  # each would be a copy of the frame in one answer
            raise ValueError(f"frame {int(item)} is asked for twice")
        out[int(item)] = None
    return list(out)


def is_encapsulated(transfer_syntax: str) -> bool:
    return transfer_syntax in FRAME_TYPES or transfer_syntax.startswith("1.2.840.10008.1.2.4.")


def get_frames(ds: Dataset, transfer_syntax: str, numbers: list[int]) -> list[bytes]:
    """The frames `numbers` of the dataset's Pixel Data, in that order."""
    value = ds.get("PixelData")
    if not isinstance(value, bytes | bytearray) or not value:
        raise FrameError("the instance has no pixel data")
    data = bytes(value)
    count = int(ds.get("NumberOfFrames", 1) or 1)
    for n in numbers:
        if n > count:
            raise FrameError(f"frame {n} is past the last frame ({count})")
    if is_encapsulated(transfer_syntax):
        frames = list(generate_frames(data, number_of_frames=count))
        return [frames[n - 1] for n in numbers]
    rows, cols = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.BitsAllocated)
    if bits % 8:
        if bits != 1:
            raise FrameError(f"cannot cut frames of {bits} bits allocated")
        size_bits = rows * cols * samples
        if count > 1 and size_bits % 8:
            raise FrameError("1-bit frames that do not end on a byte boundary")
        size = (size_bits + 7) // 8
    else:
        size = rows * cols * samples * bits // 8
    if size <= 0 or len(data) < size * count:
        raise FrameError("the pixel data is shorter than its frames")
    return [data[(n - 1) * size : n * size] for n in numbers]
