"""What a peer puts in a header value or a PRIORITY_UPDATE cannot raise out of the core.

`parse_priority` promises never to raise; `Connection.receive_data` may only end the link
(ConnectionTerminated) or reset the one stream, and its state stays whole: the frames
after the hostile one are still handled. Unicode digits (`²`, `٣`) are digits to
`str.isdigit()` but not to `int()`, and not RFC 9218 integers.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.proto import frames as fr
from relay.proto.events import PongReceived, StreamOpened
from relay.proto.frames import Flags, FrameType
from relay.proto.priority import (
    DEFAULT_PRIORITY,
    MAX_PRIORITY_FIELD,
    URGENCY_LEVELS,
    Priority,
    parse_priority,
)
from relay.wire import HEADER_PRIORITY, HEADER_TARGET
from tests.proto.harness import open_frame, ping, raw_peer, terminated

# Members that look like priorities, with odd digits, spaces and parameters mixed in.
_ODD = ["\u00b2", "\u0663", "\uff13", "\u2463", "\U0001d7d9", "3", "07", " ", "?0", "?1", ";a"]
_FIELD_TEXT = st.one_of(
    st.text(max_size=MAX_PRIORITY_FIELD + 8),
    st.lists(
        st.tuples(st.sampled_from(["u", "i", "x", " u", "U"]), st.sampled_from([*_ODD, ""])).map(
            lambda kv: f"{kv[0]}={kv[1]}" if kv[1] else kv[0]
        ),
        max_size=4,
    ).map(", ".join),
)


@pytest.mark.parametrize("digit", ["\u00b2", "\u0663", "\uff13", "\u2463", "\U0001d7d9"])
def test_parse_priority_takes_ascii_digits_only(digit: str) -> None:
    assert parse_priority(f"u={digit}") == DEFAULT_PRIORITY
    base = Priority(6, False)
    assert parse_priority(f"u={digit}, i", base) == Priority(6, True)


@settings(max_examples=500, deadline=None)
@given(_FIELD_TEXT, st.integers(0, URGENCY_LEVELS - 1), st.booleans())
def test_parse_priority_never_raises(value: str, urgency: int, incremental: bool) -> None:
    got = parse_priority(value, Priority(urgency, incremental))
    assert isinstance(got, Priority) and 0 <= got.urgency < URGENCY_LEVELS


def _still_alive_after(wire: bytes) -> None:
    """Feed `wire` then a PING: no exception, no termination, and the PING is answered
    (the core was not left half-way through a frame)."""
    conn = raw_peer()
    events = conn.receive_data(wire + ping(b"12345678"), 1.0)
    assert terminated(events) is None
    out = list(fr.FrameDecoder(fr.MAX_MAX_FRAME).feed(conn.data_to_send()))
    assert any(f.type == FrameType.PING and f.flags & Flags.ACK for f in out)


def test_an_open_with_a_superscript_urgency_opens_the_stream_at_the_default() -> None:
    conn = raw_peer()
    events = conn.receive_data(open_frame(1, {HEADER_PRIORITY: "u=\u00b2"}), 1.0)
    assert [type(e) for e in events] == [StreamOpened]
    assert conn.priority(1) == DEFAULT_PRIORITY
    _still_alive_after(open_frame(1, {HEADER_TARGET: "dicom", HEADER_PRIORITY: "u=\u00b2"}))


def test_a_priority_update_with_a_superscript_urgency_changes_nothing_harmful() -> None:
    conn = raw_peer()
    conn.receive_data(open_frame(1, {HEADER_PRIORITY: "u=6"}), 1.0)
    update = fr.encode(FrameType.PRIORITY_UPDATE, 0, 1, "u=\u00b2".encode())
    events = conn.receive_data(update + ping(), 1.0)
    assert terminated(events) is None
    assert conn.priority(1) == DEFAULT_PRIORITY  # the whole field is replaced (RFC 9218)


_NAMES = st.sampled_from([HEADER_PRIORITY, HEADER_TARGET, "codec", "site", "x-relay-peer", "a"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_NAMES, st.one_of(st.text(max_size=80), _FIELD_TEXT), max_size=6))
def test_no_header_value_raises_out_of_receive_data(headers: dict[str, str]) -> None:
    _still_alive_after(open_frame(1, headers))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=MAX_PRIORITY_FIELD))
def test_no_priority_update_payload_raises_out_of_receive_data(payload: bytes) -> None:
    _still_alive_after(open_frame(1) + fr.encode(FrameType.PRIORITY_UPDATE, 0, 1, payload))


def test_a_ping_answer_is_still_measured_after_a_hostile_open() -> None:
    """The keepalive state survives too: our PING's answer gives an RTT."""
    conn = raw_peer()
    conn.handle_timer(conn.settings.keepalive_interval + 1.0)
    (sent,) = [
        f
        for f in fr.FrameDecoder(fr.MAX_MAX_FRAME).feed(conn.data_to_send())
        if f.type == FrameType.PING
    ]
    hostile = open_frame(1, {HEADER_PRIORITY: "u=\u00b2"})
    events = conn.receive_data(hostile + ping(sent.payload, ack=True), 40.0)
    assert any(isinstance(e, PongReceived) for e in events)
