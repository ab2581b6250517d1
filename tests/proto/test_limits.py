"""Every limit, fed as raw frames to one core: the right ErrorCode, stream or link level."""

from __future__ import annotations

import pytest

from relay.proto import frames as fr
from relay.proto.errors import ErrorCode
from relay.proto.events import (
    ControlReceived,
    CreditAvailable,
    DataReceived,
    StreamEnded,
    StreamOpened,
    StreamReset,
)
from relay.proto.frames import FrameType
from relay.proto.mux import Connection, LinkSettings
from tests.proto.harness import (
    assert_terminated,
    data,
    decode_all,
    open_frame,
    ping,
    raw_peer,
    reset,
    settings,
    terminated,
    window_update,
)

WINDOWS = LinkSettings(stream_window=64 * 1024, link_window=100 * 1024, max_frame=16 * 1024)


def _resets(conn: Connection) -> list[tuple[int, int]]:
    """(stream_id, code) of the RESET frames the core queued."""
    return [
        (f.stream_id, fr.decode_u32(f.payload, "RESET"))
        for f in decode_all(conn.data_to_send())
        if f.type == FrameType.RESET
    ]


# ---------------------------------------------------------------------- frame level


def test_frame_larger_than_announced_is_refused_from_the_header() -> None:
    """FRAME_SIZE_ERROR as soon as the 12-byte header is in, without the payload."""
    conn = raw_peer(local=WINDOWS)
    header = fr.encode_header(FrameType.DATA, 0, 1, WINDOWS.max_frame + 1)
    assert_terminated(conn, conn.receive_data(header, 1.0), ErrorCode.FRAME_SIZE_ERROR)


def test_frame_of_the_announced_maximum_is_accepted() -> None:
    conn = raw_peer(local=WINDOWS)
    events = conn.receive_data(open_frame(1) + data(1, bytes(WINDOWS.max_frame)), 1.0)
    assert [type(e) for e in events] == [StreamOpened, DataReceived]


def test_bad_version_is_unsupported() -> None:
    conn = Connection(client=False, now=0.0)
    raw = bytearray(settings())
    raw[0] = 2
    assert_terminated(conn, conn.receive_data(bytes(raw), 1.0), ErrorCode.UNSUPPORTED_VERSION)


@pytest.mark.parametrize(
    "first",
    [ping(), open_frame(1), data(1, b"x"), fr.encode(0x42, 0, 0, b"")],
    ids=["ping", "open", "data", "unknown-type"],
)
def test_first_frame_must_be_settings(first: bytes) -> None:
    conn = Connection(client=False, now=0.0)
    conn.data_to_send()
    assert_terminated(conn, conn.receive_data(first, 1.0), ErrorCode.PROTOCOL_ERROR)


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (settings(), ErrorCode.PROTOCOL_ERROR),  # twice
        (fr.encode(FrameType.SETTINGS, 0, 1, b""), ErrorCode.PROTOCOL_ERROR),  # on a stream
    ],
    ids=["twice", "on-stream"],
)
def test_settings_only_once_on_stream_zero(frame: bytes, code: ErrorCode) -> None:
    conn = raw_peer()
    assert_terminated(conn, conn.receive_data(frame, 1.0), code)


@pytest.mark.parametrize(
    ("values", "code"),
    [
        ({"stream_window": fr.DEFAULT_STREAM_WINDOW - 1}, ErrorCode.FLOW_CONTROL_ERROR),
        ({"stream_window": fr.MAX_WINDOW + 1}, ErrorCode.FLOW_CONTROL_ERROR),
        ({"link_window": fr.DEFAULT_LINK_WINDOW - 1}, ErrorCode.FLOW_CONTROL_ERROR),
        ({"link_window": fr.MAX_WINDOW + 1}, ErrorCode.FLOW_CONTROL_ERROR),
        ({"max_frame": fr.MIN_MAX_FRAME - 1}, ErrorCode.PROTOCOL_ERROR),
        ({"max_frame": fr.MAX_MAX_FRAME + 1}, ErrorCode.PROTOCOL_ERROR),
    ],
)
def test_settings_values_out_of_range(values: dict[str, int], code: ErrorCode) -> None:
    conn = Connection(client=False, now=0.0)
    conn.data_to_send()
    assert_terminated(conn, conn.receive_data(settings(**values), 1.0), code)


def test_settings_of_bad_length() -> None:
    conn = Connection(client=False, now=0.0)
    conn.data_to_send()
    raw = fr.encode(FrameType.SETTINGS, 0, 0, bytes(7))
    assert_terminated(conn, conn.receive_data(raw, 1.0), ErrorCode.FRAME_SIZE_ERROR)


def test_unknown_frame_types_are_ignored_after_settings() -> None:
    """Room for optional frames in later versions."""
    conn = raw_peer()
    assert conn.receive_data(fr.encode(0x42, 0xFFFF, 7, b"future"), 1.0) == []
    assert conn.terminated is None


def test_local_settings_are_validated() -> None:
    """A side cannot announce what the protocol forbids."""
    bad: list[dict[str, float]] = [
        {"max_frame": fr.MIN_MAX_FRAME - 1},
        {"max_frame": fr.MAX_MAX_FRAME + 1},
        {"stream_window": fr.DEFAULT_STREAM_WINDOW - 1},
        {"stream_window": 2 * 1024 * 1024, "link_window": 1024 * 1024},
        {"max_streams": 0},
        {"max_streams": 65536},
        {"keepalive_interval": 0.0},
        {"keepalive_interval": 50.0, "keepalive_timeout": 45.0},
    ]
    for values in bad:
        with pytest.raises(ValueError):
            LinkSettings(**values)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- streams


def test_more_streams_than_max_streams_are_refused_and_the_link_survives() -> None:
    conn = raw_peer(local=LinkSettings(max_streams=2))
    events = conn.receive_data(open_frame(1) + open_frame(3) + open_frame(5), 1.0)
    assert [e.stream_id for e in events if isinstance(e, StreamOpened)] == [1, 3]
    assert _resets(conn) == [(5, ErrorCode.REFUSED_STREAM)]
    assert conn.terminated is None
    # Data the peer sent before learning of the refusal is dropped, not an error.
    assert conn.receive_data(data(5, b"late", fin=True), 1.0) == []
    # Once a stream ends, a new one fits again.
    conn.receive_data(reset(1, ErrorCode.CANCEL), 1.0)
    events = conn.receive_data(open_frame(7), 1.0)
    assert events == [StreamOpened(7, {"t": "x"})]
    assert conn.terminated is None


def test_free_local_streams_follows_the_peers_max_streams() -> None:
    """What the gateway's fair share reads: streams this side may still open."""
    conn = raw_peer(client=False, peer_settings=settings(max_streams=3))
    conn.receive_data(open_frame(1), 1.0)  # the peer's own streams do not count
    assert conn.free_local_streams == 3
    opened = [conn.open_stream({"t": "x"}) for _ in range(2)]
    assert conn.free_local_streams == 1
    conn.reset_stream(opened[0], ErrorCode.CANCEL)
    assert conn.free_local_streams == 2
    conn.open_stream({"t": "x"})
    conn.open_stream({"t": "x"})
    assert (conn.free_local_streams, conn.can_open_stream()) == (0, False)


def test_stream_id_of_our_own_parity_is_a_protocol_error() -> None:
    conn = raw_peer(client=False)
    assert_terminated(conn, conn.receive_data(open_frame(2), 1.0), ErrorCode.PROTOCOL_ERROR)


def test_stream_zero_open_is_a_protocol_error() -> None:
    conn = raw_peer(client=False)
    assert_terminated(conn, conn.receive_data(open_frame(0), 1.0), ErrorCode.PROTOCOL_ERROR)


@pytest.mark.parametrize("reused", [1, 3, 5], ids=["closed", "skipped", "open"])
def test_stream_id_reuse_is_a_protocol_error(reused: int) -> None:
    """Peer ids only go up: a closed, skipped or open id cannot be opened again."""
    conn = raw_peer(client=False)
    conn.receive_data(open_frame(1) + open_frame(5) + reset(1, ErrorCode.CANCEL), 1.0)
    assert conn.terminated is None
    events = conn.receive_data(open_frame(reused), 1.0)
    assert_terminated(conn, events, ErrorCode.PROTOCOL_ERROR)


@pytest.mark.parametrize(
    "frame",
    [data(1, b"x"), window_update(1, 10), reset(1, 0), data(2, b"x"), data(0, b"x")],
    ids=["data", "window-update", "reset", "own-unopened", "stream-zero"],
)
def test_frames_for_streams_never_opened_are_protocol_errors(frame: bytes) -> None:
    conn = raw_peer(client=False)
    assert_terminated(conn, conn.receive_data(frame, 1.0), ErrorCode.PROTOCOL_ERROR)


def test_data_after_fin_resets_the_stream_with_stream_closed() -> None:
    conn = raw_peer(client=False)
    conn.receive_data(open_frame(1) + data(1, b"a", fin=True), 1.0)
    conn.data_to_send()
    events = conn.receive_data(data(1, b"b"), 1.0)
    assert events == [StreamReset(1, ErrorCode.STREAM_CLOSED, remote=False)]
    assert _resets(conn) == [(1, ErrorCode.STREAM_CLOSED)]
    assert conn.terminated is None


# ---------------------------------------------------------------------- header blocks


def _raw_open(stream_id: int, block: bytes) -> bytes:
    return fr.encode(FrameType.OPEN, 0, stream_id, block)


def _block(pairs: list[tuple[bytes, bytes]]) -> bytes:
    parts = [bytes([len(pairs)])]
    for name, value in pairs:
        parts += [bytes([len(name)]), name, len(value).to_bytes(2, "big"), value]
    return b"".join(parts)


@pytest.mark.parametrize(
    "block",
    [
        _block([(b"h%02d" % i, b"") for i in range(fr.MAX_HEADERS + 1)]),
        _block([(b"n" * (fr.MAX_HEADER_NAME + 1), b"v")]),
        _block([(b"v", b"x" * (fr.MAX_HEADER_VALUE + 1))]),
        _block([(b"h%02d" % i, b"x" * 300) for i in range(fr.MAX_HEADERS)]),
    ],
    ids=["count", "name", "value", "total"],
)
def test_header_limits_reset_the_stream_with_headers_too_large(block: bytes) -> None:
    conn = raw_peer(client=False)
    events = conn.receive_data(_raw_open(1, block) + data(1, b"ignored"), 1.0)
    assert events == []
    assert _resets(conn) == [(1, ErrorCode.HEADERS_TOO_LARGE)]
    assert conn.terminated is None
    # The link goes on; the id counts as used.
    assert conn.receive_data(open_frame(3), 1.0) == [StreamOpened(3, {"t": "x"})]


# ---------------------------------------------------------------------- flow control


def test_data_beyond_the_stream_window_is_a_flow_control_error() -> None:
    conn = raw_peer(local=WINDOWS)
    frames = open_frame(1) + b"".join(data(1, bytes(16 * 1024)) for _ in range(4))
    events = conn.receive_data(frames, 1.0)
    assert terminated(events) is None  # exactly the 64 KiB window: fine
    assert_terminated(conn, conn.receive_data(data(1, b"x"), 1.0), ErrorCode.FLOW_CONTROL_ERROR)


def test_data_beyond_the_link_window_is_a_flow_control_error() -> None:
    """Two streams each within their window, together beyond the link's 100 KiB."""
    conn = raw_peer(local=WINDOWS)
    chunk = bytes(10 * 1024)
    conn.receive_data(open_frame(1) + open_frame(3), 1.0)
    events = conn.receive_data(b"".join(data(1, chunk) for _ in range(6)), 1.0)
    events += conn.receive_data(b"".join(data(3, chunk) for _ in range(4)), 1.0)
    assert terminated(events) is None  # 100 KiB: exactly the link window
    assert_terminated(conn, conn.receive_data(data(3, b"x"), 1.0), ErrorCode.FLOW_CONTROL_ERROR)


def test_data_dropped_for_a_closed_stream_still_counts_against_the_link() -> None:
    """A peer cannot dodge the link window by writing to a stream that was reset."""
    conn = raw_peer(local=WINDOWS)
    conn.receive_data(open_frame(1) + open_frame(3) + reset(1, ErrorCode.CANCEL), 1.0)
    filler = b"".join(data(3, bytes(16 * 1024)) for _ in range(4))  # 64 KiB, unread
    late = b"".join(data(1, bytes(12 * 1024)) for _ in range(2))  # 24 KiB, dropped
    events = conn.receive_data(filler + late, 1.0)
    assert terminated(events) is None
    # 12 KiB of link credit left (the dropped 24 KiB wait for a quarter-window batch).
    too_much = data(1, bytes(12 * 1024 + 1))
    assert_terminated(conn, conn.receive_data(too_much, 1.0), ErrorCode.FLOW_CONTROL_ERROR)


def test_credit_returned_then_used_is_not_an_error() -> None:
    conn = raw_peer(local=WINDOWS)
    conn.receive_data(open_frame(1) + b"".join(data(1, bytes(16 * 1024)) for _ in range(4)), 1.0)
    conn.acknowledge_received_data(1, 16 * 1024)
    grants = [
        (f.stream_id, fr.decode_u32(f.payload, "WU"))
        for f in decode_all(conn.data_to_send())
        if f.type == FrameType.WINDOW_UPDATE
    ]
    assert grants == [(1, 16 * 1024)]  # link: 16 KiB is below a quarter of 100 KiB
    assert terminated(conn.receive_data(data(1, bytes(16 * 1024)), 1.0)) is None


@pytest.mark.parametrize("stream_id", [0, 1], ids=["link", "stream"])
def test_window_update_overflow_is_a_flow_control_error(stream_id: int) -> None:
    conn = raw_peer(client=True)  # peer announced the 64 KiB defaults
    if stream_id:
        assert conn.open_stream({"t": "x"}) == stream_id
    room = fr.MAX_WINDOW - fr.DEFAULT_STREAM_WINDOW
    events = conn.receive_data(window_update(stream_id, room), 1.0)
    assert events == [CreditAvailable(stream_id)]  # exactly 2**31 - 1: allowed
    events = conn.receive_data(window_update(stream_id, 1), 1.0)
    assert_terminated(conn, events, ErrorCode.FLOW_CONTROL_ERROR)


@pytest.mark.parametrize("stream_id", [0, 1], ids=["link", "stream"])
def test_window_update_of_zero_is_a_protocol_error(stream_id: int) -> None:
    conn = raw_peer(client=True)
    conn.open_stream({"t": "x"})
    events = conn.receive_data(window_update(stream_id, 0), 1.0)
    assert_terminated(conn, events, ErrorCode.PROTOCOL_ERROR)


@pytest.mark.parametrize("ftype", [FrameType.WINDOW_UPDATE, FrameType.RESET])
def test_u32_frames_of_the_wrong_size_are_frame_size_errors(ftype: FrameType) -> None:
    conn = raw_peer(client=True)
    conn.open_stream({"t": "x"})
    events = conn.receive_data(fr.encode(ftype, 0, 1, bytes(5)), 1.0)
    assert_terminated(conn, events, ErrorCode.FRAME_SIZE_ERROR)


def test_window_update_for_a_closed_stream_is_ignored() -> None:
    conn = raw_peer(client=True)
    sid = conn.open_stream({"t": "x"})
    conn.reset_stream(sid)
    assert conn.receive_data(window_update(sid, 100), 1.0) == []
    assert conn.terminated is None


# ---------------------------------------------------------------------- ping, control, goaway


@pytest.mark.parametrize("size", [0, 7, 9])
def test_ping_of_the_wrong_size_terminates_the_link(size: int) -> None:
    conn = raw_peer()
    events = conn.receive_data(ping(bytes(size)), 1.0)
    end = terminated(events)
    assert end is not None and end.code in (ErrorCode.FRAME_SIZE_ERROR, ErrorCode.PROTOCOL_ERROR)


def test_ping_of_the_wrong_size_is_a_frame_size_error() -> None:
    conn = raw_peer()
    assert_terminated(conn, conn.receive_data(ping(bytes(7)), 1.0), ErrorCode.FRAME_SIZE_ERROR)


def test_ping_on_a_stream_is_a_protocol_error() -> None:
    conn = raw_peer()
    raw = fr.encode(FrameType.PING, 0, 1, bytes(8))
    assert_terminated(conn, conn.receive_data(raw, 1.0), ErrorCode.PROTOCOL_ERROR)


def test_ping_is_answered_with_the_same_payload() -> None:
    conn = raw_peer()
    assert conn.receive_data(ping(b"12345678"), 1.0) == []
    (pong,) = decode_all(conn.data_to_send())
    assert (pong.type, pong.flags, pong.payload) == (FrameType.PING, fr.Flags.ACK, b"12345678")


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"", ErrorCode.FRAME_SIZE_ERROR),
        (b"\x00", ErrorCode.PROTOCOL_ERROR),
        (b"\x06Revoke", ErrorCode.PROTOCOL_ERROR),
        (b"\x09short", ErrorCode.PROTOCOL_ERROR),
        (bytes([65]) + b"k" * 65, ErrorCode.PROTOCOL_ERROR),
    ],
    ids=["empty", "empty-kind", "upper", "truncated", "too-long"],
)
def test_control_with_an_invalid_kind(payload: bytes, code: ErrorCode) -> None:
    conn = raw_peer()
    raw = fr.encode(FrameType.CONTROL, 0, 0, payload)
    assert_terminated(conn, conn.receive_data(raw, 1.0), code)


def test_control_on_a_stream_is_a_protocol_error() -> None:
    conn = raw_peer()
    raw = fr.encode(FrameType.CONTROL, 0, 1, b"\x01k")
    assert_terminated(conn, conn.receive_data(raw, 1.0), ErrorCode.PROTOCOL_ERROR)


def test_control_is_delivered() -> None:
    conn = raw_peer()
    events = conn.receive_data(fr.encode_control("revoke", b"\x00\xff"), 1.0)
    assert events == [ControlReceived("revoke", b"\x00\xff")]


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (fr.encode(FrameType.GOAWAY, 0, 0, bytes(7)), ErrorCode.FRAME_SIZE_ERROR),
        (fr.encode(FrameType.GOAWAY, 0, 1, bytes(8)), ErrorCode.PROTOCOL_ERROR),
    ],
    ids=["short", "on-stream"],
)
def test_malformed_goaway(frame: bytes, code: ErrorCode) -> None:
    conn = raw_peer()
    assert_terminated(conn, conn.receive_data(frame, 1.0), code)


def test_a_protocol_error_resets_every_open_stream() -> None:
    conn = raw_peer(client=False)
    events = conn.receive_data(open_frame(1) + open_frame(3) + ping(bytes(3)), 1.0)
    assert [type(e).__name__ for e in events] == [
        "StreamOpened",
        "StreamOpened",
        "StreamReset",
        "StreamReset",
        "ConnectionTerminated",
    ]
    assert not conn.is_open(1) and conn.open_streams == 0
    assert conn.receive_data(open_frame(5), 2.0) == []  # nothing after the end


def test_events_before_the_error_in_the_same_read_are_kept() -> None:
    conn = raw_peer(client=False)
    events = conn.receive_data(open_frame(1) + data(1, b"ok", fin=True) + ping(b""), 1.0)
    assert events[:3] == [StreamOpened(1, {"t": "x"}), DataReceived(1, b"ok"), StreamEnded(1)]
    assert terminated(events) is not None


def test_replies_queued_counts_the_answers_a_peer_can_ask_for() -> None:
    """PING ACKs and RESETs of the peer's streams (refused, malformed, or reset by the
    application) are counted, so the adapter can bound those the peer leaves unread;
    what this side starts (its PINGs, OPENs, its own streams' RESETs) is not."""
    conn = raw_peer(local=LinkSettings(max_streams=1))
    assert conn.replies_queued == 0
    conn.receive_data(ping(), 1.0)
    assert conn.replies_queued == 20
    conn.receive_data(ping(ack=True), 1.0)  # an answer is not answered
    assert conn.replies_queued == 20
    conn.receive_data(fr.encode(FrameType.OPEN, 0, 1, b"\xff"), 1.0)  # malformed: RESET
    assert conn.replies_queued == 36
    conn.receive_data(open_frame(3) + open_frame(5), 1.0)  # 5 is over MAX_STREAMS: RESET
    assert conn.replies_queued == 52
    conn.reset_stream(3, ErrorCode.FORBIDDEN)  # the application refuses the peer's stream
    assert conn.replies_queued == 68
    ours = conn.open_stream({"t": "x"})
    conn.reset_stream(ours)
    conn.handle_timer(20.0)  # our keepalive PING: not an answer
    assert conn.replies_queued == 68
