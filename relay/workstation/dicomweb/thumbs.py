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

from relay.dicom import rawds

__all__ = ["DEFAULT_THUMBNAIL", "MAX_SERIES_TRIED", "middle_frame"]

MAX_SERIES_TRIED: Final = 3
DEFAULT_THUMBNAIL: Final = (128, 128)  # /thumbnail without a viewport


class Encoded(Protocol):
    sop_instance: str
    transfer_syntax: str
    data: bytes


T = TypeVar("T", bound=Encoded)


def _number(value: object) -> int:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return 0


def middle_frame(items: Sequence[T]) -> tuple[T, int] | None:
    """The instance and frame number (1-based) in the middle of `items`; None without any
    image (a series of reports, say)."""
    images: list[tuple[int, str, T, int]] = []
    for item in items:
        try:
            ds = rawds.decode_dataset(item.data, item.transfer_syntax)
        except Exception:  # an undecodable instance is no candidate
            continue
        if "PixelData" not in ds:
            continue
        frames = max(1, _number(ds.get("NumberOfFrames", 1) or 1))
        images.append((_number(ds.get("InstanceNumber")), item.sop_instance, item, frames))
    if not images:
        return None
    images.sort(key=lambda x: (x[0], x[1]))
    _, _, chosen, frames = images[len(images) // 2]
    return chosen, frames // 2 + 1
