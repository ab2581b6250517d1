"""FLAG_PIXELS framing in relay.dicom.codec: an instance whose pixels travel as codestreams."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as s

from relay.codecs import CODECS, encode, find_pixels
from relay.codecs import pixels as px
from relay.dicom.codec import (
    FLAG_PIXELS,
    FLAG_ZSTD,
    PIXELS_VERSION,
    VERSION,
    DicomLimits,
    DicomProtocolError,
    FinalResponse,
    Instance,
    MessageCodec,
    MessageType,
    PixelPart,
)
from relay_dev.samples import make_study

_PREFIX = struct.Struct(">I")
_FIXED = struct.Struct(">BBBH")


def _ct(rows: int = 128, frames_seed: int = 0) -> Instance:
    inst = make_study(1, rows=rows, cols=rows, seed=frames_seed)[0]
    return Instance(inst.sop_class, inst.sop_instance, inst.transfer_syntax, inst.data)


def _part(msg: Instance, codec: str = "jpegls") -> PixelPart:
    layout = find_pixels(msg.dataset, msg.transfer_syntax)
    assert layout is not None
    enc = encode(layout.fmt, msg.dataset[layout.offset : layout.end], codec)
    assert enc is not None
    return PixelPart(enc, layout.offset)


def _ws(limits: DicomLimits | None = None) -> MessageCodec:
    """The workstation's codec: the only one that decodes encoded pixels."""
    return MessageCodec(limits, accept_pixels=True)


def _split(frame: bytes) -> tuple[int, int, dict[str, object], bytes]:
    """(type, flags, header, body) of a frame."""
    _v, mtype, flags, hlen = _FIXED.unpack_from(frame, _PREFIX.size)
    start = _PREFIX.size + _FIXED.size
    return mtype, flags, json.loads(frame[start : start + hlen]), frame[start + hlen :]


def _join(mtype: int, flags: int, header: dict[str, object], body: bytes) -> bytes:
    hbytes = json.dumps(header).encode()
    payload = _FIXED.pack(VERSION, mtype, flags, len(hbytes)) + hbytes + body
    return _PREFIX.pack(len(payload)) + payload


@pytest.mark.parametrize("codec", CODECS)
def test_encoded_instance_round_trips_and_is_smaller_than_zstd(codec: str) -> None:
    msg = _ct()
    c = MessageCodec()
    frame = c.encode(msg, _part(msg, codec))
    mtype, flags, header, _ = _split(frame)
    assert (mtype, flags) == (MessageType.INSTANCE, FLAG_PIXELS)
    px = header["px"]
    assert isinstance(px, dict)
    assert px["v"] == PIXELS_VERSION and px["c"] == codec
    assert _ws().decode_frame(frame) == msg
    assert len(frame) < len(MessageCodec().encode(msg))
    # The byte counts say what the instance was, and what it cost on the wire.
    assert c.counters.sent_raw >= len(msg.dataset) and c.counters.sent_wire == len(frame)


def test_an_older_reader_refuses_a_newer_pixel_version_clearly() -> None:
    msg = _ct()
    mtype, flags, header, body = _split(MessageCodec().encode(msg, _part(msg)))
    px = header["px"]
    assert isinstance(px, dict)
    with pytest.raises(DicomProtocolError, match="px"):
        _ws().decode_frame(_join(mtype, flags, {**header, "px": {**px, "v": 2}}, body))
    with pytest.raises(DicomProtocolError, match="unknown codec"):
        _ws().decode_frame(_join(mtype, flags, {**header, "px": {**px, "c": "jxl"}}, body))
    with pytest.raises(DicomProtocolError, match="px"):
        _ws().decode_frame(_join(mtype, flags, {k: v for k, v in header.items()
                                                         if k != "px"}, body))  # fmt: skip


def test_pixels_flag_only_on_a_plain_instance() -> None:
    msg = _ct()
    mtype, _flags, header, body = _split(MessageCodec().encode(msg, _part(msg)))
    with pytest.raises(DicomProtocolError, match="outside a plain instance"):
        _ws().decode_frame(_join(mtype, FLAG_PIXELS | FLAG_ZSTD, header, body))
    with pytest.raises(DicomProtocolError, match="outside a plain instance"):
        _ws().decode_frame(_join(MessageType.PENDING, FLAG_PIXELS, header, body))
    with pytest.raises(DicomProtocolError, match="only an instance"):
        MessageCodec().encode(FinalResponse(0), _part(msg))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # ojph reports
def test_a_flipped_codestream_bit_is_caught_by_the_checksum() -> None:
    msg = _ct()
    frame = bytearray(MessageCodec().encode(msg, _part(msg, "htj2k")))
    frame[-40] ^= 0x01  # inside the last frame's codestream, past its headers
    with pytest.raises(DicomProtocolError, match="decode"):
        _ws().decode_frame(bytes(frame))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # ojph reports
@given(s.data())
@settings(max_examples=120, deadline=None)
def test_truncated_or_corrupted_encoded_instances_fail_cleanly(data: s.DataObject) -> None:
    msg = _ct(rows=32, frames_seed=data.draw(s.integers(0, 3)))
    frame = bytearray(MessageCodec().encode(msg, _part(msg, data.draw(s.sampled_from(CODECS)))))
    cut = data.draw(s.integers(0, len(frame) - 1))
    with pytest.raises(DicomProtocolError):
        _ws().decode_frame(bytes(frame[:cut]))
    # Any change inside the codestreams: refused, or (a bit the codec ignores) exact.
    _, _, header, _ = _split(bytes(frame))
    px = header["px"]
    assert isinstance(px, dict)
    pos = data.draw(s.integers(len(frame) - sum(px["fl"]), len(frame) - 1))
    frame[pos] ^= data.draw(s.integers(1, 255))
    try:
        got = _ws().decode_frame(bytes(frame))
    except DicomProtocolError:
        return
    assert got == msg


def _tampered(**changes: object) -> bytes:
    msg = _ct()
    mtype, flags, header, body = _split(MessageCodec().encode(msg, _part(msg)))
    px = header["px"]
    assert isinstance(px, dict)
    return _join(mtype, flags, {**header, "px": {**px, **changes}}, body)


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"f": [128, 128, 1, 16, 1, 0]}, "7 integers"),
        ({"f": [128, 128, 1, 12, 1, 0, 1]}, "unsupported format"),
        ({"f": [128, 128, 1, 16, 2, 0, 1]}, "signed"),
        ({"f": [128, 128, 1, 16, 1, 0, 2]}, "lengths do not match"),
        ({"f": [60000, 60000, 3, 16, 0, 0, 1]}, "above"),  # a 21 GB claim: refused unread
        ({"fl": [1, 2]}, "lengths do not match"),
        ({"fl": [0]}, "lengths do not match"),
        ({"rl": 10**12}, "'rl' is not an integer"),
        ({"at": 10**8}, "outside"),
        ({"rz": "yes"}, "lengths do not match"),
        ({"crc": -1}, "'crc' is not an integer"),
        ({"crc": 12345}, "do not decode to what the agent sent"),
    ],
)
def test_a_lying_px_header_is_refused_before_memory_is_spent(
    changes: dict[str, object], why: str
) -> None:
    with pytest.raises(DicomProtocolError, match=why):
        _ws().decode_frame(_tampered(**changes))


def test_decoded_size_is_bounded_by_the_dataset_limit() -> None:
    msg = _ct()
    frame = MessageCodec().encode(msg, _part(msg))
    small = DicomLimits(max_dataset=len(msg.dataset) - 1)
    with pytest.raises(DicomProtocolError, match="exceeds limit"):
        _ws(small).decode_frame(frame)
    with pytest.raises(DicomProtocolError, match="exceeds limit"):
        MessageCodec(small).encode(msg, _part(msg))


def test_pixels_that_do_not_fit_the_dataset_are_not_encoded() -> None:
    msg = _ct()
    part = _part(msg)
    with pytest.raises(DicomProtocolError, match="do not fit"):
        MessageCodec().encode(msg, PixelPart(part.encoded, len(msg.dataset) - 10))


def test_a_codec_that_does_not_accept_pixels_refuses_them_unread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Encoded pixels only travel agent -> workstation: every other reader (the agent,
    reading what a device sends) refuses them from the fixed header alone, before the
    JSON header, the rest's zstd or a codestream is looked at (an image decoder fed by a
    hostile device can crash, hang, or build 500 MiB from a few KB)."""
    msg = _ct()
    frame = MessageCodec().encode(msg, _part(msg, "htj2k"))

    def touched(*_args: object) -> bytes:
        raise AssertionError("pixels decoded")

    with monkeypatch.context() as m:
        m.setattr(px, "decode", touched)
        m.setattr(MessageCodec, "_decompressor", touched)
        with pytest.raises(DicomProtocolError, match="encoded pixels"):
            MessageCodec().decode_frame(frame)
        bad_header = _FIXED.pack(VERSION, MessageType.INSTANCE, FLAG_PIXELS, 2) + b"\xff\xfe"
        with pytest.raises(DicomProtocolError, match="encoded pixels"):
            MessageCodec().decode(bad_header)
    assert _ws().decode_frame(frame) == msg
