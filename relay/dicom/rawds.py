"""Send a dataset's original bytes with pynetdicom, and check a dataset's structure.

pynetdicom only sends a pydicom `Dataset` that it encodes itself (the Q/R service classes
insist on a Dataset, and `send_c_store` re-encodes it). Re-encoding is not byte-identical:
pydicom drops group lengths, may change sequence length encoding, fixes odd lengths, and so
on. An `EncodedDataset` carries the PACS's bytes and their transfer syntax; the wrapper that
`install()` puts around pynetdicom's `encode` returns those bytes unchanged whenever the
presentation context uses that same encoding, and only decodes and re-encodes when
pynetdicom has picked a convertible uncompressed context (implicit <-> explicit VR), which
the peer asked for. Every other dataset goes to pynetdicom's own `encode` untouched.

tests/dicom/test_rawds.py proves the bytes arrive identical (with group lengths and
undefined-length sequences that pydicom would rewrite), so an upgrade of pynetdicom that
changes this hook fails loudly.
"""

from __future__ import annotations

import struct
import threading
import zlib
from collections.abc import Callable, Mapping
from io import BytesIO
from typing import Final

import pynetdicom.association
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import UID, ExplicitVRLittleEndian

_EncodeFn = Callable[..., bytes | None]
# What a deflated dataset may inflate to when the caller names no limit: only for bytes
# from the PACS or a local file. What a device sent is inflated with its codec's limit
# (DicomLimits.max_dataset for an instance, max_identifier for an identifier).
DEFAULT_MAX_INFLATED: Final = 1 << 30
_lock = threading.Lock()
_original_encode: _EncodeFn | None = None


def ts_encoding(transfer_syntax: str) -> tuple[bool, bool, bool]:
    """(implicit VR, little endian, deflated); private syntaxes count as explicit LE."""
    uid = UID(transfer_syntax)
    try:
        return uid.is_implicit_VR, uid.is_little_endian, uid.is_deflated
    except ValueError:
        return False, True, False


class EncodedDataset(Dataset):
    """A dataset known only by its encoded bytes, for pynetdicom to send as they are.

    Holds SOP Class/Instance UID and the transfer syntax in the usual places because
    pynetdicom reads them to pick a presentation context; nothing else is decoded.
    """

    def __init__(
        self,
        sop_class: str,
        sop_instance: str,
        transfer_syntax: str,
        data: bytes,
        *,
        max_inflated: int = DEFAULT_MAX_INFLATED,
    ):
        # Without the hook pynetdicom would encode only the two UIDs below and the peer
        # would store an empty instance with a success status: make sure it is in place
        # in every process that sends one (the agent's C-STORE path had no other caller).
        install()
        super().__init__()
        self.SOPClassUID = UID(sop_class)
        self.SOPInstanceUID = UID(sop_instance)
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = UID(transfer_syntax)
        meta.MediaStorageSOPClassUID = UID(sop_class)
        meta.MediaStorageSOPInstanceUID = UID(sop_instance)
        self.file_meta = meta
        self._relay_raw = data
        self._relay_ts = transfer_syntax
        self._relay_max_inflated = max_inflated  # if it must be decoded (`encoded_as`)

    @property
    def raw_bytes(self) -> bytes:
        raw: bytes = self._relay_raw
        return raw

    @property
    def raw_transfer_syntax(self) -> str:
        ts: str = self._relay_ts
        return ts

    def encoded_as(
        self, implicit: bool, little: bool, deflated: bool, fallback: _EncodeFn
    ) -> bytes | None:
        """The bytes to send in a context with this encoding: ours if it matches."""
        if ts_encoding(self._relay_ts) == (implicit, little, deflated):
            return self.raw_bytes
        # pynetdicom only converts between uncompressed syntaxes; decode, then re-encode.
        limit: int = self._relay_max_inflated
        ds = decode_dataset(self.raw_bytes, self._relay_ts, max_inflated=limit)
        return fallback(ds, implicit, little, deflated)


def decode_dataset(
    data: bytes, transfer_syntax: str, *, max_inflated: int = DEFAULT_MAX_INFLATED
) -> Dataset:
    """A pydicom Dataset from encoded bytes (inflating a deflated syntax, bounded)."""
    implicit, little, deflated = ts_encoding(transfer_syntax)
    if deflated:
        data = inflate(data, max_inflated)
    return read_dataset(BytesIO(data), implicit, little)


def readable(data: bytes, transfer_syntax: str, max_inflated: int) -> tuple[bytes, str]:
    """(bytes, syntax) a dataset is read in: a deflated one inflated (InflatedTooLarge
    past `max_inflated`, MalformedDataset for a bad deflate stream) and read as the
    explicit VR little endian it holds, so that checking and decoding it inflate once."""
    if not ts_encoding(transfer_syntax)[2]:
        return data, transfer_syntax
    try:
        return inflate(data, max_inflated), ExplicitVRLittleEndian
    except zlib.error as exc:
        raise MalformedDataset(f"bad deflate stream: {exc}") from None


def inflate(data: bytes, limit: int) -> bytes:
    """The inflated bytes of a deflated dataset; InflatedTooLarge past `limit` bytes (a
    small body may inflate a thousandfold: the limit bounds memory and time)."""
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    out = d.decompress(data, limit)
    if d.unconsumed_tail or (len(out) >= limit and not d.eof and d.decompress(b"", 1)):
        raise InflatedTooLarge(f"deflated dataset larger than {limit} bytes")
    return out


def _encode_hook(
    ds: Dataset, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False
) -> bytes | None:
    original = _original_encode
    assert original is not None
    if isinstance(ds, EncodedDataset):
        try:
            return ds.encoded_as(is_implicit_vr, is_little_endian, deflated, original)
        except Exception:  # pynetdicom expects None for "could not encode"
            return None
    return original(ds, is_implicit_vr, is_little_endian, deflated)


def install() -> None:
    """Route pynetdicom's C-STORE encoding through `_encode_hook` (idempotent)."""
    global _original_encode  # noqa: PLW0603  (one process-wide hook, set once)
    with _lock:
        current = getattr(pynetdicom.association, "encode")  # noqa: B009
        if current is _encode_hook:
            return
        _original_encode = current
        setattr(pynetdicom.association, "encode", _encode_hook)  # noqa: B010


# -- structural check -------------------------------------------------------------------


class MalformedDataset(ValueError):
    """Encoded bytes that are not a well-formed DICOM dataset."""


class SopClassMismatch(MalformedDataset):
    """A dataset whose SOP Class UID is not the one its DIMSE command names (a C-STORE's
    "Data Set does not match SOP Class", PS3.4 B.2.3)."""


class InflatedTooLarge(MalformedDataset):
    """A deflated dataset that inflates past the caller's limit."""


_LONG_VRS: Final = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_ITEM: Final = 0xFFFEE000
_ITEM_END: Final = 0xFFFEE00D
_SEQ_END: Final = 0xFFFEE0DD
_PIXEL_DATA: Final = 0x7FE00010
_MAX_DEPTH: Final = 32
_CAPTURE: Final = {0x00080016: "sop_class", 0x00080018: "sop_instance"}
# What an audit event names (PS3.15): the patient, the study, the series and the instance.
AUDIT_TAGS: Final = {
    0x00100020: "PatientID",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
}


class _Walker:
    """Walks element headers to check every length fits, without copying values."""

    def __init__(
        self, buf: bytes, implicit: bool, little: bool, capture: Mapping[int, str] = _CAPTURE
    ) -> None:
        self.buf = buf
        self.implicit = implicit
        self.capture = capture
        e = "<" if little else ">"
        self.u16 = struct.Struct(e + "H").unpack_from
        self.u32 = struct.Struct(e + "I").unpack_from
        self.captured: dict[str, str] = {}

    def tag(self, pos: int) -> int:
        group, elem = self.u16(self.buf, pos)[0], self.u16(self.buf, pos + 2)[0]
        return int(group << 16 | elem)

    def dataset(self, pos: int, end: int, depth: int, in_item: bool) -> int:
        """Walk elements from `pos`; stop at `end` or, inside an undefined item, at its end."""
        if depth > _MAX_DEPTH:
            raise MalformedDataset("sequences nested too deeply")
        buf = self.buf
        while pos < end:
            if end - pos < 8:
                raise MalformedDataset(f"{end - pos} stray bytes at offset {pos}")
            tag = self.tag(pos)
            if tag == _ITEM_END:
                if not in_item:
                    raise MalformedDataset(f"item delimiter outside an item at {pos}")
                return pos + 8
            if tag in (_ITEM, _SEQ_END):
                raise MalformedDataset(f"unexpected item tag at offset {pos}")
            vr: bytes | None = None
            if self.implicit:
                length = self.u32(buf, pos + 4)[0]
                pos += 8
            else:
                vr = buf[pos + 4 : pos + 6]
                if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
                    raise MalformedDataset(f"bad VR {vr!r} at offset {pos + 4}")
                if vr in _LONG_VRS:
                    if end - pos < 12:
                        raise MalformedDataset(f"truncated element header at {pos}")
                    length = self.u32(buf, pos + 8)[0]
                    pos += 12
                else:
                    length = self.u16(buf, pos + 6)[0]
                    pos += 8
            if length == 0xFFFFFFFF:
                if vr is not None and vr not in (b"SQ", b"UN", b"OB", b"OW"):
                    raise MalformedDataset(f"undefined length with VR {vr!r}")
                fragments = tag == _PIXEL_DATA or vr in (b"OB", b"OW")
                # PS3.5 6.2.2: items of an undefined-length UN are implicit VR LE.
                walker = _Walker(buf, True, True) if vr == b"UN" else self
                pos = walker.items(pos, end, depth, fragments, until_delimiter=True)
                continue
            if pos + length > end:
                raise MalformedDataset(
                    f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) of {length} bytes runs "
                    f"past the end at offset {pos}"
                )
            if vr == b"SQ":
                self.items(pos, pos + length, depth, False, until_delimiter=False)
            elif depth == 0 and tag in self.capture:
                self.captured[self.capture[tag]] = (
                    buf[pos : pos + length].strip(b"\x00 ").decode("utf-8", "replace")
                )
            pos += length
        if in_item:
            raise MalformedDataset("item without its delimiter")
        return pos

    def items(
        self, pos: int, end: int, depth: int, fragments: bool, *, until_delimiter: bool
    ) -> int:
        while pos < end:
            if end - pos < 8:
                raise MalformedDataset(f"truncated item header at {pos}")
            tag = self.tag(pos)
            length = self.u32(self.buf, pos + 4)[0]
            pos += 8
            if tag == _SEQ_END:
                if not until_delimiter:
                    raise MalformedDataset(f"sequence delimiter in a defined sequence at {pos}")
                return pos
            if tag != _ITEM:
                raise MalformedDataset(f"expected an item at offset {pos - 8}")
            if length == 0xFFFFFFFF:
                if fragments:
                    raise MalformedDataset("pixel data fragment of undefined length")
                pos = self.dataset(pos, end, depth + 1, in_item=True)
                continue
            if pos + length > end:
                raise MalformedDataset(f"item of {length} bytes runs past the end at {pos}")
            if not fragments:
                self.dataset(pos, pos + length, depth + 1, in_item=False)
            pos += length
        if until_delimiter:
            raise MalformedDataset("sequence without its delimiter")
        return pos


def check_dataset(
    data: bytes,
    transfer_syntax: str,
    *,
    max_inflated: int = DEFAULT_MAX_INFLATED,
    capture: Mapping[int, str] = _CAPTURE,
) -> dict[str, str]:
    """Raise MalformedDataset unless `data` is a structurally sound dataset.

    Checks every element and item length against the data and the nesting of sequences and
    encapsulated pixel data, in one pass without copying values. Returns the text of the
    top-level elements named in `capture` ({tag: key}) that it saw; by default the SOP
    Class and Instance UIDs (keys "sop_class", "sop_instance"). Pixel data is never read,
    so `capture=AUDIT_TAGS` is how an instance's audit keys are found cheaply.
    """
    data, transfer_syntax = readable(data, transfer_syntax, max_inflated)
    implicit, little, _ = ts_encoding(transfer_syntax)
    if not data:
        raise MalformedDataset("empty dataset")
    walker = _Walker(data, implicit, little, capture)
    walker.dataset(0, len(data), 0, in_item=False)
    return walker.captured


def check_instance(
    data: bytes,
    transfer_syntax: str,
    sop_class: str,
    sop_instance: str,
    *,
    max_inflated: int = DEFAULT_MAX_INFLATED,
    capture: Mapping[int, str] = _CAPTURE,
) -> dict[str, str]:
    """check_dataset, and the dataset's own SOP UIDs agree with the DIMSE command's.

    Returns what check_dataset captured: `capture` may name more top-level elements than
    the SOP UIDs (which it must keep as "sop_class" and "sop_instance"), so a caller that
    needs one more value (STOW-RS: the study) does not decode (or inflate) the data again."""
    seen = check_dataset(data, transfer_syntax, max_inflated=max_inflated, capture=capture)
    for key, expected in (("sop_class", sop_class), ("sop_instance", sop_instance)):
        got = seen.get(key)
        if got is not None and got != expected:
            # Not the UIDs: they identify a patient's images, and this text reaches logs.
            error = SopClassMismatch if key == "sop_class" else MalformedDataset
            raise error(f"dataset {key} differs from the command's")
    return seen


def encode_dataset(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """The dataset's bytes in an uncompressed transfer syntax (no file meta)."""
    implicit, little, deflated = ts_encoding(transfer_syntax)
    if deflated:
        raise ValueError("encode_dataset does not deflate")
    fp = DicomBytesIO()
    fp.is_little_endian = little
    fp.is_implicit_VR = implicit
    write_dataset(fp, ds)
    return bytes(fp.getvalue())
