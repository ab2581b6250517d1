"""Streams widened by `grow_window` (the workstation's viewer streams) and the link window.

A widened stream may have more in flight than its base window, but if its reader stalls,
what it holds unread must not take the link window from the other streams: it holds link
credit for at most one base window (`stream_window`), and `extra_window_limit` bounds
what all widened streams may hold beyond the link window. Unit tests, then a Hypothesis
state machine over a receiver that widens, reads, stalls, ends and resets streams,
checked against the harness's wire model (which allows a stream exactly the extra the
test gave it, and never more link credit than the link window). Streams held below a base
window (`hold_link_credit`, the workstation's forwards) are part of the same machine.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from relay.proto import frames as fr
from relay.proto.errors import ErrorCode
from relay.proto.events import DataReceived, Event, StreamEnded, StreamReset
from relay.proto.frames import FrameType
from relay.proto.mux import Connection, LinkSettings
from tests.proto.harness import CLIENT, SERVER, Link

MIB = 1024 * 1024
WINDOW = MIB  # the defaults: stream window 1 MiB, link window 16 MiB
LINK = 16 * MIB
EXTRA = 3 * MIB  # relay.workstation.priorities.VIEWER_WINDOW
CHUNK = 256 * 1024
HOLD = 16 * 1024  # relay.workstation.session.FORWARD_LINK_CREDIT
# A link window of 4 MiB: reading one base window (a quarter of it) returns link credit
# at once instead of batching it.
NARROW = LinkSettings(link_window=4 * WINDOW)


def _grow(link: Link, sid: int, extra: int) -> bool:
    """The client (receiver) widens stream `sid`; the wire model is told it may."""
    granted = link.client.grow_window(sid, extra)
    if granted is not False:  # (None from a core that predates the answer)
        model = link.credit[SERVER].stream_extra
        model[sid] = model.get(sid, 0) + extra
    link.flush()
    return bool(granted)


def _settle(link: Link) -> None:
    """Flush both cores and deliver everything both ways until nothing moves."""
    link.flush()
    link.exchange()


def _fill(link: Link, sid: int) -> int:
    """The server sends on `sid` until it has no credit left; the bytes sent."""
    sent = 0
    while (credit := link.server.send_credit(sid)) > 0:
        link.server.send_data(sid, b"x" * min(credit, CHUNK))
        sent += min(credit, CHUNK)
        _settle(link)
    return sent


def _link_grants(raw: bytes) -> int:
    """Link credit in WINDOW_UPDATEs not yet delivered (whole frames: the client's
    output is always delivered whole)."""
    frames = fr.FrameDecoder(fr.MAX_MAX_FRAME).feed(raw)
    return sum(
        fr.decode_u32(f.payload, "WINDOW_UPDATE")
        for f in frames
        if f.type == FrameType.WINDOW_UPDATE and f.stream_id == 0
    )


def _batched(link: Link) -> int:
    """Link credit the client returned but batches until a quarter of the link window."""
    pending: int = link.client._recv_link.pending
    return pending


def _received(events: list[Event], sid: int) -> int:
    return sum(len(e.data) for e in events if isinstance(e, DataReceived) and e.stream_id == sid)


def test_stalled_wide_streams_leave_the_rest_of_the_link_to_the_others() -> None:
    """Four viewers that stop reading (4 x (1 + 3) MiB unread) used to hold all 16 MiB
    of link window: every other stream stopped until they were aborted."""
    link = Link()
    _settle(link)
    stalled = [link.client.open_stream({"t": "get"}) for _ in range(4)]
    other = link.client.open_stream({"t": "find"})
    for sid in stalled:
        _grow(link, sid, EXTRA)
    _settle(link)
    for sid in stalled:
        assert _fill(link, sid) == WINDOW + EXTRA  # the whole widened window, never read
    assert link.credit[SERVER].link_credit() == LINK - 4 * WINDOW
    assert link.server.send_credit(other) == WINDOW
    link.server.send_data(other, b"f" * WINDOW, end_stream=True)
    link.flush()
    events, _ = link.exchange()  # (flushed just above)
    assert _received(events, other) == WINDOW


def test_a_wide_stream_read_late_gives_back_exactly_what_it_held() -> None:
    link = Link(NARROW, NARROW)
    _settle(link)
    sid = link.client.open_stream({"t": "get"})
    assert _grow(link, sid, EXTRA)
    _settle(link)
    _fill(link, sid)
    assert link.credit[SERVER].link_credit() == NARROW.link_window - WINDOW
    # Reading what is beyond the base window returns no link credit (it went back on
    # arrival); reading the rest returns the base window's worth.
    link.client.acknowledge_received_data(sid, EXTRA)
    _settle(link)
    assert link.credit[SERVER].link_credit() == NARROW.link_window - WINDOW
    assert link.server.send_credit(sid) == EXTRA
    link.client.acknowledge_received_data(sid, WINDOW)
    _settle(link)
    assert link.credit[SERVER].link_credit() == NARROW.link_window
    assert link.server.send_credit(sid) == WINDOW + EXTRA


def test_extra_window_is_bounded_and_comes_back_when_a_stream_is_done() -> None:
    link = Link(NARROW, NARROW)
    _settle(link)
    client = link.client
    client.extra_window_limit = 2 * EXTRA
    first, second, third = (client.open_stream({"t": "get"}) for _ in range(3))
    assert _grow(link, first, EXTRA) and _grow(link, second, EXTRA)
    assert not _grow(link, third, EXTRA)  # over the limit: the base window only
    assert client.extra_window_held == 2 * EXTRA
    _settle(link)
    assert link.server.send_credit(third) == WINDOW
    # A reset stream's extra comes back at once.
    client.reset_stream(first)
    assert client.extra_window_held == EXTRA
    assert _grow(link, third, EXTRA)
    # An ended stream's only once its unread bytes fit its base window: until then they
    # are memory here beyond the link window.
    _settle(link)
    assert _fill(link, second) == WINDOW + EXTRA
    link.server.end_stream(second)
    _settle(link)
    assert client.extra_window_held == 2 * EXTRA
    client.acknowledge_received_data(second, EXTRA)
    assert client.extra_window_held == EXTRA
    client.acknowledge_received_data(second, WINDOW)
    _settle(link)
    assert link.credit[SERVER].link_credit() == NARROW.link_window


def test_many_stalled_held_streams_leave_the_link_to_the_others() -> None:
    """Sixteen forwarded connections whose programs stop reading used to hold 16 x 1 MiB,
    the whole link window; held to 16 KiB each, they hold a sixty-fourth of it."""
    link = Link()
    _settle(link)
    stalled = [link.client.open_stream({"t": "tcp:x"}) for _ in range(16)]
    other = link.client.open_stream({"t": "find"})
    for sid in stalled:
        assert link.client.hold_link_credit(sid, HOLD)
    _settle(link)
    for sid in stalled:
        assert _fill(link, sid) == WINDOW  # the stream's own window, never read
    assert link.credit[SERVER].link_credit() == LINK - 16 * HOLD
    assert link.server.send_credit(other) == WINDOW
    # Read late, exactly the hold comes back; reset, too (batched: below a quarter link).
    link.client.acknowledge_received_data(stalled[0], WINDOW)
    link.client.reset_stream(stalled[1])
    _settle(link)
    assert _batched(link) == 2 * HOLD


def test_a_hold_set_late_gives_back_what_is_beyond_it_at_once() -> None:
    link = Link(NARROW, NARROW)
    _settle(link)
    sid = link.client.open_stream({"t": "tcp:x"})
    _settle(link)
    _fill(link, sid)
    assert link.credit[SERVER].link_credit() == NARROW.link_window - WINDOW
    assert link.client.hold_link_credit(sid, HOLD)
    _settle(link)
    assert link.credit[SERVER].link_credit() == NARROW.link_window - HOLD
    assert not link.client.hold_link_credit(sid, HOLD)  # only lowers
    assert not link.client.hold_link_credit(sid, -1)
    assert not link.client.hold_link_credit(999, 0)
    link.server.end_stream(sid)
    _settle(link)
    assert not link.client.hold_link_credit(sid, 0)  # closed for receiving
    link.client.end_stream(sid)
    link.client.acknowledge_received_data(sid, WINDOW)  # closed both ways: the rest
    _settle(link)
    assert link.credit[SERVER].link_credit() + _batched(link) == NARROW.link_window
    assert not link.client._holds


def test_grow_window_refuses_what_it_cannot_give() -> None:
    conn = Connection(client=True, settings=LinkSettings(), now=0.0)
    sid = conn.open_stream({"t": "x"})
    assert not conn.grow_window(sid, 0)
    assert not conn.grow_window(999, MIB)
    assert not conn.grow_window(sid, LINK + 1)  # the default limit: one link window
    assert conn.grow_window(sid, LINK)
    assert conn.extra_window_held == LINK


# ---------------------------------------------------------------------- the property

SMALL = LinkSettings(
    stream_window=64 * 1024,
    link_window=256 * 1024,
    max_frame=16 * 1024,
    max_streams=8,
    keepalive_interval=3600.0,
    keepalive_timeout=1e9,
)
SMALL_EXTRA = (16 * 1024, 64 * 1024, 192 * 1024)
SMALL_HOLDS = (0, 4 * 1024, 20 * 1024)
LIMIT = 512 * 1024


@dataclass
class Held:
    """The receiver application's view of one stream the client opened."""

    unread: int = 0
    gone: bool = False  # reset by either side
    ended: bool = False  # the server's FIN arrived
    fin_sent: bool = False  # the server half-closed
    client_fin: bool = False  # the client half-closed
    wide: bool = False
    hold: int = SMALL.stream_window  # link credit its unread bytes may hold


class WideStreams(RuleBasedStateMachine):
    """The client opens streams and widens some; the server sends on them; the client
    reads any amount, or never (stalled), resets; deliveries are cut anywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.link = Link(SMALL, SMALL, keep_frames=False)
        self.link.client.extra_window_limit = LIMIT
        self.held: dict[int, Held] = {}

    def _on_events(self, events: list[Event]) -> None:
        for event in events:
            match event:
                case DataReceived(stream_id=sid, data=data):
                    self.held[sid].unread += len(data)
                case StreamEnded(stream_id=sid):
                    self.held[sid].ended = True
                case StreamReset(stream_id=sid):
                    self.held[sid].gone = True
                    self.held[sid].unread = 0

    def _live(self) -> list[int]:
        return sorted(sid for sid, h in self.held.items() if not h.gone)

    @initialize()
    def start(self) -> None:
        _settle(self.link)

    @rule(extra=st.sampled_from((0, *SMALL_EXTRA)), hold=st.sampled_from((None, *SMALL_HOLDS)))
    def open_stream(self, extra: int, hold: int | None) -> None:
        if not self.link.client.can_open_stream():
            return
        sid = self.link.client.open_stream({"t": "x"})
        self.held[sid] = Held()
        self.link.flush()
        if extra:
            self.held[sid].wide = _grow(self.link, sid, extra)
        if hold is not None:
            self._hold(sid, hold)
        self.link.deliver(CLIENT)  # the server knows the stream (and its window) now

    def _hold(self, sid: int, hold: int) -> None:
        held = self.held[sid]
        granted = self.link.client.hold_link_credit(sid, hold)
        assert granted == (hold < held.hold and not held.ended and not held.gone)
        if granted:
            held.hold = hold
        self.link.flush()

    @rule(data=st.data(), hold=st.sampled_from(SMALL_HOLDS))
    def hold_later(self, data: st.DataObject, hold: int) -> None:
        """A hold set on a stream that has unread bytes already."""
        sids = [s for s in self._live() if self.link.client.is_open(s)]
        sids = [s for s in sids if not self.held[s].ended]
        if not sids:
            return
        self._hold(data.draw(st.sampled_from(sids), label="stream"), hold)

    @rule(data=st.data(), fin=st.booleans())
    def send(self, data: st.DataObject, fin: bool) -> None:
        sids = [s for s in self._live() if not self.held[s].fin_sent]
        sids = [s for s in sids if self.link.server.is_open(s)]
        if not sids:
            return
        sid = data.draw(st.sampled_from(sids), label="stream")
        credit = self.link.server.send_credit(sid)
        size = data.draw(st.integers(0, min(credit, 96 * 1024)), label="size")
        self.link.server.send_data(sid, b"d" * size, end_stream=fin)
        self.held[sid].fin_sent = fin
        self.link.flush()

    @rule(data=st.data())
    def flood(self, data: st.DataObject) -> None:
        """The server sends all the credit it has on one stream (a reader that stalls
        is one that reads none of it)."""
        sids = [s for s in self._live() if not self.held[s].fin_sent]
        sids = [s for s in sids if self.link.server.send_credit(s) > 0]
        if not sids:
            return
        sid = data.draw(st.sampled_from(sids), label="stream")
        self.link.server.send_data(sid, b"f" * self.link.server.send_credit(sid))
        self.link.flush()

    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        sids = [s for s in self._live() if self.held[s].unread]
        if not sids:
            return
        sid = data.draw(st.sampled_from(sids), label="stream")
        amount = data.draw(st.integers(1, self.held[sid].unread), label="amount")
        self.link.client.acknowledge_received_data(sid, amount)
        self.held[sid].unread -= amount
        self.link.flush()

    @rule(data=st.data(), by_server=st.booleans())
    def reset(self, data: st.DataObject, by_server: bool) -> None:
        side = SERVER if by_server else CLIENT
        sids = [s for s in self._live() if self.link.conns[side].is_open(s)]
        if not sids:
            return
        sid = data.draw(st.sampled_from(sids), label="stream")
        self.link.conns[side].reset_stream(sid, ErrorCode.CANCEL)
        if side == CLIENT:
            self.held[sid].gone = True
            self.held[sid].unread = 0
        self.link.flush()

    @rule(data=st.data())
    def deliver_to_client(self, data: st.DataObject) -> None:
        whole = st.just(self.link.pending(SERVER))
        size = data.draw(whole | st.integers(0, self.link.pending(SERVER)), label="bytes")
        self._on_events(self.link.deliver(SERVER, size))

    @rule()
    def deliver_to_server(self) -> None:
        self.link.deliver(CLIENT)

    @invariant()
    def unread_bytes_hold_at_most_a_base_window_of_link_credit_each(self) -> None:
        """What the server may still send on the link, by the wire model, is the link
        window less at most a base window per stream's unread bytes, less what is on
        the way (in the pipe, or a frame cut in two), less at most the batch the
        receiver has not yet granted back."""
        conn = self.link.client
        assert conn.terminated is None, conn.terminated
        charged = sum(min(h.unread, h.hold) for h in self.held.values())
        credit = self.link.credit[SERVER].link_credit()
        on_the_way = self.link.pending(SERVER)  # an upper bound on the DATA bytes in it
        granted = _link_grants(bytes(self.link.pipes[CLIENT].pending))
        assert credit + granted <= SMALL.link_window - charged
        cut = fr.HEADER_SIZE + SMALL.max_frame  # a frame delivered in part, not yet decoded
        low = SMALL.link_window - charged - on_the_way - cut - SMALL.link_window // 4
        assert credit + granted >= low
        beyond = sum(max(0, h.unread - SMALL.stream_window) for h in self.held.values())
        assert beyond <= conn.extra_window_held <= LIMIT
        assert all(h.wide for h in self.held.values() if h.unread > SMALL.stream_window)

    def teardown(self) -> None:
        """Read everything and end every stream: the whole link window comes back, and
        no extra window is left held."""
        for _ in range(100):
            for sid in self._live():
                held = self.held[sid]
                if held.unread:
                    self.link.client.acknowledge_received_data(sid, held.unread)
                    held.unread = 0
                if not held.fin_sent and self.link.server.is_open(sid):
                    self.link.server.end_stream(sid)
                    held.fin_sent = True
                if not held.client_fin and self.link.client.is_open(sid):
                    self.link.client.end_stream(sid)
                    held.client_fin = True
            self.link.flush()
            if not self.link.pending(CLIENT) and not self.link.pending(SERVER):
                break
            self._on_events(self.link.deliver(SERVER))
            self.link.deliver(CLIENT)
        assert self.link.client.extra_window_held == 0
        assert self.link.client.open_streams == 0
        assert not self.link.client._holds
        # The batch not yet granted back is less than a quarter window: a probe forces it.
        sid = self.link.server.open_stream({"t": "probe"})
        _settle(self.link)
        self.link.server.send_data(sid, b"p" * (SMALL.link_window // 4), end_stream=True)
        self.link.flush()
        self.link.deliver(SERVER)
        self.link.client.acknowledge_received_data(sid, SMALL.link_window // 4)
        _settle(self.link)
        assert self.link.credit[SERVER].link_credit() == SMALL.link_window


WideStreams.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
test_wide_streams = WideStreams.TestCase
