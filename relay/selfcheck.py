"""`relay self-check`: what a build of `relay` must be able to load, tried for real.

A frozen build (deploy/windows/relay.spec) carries only the modules PyInstaller found or
was told about; one left out fails only when it is first imported: the DICOMweb server
at start (ModuleNotFoundError), or imagecodecs, whose absence silently drops the pixel
codecs offered to none. So this imports the workstation's servers and round-trips a small
frame through each pixel codec and each image format served, and says what failed. The
hosted workflow runs it inside the built executables.
"""

from __future__ import annotations

import importlib
import io
from collections.abc import Callable

__all__ = ["MODULES", "run"]

# The workstation's entry points that import their dependencies at module level.
MODULES = (
    "relay.workstation.service",
    "relay.workstation.dicomweb.server",
    "relay.workstation.dicomweb.frames",
    "relay.workstation.dicomweb.render",
    "relay.trust.enroll",
    "keyring",
    "numpy",
    "imagecodecs",
    "PIL.Image",
)


def _importer(name: str) -> Callable[[], None]:
    def check() -> None:
        importlib.import_module(name)

    return check


def _pixel_codec(codec: str) -> Callable[[], None]:
    def check() -> None:
        from relay.codecs import pixels

        fmt = pixels.PixelFormat(
            rows=16, columns=16, samples=1, bits=16, signed=False, planar=0, frames=1
        )
        # 12-bit values, little-endian (a CT's range; within JPEGXL_MAX_SPAN)
        data = b"".join(((i * 37) % 4000).to_bytes(2, "little") for i in range(16 * 16))
        encoded = pixels.encode(fmt, data, codec)
        if encoded is None:
            raise RuntimeError(f"{codec} did not encode a 16x16 frame")
        if pixels.decode(encoded) != data:
            raise RuntimeError(f"{codec} did not give the frame back")

    return check


def _image_format(name: str) -> Callable[[], None]:
    def check() -> None:
        from PIL import Image

        out = io.BytesIO()
        Image.new("L", (16, 16), 128).save(out, format=name)
        with Image.open(io.BytesIO(out.getvalue())) as back:
            back.load()

    return check


def run() -> int:
    """0 if everything loads and works; 1 with one line per failure."""
    from relay.codecs.pixels import CODECS

    checks = [(f"import {name}", _importer(name)) for name in MODULES]
    checks += [(f"pixel codec {c}", _pixel_codec(c)) for c in CODECS]
    checks += [(f"image {f}", _image_format(f)) for f in ("JPEG", "PNG")]
    failed = 0
    for what, check in checks:
        try:
            check()
        except Exception as exc:
            failed += 1
            print(f"FAIL {what}: {type(exc).__name__}: {exc}")
        else:
            print(f"ok   {what}")
    return 1 if failed else 0
