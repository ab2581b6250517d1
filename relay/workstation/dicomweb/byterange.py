"""HTTP byte ranges (RFC 9110 section 14) for one encoded frame, sans-I/O.

Cornerstone's progressive loader (OHIF 3.13, `rangeIndex` retrieve options) fetches an
HTJ2K frame in two requests: `Range: bytes=0-N` for a first, lower-resolution decode,
then `bytes=N+1-` for the rest, and appends the two bodies. It sends one range per
request and reads the total from `Content-Range: bytes a-b/total`. So the relay answers
exactly one range; a header with several ranges, another unit or a syntax error is
ignored (the whole frame, 200: RFC 9110 allows a server to ignore Range), a range that
starts past the end is `Unsatisfiable` (416 with `Content-Range: bytes */total`).
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["Unsatisfiable", "content_range", "first_chunk", "parse_range"]

_ONE: Final = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE | re.ASCII)
_MAX_DIGITS: Final = 18  # no range of ours has more; longer is not parsed as a number


class Unsatisfiable(ValueError):
    """A well-formed range that selects no byte of the representation (416)."""


def parse_range(header: str | None, total: int) -> tuple[int, int] | None:
    """The one range `header` selects of `total` bytes as (first, last), inclusive;
    None: no usable Range header (serve the whole)."""
    if header is None:
        return None
    m = _ONE.match(header)
    if m is None:  # several ranges, another unit, garbage: ignored
        return None
    first_text, last_text = m.group(1), m.group(2)
    if len(first_text) > _MAX_DIGITS or len(last_text) > _MAX_DIGITS:
        return None
    if not first_text:
        if not last_text:
            return None  # "bytes=-" is not a range
        suffix = int(last_text)  # bytes=-N: the last N bytes
        if suffix == 0 or total == 0:
            raise Unsatisfiable(f"bytes=-{suffix} of {total}")
        return max(0, total - suffix), total - 1
    first = int(first_text)
    if last_text and int(last_text) < first:
        return None  # invalid: ignored, as RFC 9110 14.1.1 says
    last = int(last_text) if last_text else total - 1
    if first >= total:
        raise Unsatisfiable(f"bytes={first}- of {total}")
    return first, min(last, total - 1)


def first_chunk(header: str | None) -> bool:
    """Whether `header` asks for a frame's first bytes (`bytes=0-N`): cornerstone's first
    progressive stage, which only the viewport sends (its prefetcher asks for whole
    frames), so the image the radiologist is looking at (retrieve.py: jump ahead)."""
    m = _ONE.match(header or "")
    return m is not None and m.group(1) == "0" and bool(m.group(2))


def content_range(first: int, last: int, total: int) -> str:
    return f"bytes {first}-{last}/{total}"
