"""The `dicomweb:` section of the workstation's config (DESIGN.md sections 7 and 14).

A local web server reaches the hospital with this device's identity, so it listens on a
loopback address only; anything else stops start-up naming the file and the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from relay.ops.config import Address, GiB, MiB, Reader

__all__ = ["DicomwebConfig", "read_dicomweb"]

DEFAULT_MAX_UPLOAD: Final = 512 * MiB
DEFAULT_HOLD_SIZE: Final = 1 * GiB
DEFAULT_TIMEOUT: Final = 120.0
MAX_QUERY: Final = 8192  # characters in a query string (URL after `?`)

_LOOPBACK_ONLY = (
    "must be a loopback address (127.0.0.1, [::1] or localhost): a browser page from "
    "anywhere else could read studies with this device's identity"
)


@dataclass(frozen=True)
class DicomwebConfig:
    """`max_upload`: one STOW-RS request body; `hold_size`: instances retrieved for the
    browser and held in memory (series not served from the cache); `timeout`: seconds
    without progress from the agent before a request fails (504/502); `viewer_dir`: where
    the OHIF viewer was installed (None: the platform's data dir; relay.workstation.viewer)."""

    listen: Address
    viewer: bool = True
    max_upload: int = DEFAULT_MAX_UPLOAD
    hold_size: int = DEFAULT_HOLD_SIZE
    timeout: float = DEFAULT_TIMEOUT
    viewer_dir: Path | None = None
    # Series metadata from a headers-only retrieval (headfirst.py). Off by default since
    # the series' retrieval no longer waits for a survey: it then lost (docs/BENCHMARKS.md).
    headers_first: bool = False
    # The viewer fetches HTJ2K frames in two byte ranges (issue 14). Off by default: the
    # browser reads the workstation over loopback, where it gained no first image and cost
    # all images 1.35x (encoding and wasm decoding; docs/BENCHMARKS.md, viewer).
    progressive: bool = False


def read_dicomweb(r: Reader) -> DicomwebConfig | None:
    """`dicomweb: {listen, viewer, viewer_dir, max_upload, hold_size, timeout,
    headers_first, progressive}`; absent:
    None. `viewer_dir` is relative to the config file."""
    s = r.optional_section("dicomweb")
    if s is None:
        return None
    listen = s.address("listen", listen=True)
    if not listen.is_loopback:
        raise s.error("listen", f"{_LOOPBACK_ONLY}, got {listen}")
    viewer = s.boolean("viewer", True)
    viewer_dir = s.path("viewer_dir") if s.has("viewer_dir") else None
    max_upload = s.size("max_upload", DEFAULT_MAX_UPLOAD)
    if not 1 <= max_upload <= 16 * GiB:
        raise s.error("max_upload", "must be between 1 byte and 16GiB")
    hold_size = s.size("hold_size", DEFAULT_HOLD_SIZE)
    if not 1 * MiB <= hold_size <= 64 * GiB:
        raise s.error("hold_size", "must be between 1MiB and 64GiB")
    timeout = s.duration("timeout", DEFAULT_TIMEOUT, lo=1.0, hi=3600.0)
    headers_first = s.boolean("headers_first", False)
    progressive = s.boolean("progressive", False)
    return DicomwebConfig(listen, viewer, max_upload, hold_size, timeout, viewer_dir,
                          headers_first, progressive)  # fmt: skip
