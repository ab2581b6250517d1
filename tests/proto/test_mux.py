"""The multiplexing state machine, two cores in memory: streams, credit, keepalive, goaway."""

from __future__ import annotations

import pytest

from relay.proto import frames as fr
from relay.proto.errors import (
    ErrorCode,
    FlowControlError,
    LinkClosedError,
    StreamStateError,
)
from relay.proto.events import (
    ConnectionTerminated,
    ControlReceived,
    CreditAvailable,
    DataReceived,
    Event,
    GoAwayReceived,
    PongReceived,
    StreamEnded,
    StreamOpened,
    StreamReset,
)
from relay.proto.frames import FrameType
from relay.proto.mux import Connection, LinkSettings
from tests.proto.harness import CLIENT, SERVER, Link, raw_peer, terminated

SMALL = LinkSettings(stream_window=64 * 1024, link_window=128 * 1024, max_frame=16 * 1024)
KEEPALIVE = LinkSettings(keepalive_interval=10.0, keepalive_timeout=30.0)


def _data(events: list[Event], stream_id: int) -> bytes:
    return b"".join(
        e.data for e in events if isinstance(e, DataReceived) and e.stream_id == stream_id
    )


def _types(events: list[Event]) -> list[type[Event]]:
    return [type(e) for e in events]


def _ready(client: LinkSettings | None = None, server: LinkSettings | None = None) -> Link:
    link = Link(client, server)
    for events in link.exchange():  # SETTINGS that grow a window announce credit, no more
        assert all(e == CreditAvailable(0) for e in events), events
    return link


def _app(events: list[Event]) -> list[Event]:
    """Events without CreditAvailable, which windows growing from SETTINGS may add."""
    return [e for e in events if not isinstance(e, CreditAvailable)]


# ---------------------------------------------------------------------- settings


def test_settings_are_sent_first_and_learnt_by_the_peer() -> None:
    server_settings = LinkSettings(max_frame=20_000, stream_window=70_000, max_streams=7)
    link = Link(None, server_settings)
    first = link.sent_frames(SERVER)[0]
    assert first.type == FrameType.SETTINGS
    assert link.client.peer_max_frame == fr.DEFAULT_MAX_FRAME  # defaults until it arrives
    link.exchange()
    assert link.client.peer_max_frame == 20_000
    assert link.credit[CLIENT].stream_window == 70_000
    for _ in range(7):
        link.client.open_stream({"t": "x"})
    assert not link.client.can_open_stream()


def test_settings_that_grow_a_window_announce_link_credit() -> None:
    """A sender blocked on the 64 KiB defaults learns that it may go on."""
    link = Link(LinkSettings(), SMALL)
    client_events, server_events = link.exchange()
    assert client_events == [CreditAvailable(0)]  # SMALL's link window is 128 KiB
    assert server_events == [CreditAvailable(0)]  # the defaults: 1 MiB and 16 MiB
    plain = LinkSettings(stream_window=fr.DEFAULT_STREAM_WINDOW, link_window=fr.DEFAULT_LINK_WINDOW)
    assert Link(plain, plain).exchange() == ([], [])


def test_streams_opened_before_settings_get_the_announced_window() -> None:
    """Credit assumed from the defaults is corrected by the peer's SETTINGS."""
    link = Link(None, LinkSettings(stream_window=200_000, link_window=400_000))
    sid = link.client.open_stream({"t": "x"})
    assert link.client.send_credit(sid) == fr.DEFAULT_STREAM_WINDOW
    link.exchange()
    assert link.client.send_credit(sid) == 200_000
    assert link.expected_send_credit(CLIENT, sid) == 200_000


def test_data_sent_before_settings_arrive_is_accepted() -> None:
    link = Link(SMALL, SMALL)
    sid = link.client.open_stream({"t": "x"})
    link.client.send_data(sid, b"a" * 1000, end_stream=True)
    link.flush()
    _, server_events = link.exchange()
    assert _types(_app(server_events)) == [StreamOpened, DataReceived, StreamEnded]


# ---------------------------------------------------------------------- streams


def test_open_data_half_close_both_ways() -> None:
    link = _ready()
    sid = link.client.open_stream({"target": "pacs", "codec": "zstd"})
    assert sid % 2 == 1
    link.client.send_data(sid, b"hello")
    link.client.end_stream(sid)
    link.flush()
    _, events = link.exchange()
    assert events == [
        StreamOpened(sid, {"target": "pacs", "codec": "zstd"}),
        DataReceived(sid, b"hello"),
        StreamEnded(sid),
    ]
    # Half-closed by the client: the server can still answer, then close its side.
    assert link.server.is_open(sid)
    link.server.send_data(sid, b"reply", end_stream=True)
    link.flush()
    events, _ = link.exchange()
    assert events == [DataReceived(sid, b"reply"), StreamEnded(sid)]
    assert not link.client.is_open(sid) and not link.server.is_open(sid)
    assert link.client.open_streams == link.server.open_streams == 0


def test_server_streams_use_even_ids_and_ids_increase() -> None:
    link = _ready()
    assert [link.server.open_stream({"t": "x"}) for _ in range(3)] == [2, 4, 6]
    assert [link.client.open_stream({"t": "x"}) for _ in range(3)] == [1, 3, 5]
    link.flush()
    client_events, server_events = link.exchange()
    assert [e.stream_id for e in client_events if isinstance(e, StreamOpened)] == [2, 4, 6]
    assert [e.stream_id for e in server_events if isinstance(e, StreamOpened)] == [1, 3, 5]


def test_large_write_is_split_into_frames_of_the_peer_maximum() -> None:
    link = _ready(SMALL, SMALL)
    sid = link.client.open_stream({"t": "x"})
    payload = bytes(range(256)) * 200  # 51200 bytes
    link.client.send_data(sid, payload, end_stream=True)
    link.flush()
    data = link.sent_frames(CLIENT, FrameType.DATA)
    assert [len(f.payload) for f in data] == [16384, 16384, 16384, 2048]
    assert [f.flags for f in data] == [0, 0, 0, fr.Flags.FIN]
    _, events = link.exchange()
    assert _data(events, sid) == payload


def test_send_beyond_credit_raises_and_sends_nothing() -> None:
    link = _ready(SMALL, SMALL)
    sid = link.client.open_stream({"t": "x"})
    link.flush()
    credit = link.client.send_credit(sid)
    assert credit == 64 * 1024
    with pytest.raises(FlowControlError):
        link.client.send_data(sid, bytes(credit + 1))
    assert link.client.data_to_send() == b""
    assert link.client.send_credit(sid) == credit
    link.client.send_data(sid, bytes(credit))
    assert link.client.send_credit(sid) == 0
    with pytest.raises(FlowControlError):
        link.client.send_data(sid, b"x")


def test_credit_comes_back_only_when_the_application_acknowledges() -> None:
    link = _ready(SMALL, SMALL)
    sid = link.client.open_stream({"t": "x"})
    link.client.send_data(sid, bytes(64 * 1024))
    link.flush()
    _, events = link.exchange()
    assert len(_data(events, sid)) == 64 * 1024
    assert link.client.send_credit(sid) == 0
    link.server.acknowledge_received_data(sid, 1000)  # below a quarter window: batched
    link.flush()
    assert link.pending(SERVER) == 0
    link.server.acknowledge_received_data(sid, 15_384)  # now 16 KiB, a quarter
    link.flush()
    client_events, _ = link.exchange()
    assert CreditAvailable(sid) in client_events
    assert link.client.send_credit(sid) == 16 * 1024
    assert link.expected_send_credit(CLIENT, sid) == 16 * 1024


def test_acknowledging_more_than_received_grants_only_what_was_received() -> None:
    link = _ready(SMALL, SMALL)
    sid = link.client.open_stream({"t": "x"})
    link.client.send_data(sid, bytes(20_000))
    link.flush()
    link.exchange()
    link.server.acknowledge_received_data(sid, 10**9)
    link.server.acknowledge_received_data(sid, -5)
    link.server.acknowledge_received_data(12345, 100)  # never opened: ignored
    link.flush()
    link.exchange()
    assert link.client.send_credit(sid) == 64 * 1024  # the model agrees (over-grant checked)


def test_link_window_limits_the_sum_of_streams() -> None:
    link = _ready(SMALL, SMALL)
    a = link.client.open_stream({"t": "x"})
    b = link.client.open_stream({"t": "x"})
    link.flush()
    link.exchange()
    link.client.send_data(a, bytes(64 * 1024))
    link.client.send_data(b, bytes(60 * 1024))
    assert link.client.send_credit(b) == 4 * 1024  # the link has 4 KiB left, the stream more
    with pytest.raises(FlowControlError):
        link.client.send_data(b, bytes(4 * 1024 + 1))


def test_send_after_half_close_or_on_unknown_stream_is_a_state_error() -> None:
    link = _ready()
    sid = link.client.open_stream({"t": "x"})
    link.client.end_stream(sid)
    assert link.client.send_credit(sid) == 0
    with pytest.raises(StreamStateError):
        link.client.send_data(sid, b"x")
    with pytest.raises(StreamStateError):
        link.client.end_stream(sid)
    with pytest.raises(StreamStateError):
        link.client.send_data(99, b"x")


def test_bad_headers_raise_locally_and_consume_no_stream_id() -> None:
    link = _ready()
    with pytest.raises(ValueError):
        link.client.open_stream({"Bad Name": "x"})
    assert link.client.open_stream({"t": "x"}) == 1
    assert link.client.open_streams == 1


def test_open_stream_beyond_the_peers_limit_raises() -> None:
    link = _ready(None, LinkSettings(max_streams=2))
    link.client.open_stream({"t": "x"})
    link.client.open_stream({"t": "x"})
    assert not link.client.can_open_stream()
    with pytest.raises(StreamStateError):
        link.client.open_stream({"t": "x"})


# ---------------------------------------------------------------------- resets and credit


def test_reset_reaches_the_peer_with_its_code_and_later_data_is_dropped() -> None:
    link = _ready(SMALL, SMALL)
    sid = link.client.open_stream({"t": "x"})
    link.client.send_data(sid, b"abc")
    link.flush()
    _, events = link.exchange()
    assert _data(events, sid) == b"abc"
    # The server writes, then the client resets before receiving it.
    link.server.send_data(sid, bytes(30_000))
    link.client.reset_stream(sid, ErrorCode.CONNECT_FAILED)
    link.client.reset_stream(sid, ErrorCode.CANCEL)  # idempotent: one RESET on the wire
    link.flush()
    client_events, server_events = link.exchange()
    assert server_events == [StreamReset(sid, ErrorCode.CONNECT_FAILED, remote=True)]
    assert client_events == []  # data for a reset stream is never delivered
    assert len(link.sent_frames(CLIENT, FrameType.RESET)) == 1
    assert not link.server.is_open(sid)
    with pytest.raises(StreamStateError):
        link.server.send_data(sid, b"x")


def _fill_and_finish_link(link: Link, sender: int) -> int:
    """Probe: a new stream carries a quarter of the receiver's link window and is read.

    The receiver returns link credit in batches of a quarter window, so this forces out
    whatever is batched: afterwards the sender must have its full link window back.
    """
    tx, rx = link.conns[sender], link.conns[1 - sender]
    probe = tx.open_stream({"t": "probe"})
    size = rx.settings.link_window // 4
    tx.send_data(probe, bytes(size), end_stream=True)
    link.flush()
    link.exchange()
    rx.acknowledge_received_data(probe, size)
    rx.end_stream(probe)
    link.flush()
    link.exchange()
    return link.credit[sender].link_credit()


@pytest.mark.parametrize("closer", ["local-reset", "remote-reset", "graceful-then-ack"])
def test_link_credit_returns_for_a_stream_closed_with_data_unread(closer: str) -> None:
    """Unread bytes of a closed stream must not keep link credit forever."""
    link = _ready(SMALL, SMALL)
    sid = link.client.open_stream({"t": "x"})
    link.client.send_data(sid, bytes(50_000), end_stream=True)
    link.flush()
    _, events = link.exchange()
    assert len(_data(events, sid)) == 50_000
    assert link.credit[CLIENT].link_credit() == 128 * 1024 - 50_000
    if closer == "local-reset":  # the server's application gives up without reading
        link.server.reset_stream(sid)
    elif closer == "remote-reset":  # half-closed client aborts while data is unread
        link.client.reset_stream(sid)
    else:  # the server closes too, and reads everything later
        link.server.end_stream(sid)
        link.flush()
        link.exchange()
        assert not link.server.is_open(sid)
        link.server.acknowledge_received_data(sid, 50_000)
        link.server.acknowledge_received_data(sid, 50_000)  # a second time: nothing more
    link.flush()
    link.exchange()
    assert link.client.open_streams == link.server.open_streams == 0
    assert _fill_and_finish_link(link, CLIENT) == 128 * 1024
    assert link.client.open_streams == link.server.open_streams == 0


def test_reset_after_graceful_close_returns_unread_link_credit() -> None:
    link = _ready(SMALL, SMALL)
    sid = link.client.open_stream({"t": "x"})
    link.client.send_data(sid, bytes(50_000), end_stream=True)
    link.flush()
    link.exchange()
    link.server.end_stream(sid)  # closed both ways on the server, 50 000 bytes unread
    link.flush()
    link.exchange()
    link.server.reset_stream(sid)  # the application discards what it never read
    link.flush()
    link.exchange()
    assert _fill_and_finish_link(link, CLIENT) == 128 * 1024


def test_data_on_a_stream_the_receiver_refused_gives_back_link_credit() -> None:
    """Streams opened beyond max_streams before SETTINGS arrive are refused, link survives."""
    link = Link(SMALL, LinkSettings(max_streams=1, **_windows(SMALL)))
    first = link.client.open_stream({"t": "x"})
    second = link.client.open_stream({"t": "x"})  # the client still assumes 100
    link.client.send_data(second, bytes(10_000), end_stream=True)
    link.flush()
    client_events, server_events = link.exchange()
    assert _app(client_events) == [StreamReset(second, ErrorCode.REFUSED_STREAM, remote=True)]
    assert _app(server_events) == [StreamOpened(first, {"t": "x"})]
    assert link.client.terminated is None and link.server.terminated is None
    link.client.reset_stream(first)
    link.flush()
    link.exchange()
    assert _fill_and_finish_link(link, CLIENT) == 128 * 1024


def _windows(settings: LinkSettings) -> dict[str, int]:
    return {
        "stream_window": settings.stream_window,
        "link_window": settings.link_window,
        "max_frame": settings.max_frame,
    }


# ---------------------------------------------------------------------- control, eof


def test_control_messages_round_trip_in_order() -> None:
    link = _ready()
    link.client.send_control("revoke", b"serial=42")
    link.client.send_control("renew", b"")
    link.flush()
    _, events = link.exchange()
    assert events == [ControlReceived("revoke", b"serial=42"), ControlReceived("renew", b"")]


def test_oversized_or_badly_named_control_raises_locally() -> None:
    link = _ready(None, LinkSettings(max_frame=fr.MIN_MAX_FRAME))
    limit = fr.MIN_MAX_FRAME - 1 - len("enroll")
    link.client.send_control("enroll", bytes(limit))  # exactly the peer's maximum frame
    with pytest.raises(ValueError):
        link.client.send_control("enroll", bytes(limit + 1))
    with pytest.raises(ValueError):
        link.client.send_control("Bad Kind", b"")
    link.flush()
    _, events = link.exchange()
    assert events == [ControlReceived("enroll", bytes(limit))]


def test_eof_resets_every_stream_and_ends_the_link() -> None:
    link = _ready()
    sid = link.client.open_stream({"t": "x"})
    events = link.client.receive_eof()
    assert events == [
        StreamReset(sid, ErrorCode.INTERNAL_ERROR, remote=False),
        ConnectionTerminated(ErrorCode.INTERNAL_ERROR, "link lost", True),
    ]
    assert link.client.receive_eof() == []
    assert link.client.receive_data(fr.encode(FrameType.PING, 0, 0, bytes(8)), 1.0) == []
    assert not link.client.can_open_stream()
    with pytest.raises(LinkClosedError):
        link.client.open_stream({"t": "x"})
    with pytest.raises(LinkClosedError):
        link.client.send_data(sid, b"x")
    with pytest.raises(LinkClosedError):
        link.client.send_control("renew", b"")
    assert link.client.next_timer() is None


# ---------------------------------------------------------------------- keepalive


def test_keepalive_pings_after_the_interval_and_measures_rtt() -> None:
    link = _ready(KEEPALIVE, KEEPALIVE)
    assert link.client.next_timer() == 10.0
    assert link.tick(9.9) == ([], [])
    assert link.sent_frames(CLIENT, FrameType.PING) == []
    link.tick(0.1)  # now = 10.0: both sides idle for the interval
    (ping,) = link.sent_frames(CLIENT, FrameType.PING)
    assert len(ping.payload) == 8 and not ping.flags & fr.Flags.ACK
    assert link.client.next_timer() == 30.0  # only the dead-peer deadline is left
    link.now = 10.25
    link.deliver(CLIENT)  # the server answers the ping
    (pong,) = [f for f in link.sent_frames(SERVER, FrameType.PING) if f.flags & fr.Flags.ACK]
    assert pong.payload == ping.payload
    link.now = 10.75
    events = [e for e in link.deliver(SERVER) if isinstance(e, PongReceived)]
    assert events == [PongReceived(0.75)]
    assert link.client.rtt == 0.75
    assert link.client.next_timer() == 10.75 + 10.0


def test_keepalive_times_out_a_silent_peer() -> None:
    conn = Connection(client=True, settings=KEEPALIVE, now=100.0)
    conn.data_to_send()
    assert conn.handle_timer(109.0) == []
    assert conn.data_to_send() == b""
    assert conn.handle_timer(110.0) == []
    (ping,) = fr.FrameDecoder(fr.MAX_MAX_FRAME).feed(conn.data_to_send())
    assert ping.type == FrameType.PING
    assert conn.handle_timer(120.0) == []
    assert conn.data_to_send() == b""  # one ping outstanding at a time
    assert conn.handle_timer(129.99) == []
    events = conn.handle_timer(130.0)
    assert events == [ConnectionTerminated(ErrorCode.KEEPALIVE_TIMEOUT, "peer silent", False)]
    (goaway,) = fr.FrameDecoder(fr.MAX_MAX_FRAME).feed(conn.data_to_send())
    assert fr.decode_goaway(goaway.payload)[1] == ErrorCode.KEEPALIVE_TIMEOUT
    assert conn.handle_timer(200.0) == []


def test_any_input_postpones_the_keepalive() -> None:
    conn = raw_peer(client=True, local=KEEPALIVE)
    conn.receive_data(fr.encode(FrameType.PING, fr.Flags.ACK, 0, bytes(8)), 25.0)
    assert conn.next_timer() == 35.0
    assert conn.handle_timer(34.0) == []
    assert conn.handle_timer(54.0) == []
    assert terminated(conn.handle_timer(55.0)) is not None


def test_unexpected_pong_is_ignored() -> None:
    conn = raw_peer(client=True, local=KEEPALIVE)
    assert conn.receive_data(fr.encode(FrameType.PING, fr.Flags.ACK, 0, bytes(8)), 1.0) == []
    assert conn.terminated is None


# ---------------------------------------------------------------------- goaway


def test_goaway_refuses_new_peer_streams_and_lets_open_ones_finish() -> None:
    link = _ready()
    old = link.client.open_stream({"t": "x"})
    link.flush()
    link.exchange()
    in_flight = link.client.open_stream({"t": "x"})  # sent before the GOAWAY arrives
    link.client.send_data(in_flight, b"lost")
    link.flush()
    link.server.goaway(ErrorCode.SHUTDOWN, "maintenance")
    link.server.goaway()  # once only
    assert not link.server.can_open_stream()
    with pytest.raises(LinkClosedError):
        link.server.open_stream({"t": "x"})
    link.flush()
    client_events, server_events = link.exchange()
    assert server_events == []  # the in-flight stream was refused, its data dropped
    assert StreamReset(in_flight, ErrorCode.REFUSED_STREAM, remote=True) in client_events
    assert GoAwayReceived(old, ErrorCode.SHUTDOWN, "maintenance") in client_events
    assert len(link.sent_frames(SERVER, FrameType.GOAWAY)) == 1
    with pytest.raises(LinkClosedError):
        link.client.open_stream({"t": "x"})
    # The old stream still works both ways.
    link.client.send_data(old, b"ping", end_stream=True)
    link.server.send_data(old, b"pong", end_stream=True)
    link.flush()
    client_events, server_events = link.exchange()
    assert _data(server_events, old) == b"ping" and StreamEnded(old) in server_events
    assert _data(client_events, old) == b"pong" and StreamEnded(old) in client_events
    assert link.client.open_streams == link.server.open_streams == 0
    assert link.client.terminated is None and link.server.terminated is None


def test_receiving_goaway_resets_our_streams_above_last_stream_id() -> None:
    conn = raw_peer(client=True)
    ids = [conn.open_stream({"t": "x"}) for _ in range(3)]
    assert ids == [1, 3, 5]
    events = conn.receive_data(fr.encode_goaway(3, ErrorCode.NO_ERROR, "bye"), 1.0)
    assert events == [
        StreamReset(5, ErrorCode.REFUSED_STREAM, remote=True),
        GoAwayReceived(3, ErrorCode.NO_ERROR, "bye"),
    ]
    assert conn.is_open(1) and conn.is_open(3) and not conn.is_open(5)
    assert conn.goaway_received
    with pytest.raises(LinkClosedError):
        conn.open_stream({"t": "x"})
    assert conn.receive_eof() == [
        StreamReset(1, ErrorCode.INTERNAL_ERROR, remote=False),
        StreamReset(3, ErrorCode.INTERNAL_ERROR, remote=False),
        ConnectionTerminated(ErrorCode.NO_ERROR, "peer closed the link", True),
    ]
