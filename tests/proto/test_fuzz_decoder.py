"""Garbage and truncated input, driven by Hypothesis (the atheris target in tests/fuzz).

Garbage must end in ConnectionTerminated, never an uncaught exception; truncated input
must be waited on: no event and no error until the frame is complete.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.proto import frames as fr
from relay.proto.errors import ErrorCode
from relay.proto.events import ConnectionTerminated, Event
from relay.proto.frames import Flags, FrameType
from relay.proto.mux import Connection
from tests.proto.harness import raw_peer, terminated


def _load_target() -> Callable[[bytes], None]:
    path = Path(__file__).parents[1] / "fuzz" / "fuzz_frames.py"
    spec = importlib.util.spec_from_file_location("fuzz_frames", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    target: Callable[[bytes], None] = module.check_input
    return target


check_input = _load_target()
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# A frame that looks plausible, so that garbage gets past the decoder into the state
# machine: version 1, mostly a known type, mostly a small stream id, a short payload.
PLAUSIBLE_FRAME = st.builds(
    fr.encode,
    st.one_of(st.sampled_from(list(FrameType)), st.integers(0, 255)),
    st.sampled_from([0, 1, 0xFFFF]),
    st.one_of(st.sampled_from([0, 1, 2, 3, 4, 5]), st.integers(0, fr.MAX_STREAM_ID)),
    st.one_of(
        st.binary(max_size=40),
        st.sampled_from([bytes(4), b"\xff" * 4, b"\x00\x00\x00\x01", bytes(8), b"\x01t"]),
        st.builds(lambda h: fr.encode_headers({"t": h}), st.text(max_size=5)),
    ),
)


@FUZZ
@given(st.binary(max_size=3000))
def test_fuzz_target_on_arbitrary_bytes(data: bytes) -> None:
    check_input(data)


@FUZZ
@given(
    st.sampled_from([1, 2, 3, 3, 4, 4]), st.integers(0, 255), st.lists(PLAUSIBLE_FRAME, max_size=12)
)
def test_fuzz_target_on_plausible_frames(mode: int, split: int, frames: list[bytes]) -> None:
    check_input(bytes([mode, split]) + b"".join(frames))


@FUZZ
@given(st.booleans(), st.binary(min_size=1, max_size=500))
def test_garbage_terminates_or_waits_never_raises(after_settings: bool, garbage: bytes) -> None:
    """With or without a valid SETTINGS first: a ConnectionTerminated, or still waiting."""
    conn = raw_peer() if after_settings else Connection(client=False, now=0.0)
    events = conn.receive_data(garbage, 1.0)
    end = terminated(events)
    if len(garbage) >= fr.HEADER_SIZE and garbage[0] != fr.VERSION:
        assert end is not None and end.code == ErrorCode.UNSUPPORTED_VERSION
    if not after_settings and len(garbage) >= fr.HEADER_SIZE:
        version, ftype, _, _, length = fr.HEADER.unpack_from(garbage)
        whole = len(garbage) >= fr.HEADER_SIZE + length or length > conn.settings.max_frame
        if version == fr.VERSION and ftype != FrameType.SETTINGS and whole:
            assert end is not None  # a whole frame, and not the SETTINGS that must come first
    if end is not None:
        assert conn.receive_data(garbage, 2.0) == []
        assert conn.receive_eof() == []


# ---------------------------------------------------------------------- truncation


@st.composite
def peer_frames(draw: st.DrawFn) -> list[bytes]:
    """Frames a correct client could send a server (SETTINGS first), one frame each."""
    frames = [fr.encode_settings({})]
    opened: list[int] = []
    next_id = 1
    for _ in range(draw(st.integers(0, 15))):
        kind = draw(st.sampled_from(["open", "data", "wu", "ping", "control", "reset"]))
        if kind == "open" or not opened:
            headers = draw(st.dictionaries(st.sampled_from(["t", "codec"]), st.text(max_size=8)))
            frames.append(fr.encode(FrameType.OPEN, 0, next_id, fr.encode_headers(headers)))
            opened.append(next_id)
            next_id += 2
            continue
        sid = draw(st.sampled_from(opened))
        if kind == "data":
            payload = draw(st.binary(max_size=300))
            frames.append(fr.encode(FrameType.DATA, 0, sid, payload))
        elif kind == "wu":
            frames.append(fr.encode_u32(FrameType.WINDOW_UPDATE, sid, draw(st.integers(1, 999))))
        elif kind == "ping":
            frames.append(fr.encode(FrameType.PING, 0, 0, draw(st.binary(min_size=8, max_size=8))))
        elif kind == "control":
            frames.append(fr.encode_control("renew", draw(st.binary(max_size=50))))
        else:
            frames.append(fr.encode_u32(FrameType.RESET, sid, ErrorCode.CANCEL))
            opened.remove(sid)
    if draw(st.booleans()):
        reason = draw(st.binary(max_size=fr.MAX_GOAWAY_REASON))
        body = fr.encode_u32(0, 0, next_id)[fr.HEADER_SIZE :] + bytes(4) + reason
        frames.append(fr.encode(FrameType.GOAWAY, 0, 0, body))
    return frames


@st.composite
def peer_transcripts(draw: st.DrawFn) -> tuple[list[bytes], list[Event]]:
    """Valid frames from a client, and the events a server core gives for them."""
    frames = draw(peer_frames())
    conn = Connection(client=False, now=0.0)
    events = conn.receive_data(b"".join(frames), 1.0)
    assert terminated(events) is None, events
    return frames, events


@st.composite
def mutated_transcripts(draw: st.DrawFn) -> bytes:
    """A valid transcript with a few frames inserted, bytes flipped or cut out."""
    stream = bytearray(b"".join(draw(peer_frames())))
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["insert", "flip", "cut"]))
        pos = draw(st.integers(0, len(stream)))
        if how == "insert":
            stream[pos:pos] = draw(PLAUSIBLE_FRAME)
        elif how == "flip" and pos < len(stream):
            stream[pos] ^= draw(st.integers(1, 255))
        else:
            del stream[pos : pos + draw(st.integers(1, 16))]
    return bytes(stream)


@FUZZ
@given(st.integers(0, 255), mutated_transcripts())
def test_fuzz_target_on_mutated_valid_input(split: int, stream: bytes) -> None:
    """Deep paths: mostly valid frames with damage in the middle (mode 2: a server core)."""
    check_input(bytes([2, split]) + stream)


@FUZZ
@given(st.integers(0, 255), peer_frames())
def test_fuzz_target_on_valid_input(split: int, frames: list[bytes]) -> None:
    check_input(bytes([2, split]) + b"".join(frames))


@settings(max_examples=150, deadline=None)
@given(peer_transcripts(), st.data())
def test_truncated_input_is_waited_on(
    transcript: tuple[list[bytes], list[Event]], data: st.DataObject
) -> None:
    """Any prefix gives exactly the events of the whole frames in it, and no error."""
    frames, _ = transcript
    stream = b"".join(frames)
    cut = data.draw(st.integers(0, len(stream)), label="cut")
    boundary = 0
    for frame in frames:
        if boundary + len(frame) > cut:
            break
        boundary += len(frame)
    truncated = Connection(client=False, now=0.0)
    complete = Connection(client=False, now=0.0)
    got = truncated.receive_data(stream[:cut], 1.0)
    assert got == complete.receive_data(stream[:boundary], 1.0)
    assert truncated.terminated is None
    assert truncated.data_to_send() == complete.data_to_send()
    # The rest arrives: the frame cut in two is delivered whole, once.
    rest = truncated.receive_data(stream[cut:], 1.0)
    assert got + rest == transcript[1]


@settings(max_examples=100, deadline=None)
@given(peer_transcripts(), st.lists(st.integers(0, 10_000), max_size=20))
def test_any_split_gives_the_same_events(
    transcript: tuple[list[bytes], list[Event]], cuts: list[int]
) -> None:
    frames, expected = transcript
    stream = b"".join(frames)
    points = sorted({min(c, len(stream)) for c in cuts})
    conn = Connection(client=False, now=0.0)
    events: list[Event] = []
    for start, end in zip([0, *points], [*points, len(stream)], strict=True):
        events += conn.receive_data(stream[start:end], 1.0)
    assert events == expected
    assert not any(isinstance(e, ConnectionTerminated) for e in events)


def test_a_lone_header_waits_for_its_payload() -> None:
    conn = raw_peer()
    header = fr.encode_header(FrameType.PING, 0, 0, 8)
    for i in range(len(header)):
        assert conn.receive_data(header[i : i + 1], 1.0) == []
    assert conn.receive_data(bytes(7), 1.0) == []
    assert conn.data_to_send() == b""
    assert conn.receive_data(b"\x01", 1.0) == []
    (pong,) = fr.FrameDecoder(fr.MAX_MAX_FRAME).feed(conn.data_to_send())
    assert pong.flags == Flags.ACK and pong.payload == bytes(7) + b"\x01"
