"""Where each frame of encapsulated Pixel Data is, found once per held instance (sans-I/O).

A frame of an instance stored one fragment a frame (Encapsulated Uncompressed always,
most compressed multi-frame data) is found by walking the value's item headers. OHIF
asks a multi-frame instance's frames one request each, and each request walked them all:
the frames of an instance cost its frame count squared. A `FrameTable` is one walk's
result, each frame's start and size (12 bytes a frame), checked against the item header
in front of a frame each time it is used (a table never cuts a value it was not made
from). The `FragmentIndex` of a held instance (retrieve.SeriesItem) keeps its table for
the instance's next requests: it lives and goes with the instance, and its bytes count
against dicomweb.hold_size with it (`on_built`, which the series flight sets). A decoded
dataset carries its instance's index (`attach`), so that every cutter of frames (the
frames endpoint, rendering, bulk data) finds it.
"""

from __future__ import annotations

import struct
import threading
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from pydicom.dataset import Dataset

__all__ = ["FragmentIndex", "FrameTable", "attach", "index_of", "one_per_fragment", "walk"]

_ITEM: Final = (0xFFFE, 0xE000)
_SEQUENCE_END: Final = (0xFFFE, 0xE0DD)
_ATTRIBUTE: Final = "_relay_fragment_index"  # where a decoded dataset carries its index


def walk(value: memoryview) -> tuple[array[int], array[int]] | None:
    """Where each item's bytes start in an encapsulated value and how many they are (the
    Basic Offset Table first); None when it does not parse as items (left to pydicom)."""
    starts, sizes = array("Q"), array("I")
    pos = 0
    while pos + 8 <= len(value):
        group, element, length = struct.unpack_from("<HHL", value, pos)
        if (group, element) == _SEQUENCE_END:
            break
        pos += 8
        if (group, element) != _ITEM or length > len(value) - pos:
            return None
        starts.append(pos)
        sizes.append(length)
        pos += length
    return (starts, sizes) if starts else None


@dataclass(frozen=True)
class FrameTable:
    """Each frame's fragment in a value of `length` bytes: where its bytes start and how
    many they are; `uniform`: their common size, if they have one."""

    length: int
    starts: array[int]
    sizes: array[int]
    uniform: int | None

    @property
    def count(self) -> int:
        return len(self.starts)

    @property
    def nbytes(self) -> int:
        """Memory the table holds (its arrays' items)."""
        return self.starts.itemsize * len(self.starts) + self.sizes.itemsize * len(self.sizes)

    def fits(self, value: memoryview, count: int) -> bool:
        """Whether the table is of a value like `value` (its length, its frame count)."""
        return self.length == len(value) and self.count == count

    def frame(self, value: memoryview, number: int) -> memoryview | None:
        """Frame `number`'s fragment as a view of `value`; None when the item header in
        front of it is not the one the table was made from (another value)."""
        start, size = self.starts[number - 1], self.sizes[number - 1]
        if start < 8 or start + size > len(value):
            return None
        if struct.unpack_from("<HHL", value, start - 8) != (*_ITEM, size):
            return None
        return value[start : start + size]


def one_per_fragment(value: memoryview, count: int) -> FrameTable | None:
    """The table of a value holding `count` fragments whose offset table, if any, says
    one frame each (Encapsulated Uncompressed always; most compressed multi-frame data);
    else None."""
    found = walk(value)
    if found is None or len(found[0]) - 1 != count or found[1][0] % 4:
        return None
    starts, sizes = found[0][1:], found[1][1:]
    if found[1][0]:  # the Basic Offset Table: each frame's item from the first one's
        offsets = struct.unpack_from(f"<{found[1][0] // 4}L", value, found[0][0])
        first = starts[0] - 8
        if [s - 8 - first for s in starts] != list(offsets):
            return None
    uniform = sizes[0] if min(sizes) == max(sizes) else None
    return FrameTable(len(value), starts, sizes, uniform)


class FragmentIndex:
    """One held instance's frame table, made by the first request that needs it and used
    by the next ones; thread-safe (frames are cut in worker threads): requests arriving
    while it is made wait for it rather than walk the value too. `on_built(nbytes)` is
    called once, from the thread that made it, so that its memory is counted."""

    def __init__(self, on_built: Callable[[int], None] | None = None) -> None:
        self.on_built = on_built
        self._lock = threading.Lock()
        self._table: FrameTable | None = None
        self._none_for: tuple[int, int] | None = None  # (length, count) that has none

    @property
    def nbytes(self) -> int:
        table = self._table
        return table.nbytes if table is not None else 0

    def table(self, value: memoryview, count: int) -> FrameTable | None:
        """The value's frame table (None: not one fragment a frame), walked at most once
        for the instance while the value is the same."""
        with self._lock:
            table = self._table
            if table is not None and table.fits(value, count):
                return table
            if self._none_for == (len(value), count):
                return None
            made = one_per_fragment(value, count)
            if made is None:
                self._none_for = (len(value), count)
                return None
            grew = made.nbytes - (table.nbytes if table is not None else 0)
            self._table = made
        if grew and self.on_built is not None:
            self.on_built(grew)
        return made


def attach(ds: Dataset, index: FragmentIndex) -> None:
    """Have `ds` (a decoded instance) carry its instance's index."""
    object.__setattr__(ds, _ATTRIBUTE, index)


def index_of(ds: Dataset) -> FragmentIndex | None:
    found = ds.__dict__.get(_ATTRIBUTE)
    return found if isinstance(found, FragmentIndex) else None
