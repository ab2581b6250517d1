"""Which frame stands for a series or a study in a rendered thumbnail (no I/O here).

A series is shown by its middle image: the instances with pixel data ordered by
Instance Number (then SOP Instance UID, for a stable choice), the middle one, and in a
multi-frame instance its middle frame. A study is shown by its first series (by Series
Number) that has an image at all; at most MAX_SERIES_TRIED series are looked at, since
each may have to be retrieved.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Protocol, TypeVar

from relay.workstation.dicomweb import pixelview

__all__ = ["DEFAULT_THUMBNAIL", "MAX_SERIES_TRIED", "image_of", "middle_frame"]

MAX_SERIES_TRIED: Final = 3
DEFAULT_THUMBNAIL: Final = (128, 128)  # /thumbnail without a viewport


class Named(Protocol):
    @property
    def sop_instance(self) -> str: ...


T = TypeVar("T", bound=Named)


def _number(value: object) -> int:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return 0


def image_of(data: bytes, transfer_syntax: str) -> tuple[int, int] | None:
    """(Instance Number, number of frames) of an instance with pixel data; None for one
    without (a report, say) or that does not decode. Called per instance, so that a large
    series is looked at one instance's bytes at a time."""
    try:  # Pixel Data as a view: looking at a series copies none of its images
        ds = pixelview.read(data, transfer_syntax)
    except Exception:  # an undecodable instance is no candidate
        return None
    if "PixelData" not in ds:
        return None
    return _number(ds.get("InstanceNumber")), max(1, _number(ds.get("NumberOfFrames", 1) or 1))


def middle_frame(images: Sequence[tuple[T, int, int]]) -> tuple[T, int] | None:
    """The instance and frame number (1-based) in the middle of `images` (each: the item,
    its Instance Number and frames, from image_of); None without any."""
    if not images:
        return None
    ordered = sorted(images, key=lambda x: (x[1], x[0].sop_instance))
    chosen, _, frames = ordered[len(ordered) // 2]
    return chosen, frames // 2 + 1
