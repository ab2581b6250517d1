"""Rendered frames (PS3.18 section 8.3.5.1.4): one frame as image/jpeg or image/png.

For thumbnails and simple viewers. The frame asked for is cut out by frames.py into a
dataset of its own (every uncompressed syntax as a native single frame: Encapsulated
Uncompressed too, which pydicom 3.0 cannot decode; big endian layouts frames.py refuses
are refused here too) and decoded by pydicom (native data; the compressed syntaxes
pydicom can decode with the plug-ins installed), the VOI window of the dataset is
applied (Window Center/Width, else the frame's min..max), and Pillow encodes it. Pillow:
the maintained standard imaging library for Python, wheels for Windows, macOS and
Linux, JPEG and PNG built in; nothing else we have encodes either.
`viewport=W,H` scales down (never up), within MAX_SIDE; without one, a frame larger than
MAX_SIDE is scaled down to it too. Only the frame asked for is decoded, and a frame of
more than MAX_FRAME_VALUES values is refused before decoding: a compressed frame whose
header claims a huge image (a decompression bomb) costs nothing.
"""

from __future__ import annotations

import io
from typing import Final

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels.processing import apply_voi_lut
from pydicom.pixels.utils import pixel_array
from pydicom.uid import UID

from relay.workstation.dicomweb import frames

__all__ = ["MAX_FRAME_VALUES", "MAX_SIDE", "RenderError", "quality", "render_frame", "viewport"]

MAX_SIDE: Final = 4096  # px: the largest side of a rendered image (asked for or not)
# Rows x Columns x Samples per Pixel of a frame we decode to render (a 5.6k x 5.6k grey
# or 3.2k x 3.2k colour frame; mammograms are ~24 M): each value becomes 8 bytes
# (float64) while windowed, so at most 256 MiB per render.
MAX_FRAME_VALUES: Final = 1 << 25
FORMATS: Final = {"image/jpeg": "JPEG", "image/png": "PNG"}
_PIXEL_DATA: Final = 0x7FE00010
_NUMBER_OF_FRAMES: Final = 0x00280008
# What describes the instance's whole Pixel Data: not kept with one frame of it. Kept,
# pydicom cut the one frame by the whole value's Extended Offset Table (which it prefers
# to the value's own offsets), and no frame of such an instance rendered.
_WHOLE_VALUE: Final = frozenset({_PIXEL_DATA, _NUMBER_OF_FRAMES,
                                 0x7FE00001, 0x7FE00002, 0x7FE00003})  # fmt: skip


class RenderError(ValueError):
    """The frame cannot be rendered (no pixel data, an undecodable syntax)."""


def viewport(text: str | None) -> tuple[int, int] | None:
    """`viewport=W,H` -> (W, H); ValueError when malformed."""
    if text is None:
        return None
    parts = text.split(",")
    if len(parts) < 2 or not all(_whole(p) for p in parts[:2]):
        raise ValueError("expected viewport=WIDTH,HEIGHT")
    w, h = (int(p) for p in parts[:2])
    if not (1 <= w <= MAX_SIDE and 1 <= h <= MAX_SIDE):
        raise ValueError(f"viewport sides are 1 to {MAX_SIDE}")
    return w, h


def _whole(text: str) -> bool:
    """A whole number in ASCII digits (str.isdigit() also takes `²`, which int() refuses,
    and other scripts' digits), of a size int() reads at once."""
    digits = text.strip()
    return digits.isascii() and digits.isdigit() and len(digits) <= 9


def quality(text: str | None) -> int | None:
    """`quality=Q` (PS3.18 8.3.5.1.3: 1 to 100, for a lossy format) -> Q; ValueError when
    malformed."""
    if text is None:
        return None
    if not _whole(text) or not 1 <= int(text) <= 100:
        raise ValueError("expected quality=1 to 100")
    return int(text)


def render_frame(
    ds: Dataset,
    number: int,
    media_type: str,
    size: tuple[int, int] | None = None,
    jpeg_quality: int | None = None,
) -> bytes:
    """Frame `number` (1-based) as `media_type` (image/jpeg or image/png); `jpeg_quality`
    for JPEG (Pillow's default without)."""
    if "PixelData" not in ds:
        raise RenderError("the instance has no pixel data")
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if not 1 <= number <= count:
        raise RenderError(f"frame {number} is past the last frame ({count})")
    _check_frame_size(ds)
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    try:  # this frame only: a multi-frame instance is not decoded whole for one of them
        frames.check(ds, ts)
        try:
            [raw] = frames.get_frames(ds, ts, [number])
        except frames.BitPacked:  # pydicom 3.0's index= cannot cut these either
            raw = frames.bit_packed_frame(ds, number)
        ds = _one_frame(ds, ts, raw)
    except (frames.FrameError, frames.Unservable) as exc:
        raise RenderError(f"cannot decode the pixel data: {exc}") from None
    try:
        frame = pixel_array(ds)
    except Exception as exc:
        raise RenderError(f"cannot decode the pixel data: {type(exc).__name__}") from None
    colour = int(ds.get("SamplesPerPixel", 1) or 1) > 1
    if colour:
        image = Image.fromarray(_to_uint8(frame.astype(np.float64)), "RGB")
    else:
        windowed = apply_voi_lut(frame, ds) if "WindowCenter" in ds else frame
        grey = _to_uint8(np.asarray(windowed, dtype=np.float64))
        if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
            grey = 255 - grey
        image = Image.fromarray(grey, "L")
    image.thumbnail(size or (MAX_SIDE, MAX_SIDE))
    out = io.BytesIO()
    if media_type == "image/jpeg" and jpeg_quality is not None:
        image.save(out, FORMATS[media_type], quality=jpeg_quality)
    else:
        image.save(out, FORMATS[media_type])
    return out.getvalue()


def _check_frame_size(ds: Dataset) -> None:
    """Refuse a frame too large to decode, from its header alone (before any decoding)."""
    try:
        values = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise RenderError("the instance has no usable Rows/Columns") from None
    if values > MAX_FRAME_VALUES:
        raise RenderError(f"a frame of {values} values is more than {MAX_FRAME_VALUES}: "
                          "not rendered")  # fmt: skip


def _one_frame(ds: Dataset, transfer_syntax: str, frame: bytes) -> Dataset:
    """A copy of `ds` whose Pixel Data is one `frame` of it alone: uncompressed, as a
    native Explicit VR LE value (pydicom 3.0 cannot decode Encapsulated Uncompressed);
    compressed, as one encapsulated frame in its syntax. The other frames are neither
    copied nor joined, and pydicom decodes bytes, never the view of the held instance
    (pixelview.py) that `ds` may hold. The caller's dataset is left as it is."""
    out = Dataset()
    for elem in ds:
        if elem.tag not in _WHOLE_VALUE:  # the Extended Offset Table too
            out.add(elem)
    out.file_meta = FileMetaDataset()
    out.file_meta.TransferSyntaxUID = UID(frames.frame_syntax(transfer_syntax))
    if frames.uncompressed(transfer_syntax):
        out.add_new(_PIXEL_DATA, "OB" if int(ds.BitsAllocated) <= 8 else "OW", frame)
    else:
        out.add_new(_PIXEL_DATA, "OB", encapsulate([frame]))
        out[_PIXEL_DATA].is_undefined_length = True
    return out


def _to_uint8(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values - low) * (255.0 / (high - low))
    return np.clip(scaled, 0, 255).astype(np.uint8)
