"""Frame layout, the header block, and the incremental decoder (relay.proto.frames)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.proto import frames as fr
from relay.proto.errors import ErrorCode, ProtocolError
from relay.proto.frames import Flags, Frame, FrameDecoder, FrameType, Setting

NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=64)
VALUE = st.text(max_size=200).filter(lambda v: len(v.encode()) <= fr.MAX_HEADER_VALUE)
HEADERS = st.dictionaries(NAME, VALUE, max_size=fr.MAX_HEADERS).filter(
    lambda h: sum(2 + len(k) + 1 + len(v.encode()) for k, v in h.items()) < fr.MAX_HEADER_BLOCK
)
FRAMES = st.builds(
    Frame,
    type=st.integers(0, 255),
    flags=st.integers(0, 0xFFFF),
    stream_id=st.integers(0, fr.MAX_STREAM_ID),
    payload=st.binary(max_size=300),
)


def _encode(frame: Frame) -> bytes:
    return fr.encode(frame.type, frame.flags, frame.stream_id, frame.payload)


def test_header_layout_is_the_documented_bytes() -> None:
    """version:u8 type:u8 flags:u16 stream_id:u32 length:u32, big-endian, then payload."""
    raw = fr.encode(FrameType.DATA, Flags.FIN, 5, b"ab")
    assert raw == bytes.fromhex("01 02 0001 00000005 00000002") + b"ab"
    assert fr.HEADER_SIZE == 12
    assert fr.VERSION == 1


def test_frame_type_and_error_code_values_are_fixed() -> None:
    """These numbers are on the wire: renumbering would break every deployed peer."""
    assert [int(t) for t in FrameType] == list(range(9))
    codes = {code.name: int(code) for code in ErrorCode}
    assert codes["FLOW_CONTROL_ERROR"] == 3 and codes["REFUSED_STREAM"] == 6
    assert codes["HEADERS_TOO_LARGE"] == 0xB and codes["LIMIT_EXCEEDED"] == 0x10
    assert sorted(codes.values()) == list(range(0x11))
    assert ErrorCode.name_of(6) == "refused_stream"
    assert ErrorCode.name_of(0xDEAD) == "unknown"


@given(st.lists(FRAMES, max_size=8), st.data())
def test_decoder_yields_the_same_frames_whatever_the_split(
    frames: list[Frame], data: st.DataObject
) -> None:
    """Frames come out whole and in order, however the byte stream is cut."""
    stream = b"".join(_encode(f) for f in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = FrameDecoder(fr.MAX_MAX_FRAME)
    out: list[Frame] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        out += decoder.feed(stream[start:end])
        consumed = sum(fr.HEADER_SIZE + len(f.payload) for f in out)
        assert decoder.buffered == end - consumed  # keeps only the incomplete frame
    assert out == frames
    assert decoder.buffered == 0


@given(st.binary(max_size=fr.HEADER_SIZE - 1))
def test_a_partial_header_is_buffered_not_judged(prefix: bytes) -> None:
    """Fewer than 12 bytes say nothing yet, even when they are garbage."""
    decoder = FrameDecoder(fr.MIN_MAX_FRAME)
    assert list(decoder.feed(prefix)) == []
    assert decoder.buffered == len(prefix)


def test_oversized_frame_is_refused_from_its_header_alone() -> None:
    """A length above the announced maximum is an error before any payload arrives."""
    decoder = FrameDecoder(fr.MIN_MAX_FRAME)
    header = fr.encode_header(FrameType.DATA, 0, 1, fr.MIN_MAX_FRAME + 1)
    with pytest.raises(ProtocolError) as info:
        list(decoder.feed(header))
    assert info.value.code == ErrorCode.FRAME_SIZE_ERROR


def test_frame_of_exactly_the_maximum_is_accepted() -> None:
    decoder = FrameDecoder(fr.MIN_MAX_FRAME)
    payload = bytes(fr.MIN_MAX_FRAME)
    raw = fr.encode(FrameType.DATA, 0, 1, payload)
    assert list(decoder.feed(raw[:-1])) == []
    assert decoder.buffered == len(raw) - 1
    assert list(decoder.feed(raw[-1:])) == [Frame(FrameType.DATA, 0, 1, payload)]


@pytest.mark.parametrize("version", [0, 2, 255])
def test_unknown_version_is_unsupported(version: int) -> None:
    raw = bytes([version]) + fr.encode(FrameType.PING, 0, 0, bytes(8))[1:]
    with pytest.raises(ProtocolError) as info:
        list(FrameDecoder(fr.MIN_MAX_FRAME).feed(raw))
    assert info.value.code == ErrorCode.UNSUPPORTED_VERSION


def test_decoder_keeps_frames_before_an_error() -> None:
    """Frames complete before a bad header are still yielded, then the error is raised."""
    good = fr.encode(FrameType.PING, 0, 0, bytes(8))
    bad = fr.encode_header(FrameType.DATA, 0, 1, fr.MAX_MAX_FRAME)
    decoder = FrameDecoder(fr.MIN_MAX_FRAME)
    out: list[Frame] = []
    with pytest.raises(ProtocolError):
        out.extend(decoder.feed(good + bad))
    assert out == [Frame(FrameType.PING, 0, 0, bytes(8))]


# ---------------------------------------------------------------------- header blocks


@given(HEADERS)
def test_headers_round_trip(headers: dict[str, str]) -> None:
    block = fr.encode_headers(headers)
    assert len(block) <= fr.MAX_HEADER_BLOCK
    assert fr.decode_headers(block) == headers


@pytest.mark.parametrize(
    "headers",
    [
        {f"h{i}": "" for i in range(fr.MAX_HEADERS + 1)},  # count
        {"n" * (fr.MAX_HEADER_NAME + 1): "v"},  # name length
        {"": "v"},  # empty name
        {"Target": "v"},  # upper case
        {"ta rget": "v"},  # space
        {"tärget": "v"},  # not ASCII
        {"v": "x" * (fr.MAX_HEADER_VALUE + 1)},  # value length
        {"v": "é" * (fr.MAX_HEADER_VALUE // 2 + 1)},  # value length counted in UTF-8 bytes
        {f"h{i:02}": "x" * 300 for i in range(fr.MAX_HEADERS)},  # total block
    ],
    ids=["count", "name", "empty", "upper", "space", "ascii", "value", "utf8", "total"],
)
def test_encode_headers_refuses_what_the_peer_would_refuse(headers: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        fr.encode_headers(headers)


def _block(*pairs: tuple[bytes, bytes], count: int | None = None) -> bytes:
    parts = [bytes([len(pairs) if count is None else count])]
    for name, value in pairs:
        parts += [bytes([len(name)]), name, len(value).to_bytes(2, "big"), value]
    return b"".join(parts)


@pytest.mark.parametrize(
    "block",
    [
        b"",
        _block(count=fr.MAX_HEADERS + 1),
        _block((b"n" * (fr.MAX_HEADER_NAME + 1), b"v")),
        _block((b"a", b"x" * (fr.MAX_HEADER_VALUE + 1))),
        _block(*[(b"h%02d" % i, b"x" * 300) for i in range(fr.MAX_HEADERS)]),
        _block((b"a", b"1"), (b"a", b"2")),
        _block((b"A", b"1")),
        _block((b"a", b"\xff\xfe")),
        _block((b"a", b"1"), count=2),
        _block((b"a", b"1"))[:-1],
        _block((b"a", b"1")) + b"\0",
        b"\x01\x05ab",
    ],
    ids=[
        "empty",
        "count",
        "name",
        "value",
        "total",
        "duplicate",
        "upper",
        "utf8",
        "missing",
        "truncated-value",
        "trailing",
        "truncated-name",
    ],
)
def test_decode_headers_refuses_malformed_or_oversized_blocks(block: bytes) -> None:
    with pytest.raises(ValueError):
        fr.decode_headers(block)


@given(st.binary(max_size=600))
def test_decode_headers_raises_only_value_error(block: bytes) -> None:
    try:
        headers = fr.decode_headers(block)
    except ValueError:
        return
    assert fr.encode_headers(headers) == block  # what it accepts is canonical


# ---------------------------------------------------------------------- other payloads


def test_settings_round_trip_and_bad_length() -> None:
    raw = fr.encode_settings({Setting.MAX_FRAME: 20000, Setting.STREAM_WINDOW: 70000})
    (frame,) = FrameDecoder(fr.MIN_MAX_FRAME).feed(raw)
    assert (frame.type, frame.stream_id) == (FrameType.SETTINGS, 0)
    assert fr.decode_settings(frame.payload) == {3: 20000, 1: 70000}
    with pytest.raises(ProtocolError) as info:
        fr.decode_settings(frame.payload[:-1])
    assert info.value.code == ErrorCode.FRAME_SIZE_ERROR


@pytest.mark.parametrize("size", [0, 3, 5])
def test_u32_payload_must_be_four_bytes(size: int) -> None:
    with pytest.raises(ProtocolError) as info:
        fr.decode_u32(bytes(size), "RESET")
    assert info.value.code == ErrorCode.FRAME_SIZE_ERROR


def test_goaway_round_trip_truncates_reason() -> None:
    raw = fr.encode_goaway(7, ErrorCode.SHUTDOWN, "x" * 1000)
    (frame,) = FrameDecoder(fr.MIN_MAX_FRAME).feed(raw)
    assert fr.decode_goaway(frame.payload) == (7, ErrorCode.SHUTDOWN, "x" * fr.MAX_GOAWAY_REASON)
    assert fr.decode_goaway(fr.encode_goaway(3, 0, "bye")[12:]) == (3, 0, "bye")
    for bad in (b"", bytes(7), bytes(8 + fr.MAX_GOAWAY_REASON + 1)):
        with pytest.raises(ProtocolError) as info:
            fr.decode_goaway(bad)
        assert info.value.code == ErrorCode.FRAME_SIZE_ERROR


@given(NAME, st.binary(max_size=200))
def test_control_round_trip(kind: str, body: bytes) -> None:
    (frame,) = FrameDecoder(fr.MIN_MAX_FRAME).feed(fr.encode_control(kind, body))
    assert fr.decode_control(frame.payload) == (kind, body)


@pytest.mark.parametrize("kind", ["", "Revoke", "a b", "k" * (fr.MAX_CONTROL_KIND + 1), "é"])
def test_encode_control_refuses_bad_kinds(kind: str) -> None:
    with pytest.raises(ValueError):
        fr.encode_control(kind, b"")


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"", ErrorCode.FRAME_SIZE_ERROR),
        (b"\x00body", ErrorCode.PROTOCOL_ERROR),
        (b"\x05ab", ErrorCode.PROTOCOL_ERROR),
        (b"\x03A-b", ErrorCode.PROTOCOL_ERROR),
        (b"\x02\xff\xfe", ErrorCode.PROTOCOL_ERROR),
    ],
    ids=["empty", "empty-kind", "truncated", "upper", "binary"],
)
def test_decode_control_refuses_bad_kinds(payload: bytes, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as info:
        fr.decode_control(payload)
    assert info.value.code == code
