"""Lossless transport codecs for native pixel data (agent and workstation only).

The agent may send an instance's pixel data encoded with a lossless image codec (JPEG-LS,
HTJ2K or JPEG XL, from imagecodecs) instead of zstd; the workstation decodes it and rebuilds the
PACS's exact bytes. `pixels` finds and encodes the pixel data (pure functions), `choice`
decides per instance which codec the link deserves (a pure function of measured rates).
The gateway never imports this package. imagecodecs and numpy load on first use, so a
process that never sees an encoded instance does not pay for them.
"""

from __future__ import annotations

from relay.codecs.pixels import (
    CODECS,
    PROVEN_CODECS,
    EncodedPixels,
    PixelCodecError,
    PixelFormat,
    PixelLayout,
    available,
    decode,
    encode,
    find_pixels,
    proven,
    round_trips,
    supports,
    takes,
)

__all__ = [
    "CODECS",
    "PROVEN_CODECS",
    "EncodedPixels",
    "PixelCodecError",
    "PixelFormat",
    "PixelLayout",
    "available",
    "decode",
    "encode",
    "find_pixels",
    "proven",
    "round_trips",
    "supports",
    "takes",
]
