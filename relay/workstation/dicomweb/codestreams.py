"""Encoded frames kept for their next byte range (issue 14), bounded: an LRU.

A progressive viewer asks for the same HTJ2K frame twice (a prefix, then the rest, see
byterange.py). The second request must get the rest of the *same* codestream and should
not pay for a second encoding, so each encoded frame is kept here keyed by (SOP Instance
UID, frame number, transfer syntax), within `max_entries` and `max_bytes` (the least
recently used go first; a codestream larger than `max_bytes` alone is not kept). The
encoder is deterministic, so a frame evicted between the two requests is encoded again
to the same bytes (test_progressive checks that); the ETag lets a client check it.
`obtain` encodes a frame once for the requests that want it at the same moment (the
viewport's first range and the prefetcher's whole frame often coincide). The LRU itself
is kept.py's `KeptBytes`.
"""

from __future__ import annotations

from typing import Final

from relay.workstation.dicomweb.kept import KeptBytes

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_ENTRIES", "CodestreamCache", "Key"]

DEFAULT_MAX_ENTRIES: Final = 512  # frames (a CT series of 512x512 slices: ~0.1 MB each)
DEFAULT_MAX_BYTES: Final = 64 * 1024 * 1024

Key = tuple[str, int, str]  # (SOP Instance UID, frame number from 1, transfer syntax)


class CodestreamCache(KeptBytes[Key]):
    """LRU of encoded frames; `hits`, `misses` and `evictions` are counted."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:  # fmt: skip
        super().__init__(max_entries, max_bytes)
