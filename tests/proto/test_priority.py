"""Stream priorities: the priority field, the send scheduler, PRIORITY_UPDATE.

The property test drives two Connections against each other and decodes every byte the
sender emits: a DATA frame of urgency u must never leave while a stream of a lower
urgency number has bytes queued (they were accepted by send_data(), so they have
credit), and every stream's bytes must still arrive whole and in order. It also follows
each queued frame's cost (payload plus QUEUED_FRAME_COST, or QUEUED_VIEW_COST for a slice
of a write split into frames), which the adapter's queue bounds count.
"""

from __future__ import annotations

from collections import deque

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.proto import frames as fr
from relay.proto import priority
from relay.proto.errors import ErrorCode
from relay.proto.events import ConnectionTerminated, DataReceived, StreamOpened
from relay.proto.frames import FrameType
from relay.proto.mux import Connection, LinkSettings
from relay.proto.priority import (
    DEFAULT_PRIORITY,
    QUEUED_FRAME_COST,
    QUEUED_VIEW_COST,
    Priority,
    Scheduler,
    frame_cost,
    parse_priority,
)
from relay.wire import HEADER_PRIORITY
from tests.proto.harness import CLIENT, SERVER, Link, open_frame, raw_peer

FRAME = 16 * 1024
SETTINGS = LinkSettings(max_frame=FRAME)


def _data_order(raw: bytes) -> list[int]:
    """Stream ids of the DATA frames in `raw`, in order."""
    decoder = fr.FrameDecoder(fr.MAX_MAX_FRAME)
    return [f.stream_id for f in decoder.feed(raw) if f.type == FrameType.DATA]


def _pair() -> Link:
    link = Link(SETTINGS, SETTINGS)
    link.exchange()
    return link


# ---------------------------------------------------------------- the field


def test_parse_priority_follows_rfc_9218_syntax() -> None:
    assert parse_priority("u=6") == Priority(6, True)
    assert parse_priority("u=1, i") == Priority(1, True)
    assert parse_priority("u=0, i=?0") == Priority(0, False)
    assert parse_priority("i=?1,u=7") == Priority(7, True)
    assert parse_priority("u=5;x=1, foo=bar, i=?0") == Priority(5, False)  # params, unknowns


def test_parse_priority_keeps_the_default_for_what_is_malformed() -> None:
    assert parse_priority(None) == DEFAULT_PRIORITY
    assert parse_priority("") == DEFAULT_PRIORITY
    assert parse_priority("u=8") == DEFAULT_PRIORITY
    assert parse_priority("u=-1, i=maybe") == DEFAULT_PRIORITY
    assert parse_priority("u=" + "1" * 100) == DEFAULT_PRIORITY
    base = Priority(6, False)
    assert parse_priority("u=x", base) == base  # a bad update changes nothing
    assert parse_priority("i", base) == Priority(6, True)


def test_the_core_and_relay_wire_agree_on_the_header_name() -> None:
    assert priority.HEADER_PRIORITY == HEADER_PRIORITY == "priority"


def test_priority_field_round_trips_and_rejects_bad_urgency() -> None:
    for urgency in range(8):
        for incremental in (True, False):
            prio = Priority(urgency, incremental)
            assert parse_priority(prio.field()) == prio
    for bad in (-1, 8):
        try:
            Priority(bad)
        except ValueError:
            continue
        raise AssertionError(f"urgency {bad} accepted")


# ---------------------------------------------------------------- the scheduler


def _sched(*streams: tuple[int, Priority]) -> Scheduler:
    sched = Scheduler()
    for order, (sid, prio) in enumerate(streams):
        sched.add(sid, prio, order)
    return sched


def _order(sched: Scheduler, limit: int | None = None) -> list[int]:
    out: list[bytes | memoryview] = []
    sched.pop(limit, out)
    return _data_order(b"".join(out))


def _queue(sched: Scheduler, sid: int, frames: int, size: int = 100) -> None:
    for _ in range(frames):
        sched.push(sid, fr.encode_header(FrameType.DATA, 0, sid, size), b"x" * size)


def test_lowest_urgency_goes_first_whatever_was_queued_first() -> None:
    sched = _sched((1, Priority(6)), (3, Priority(3)), (5, Priority(0)))
    _queue(sched, 1, 3)
    _queue(sched, 3, 2)
    _queue(sched, 5, 1)
    assert sched.queued_up_to(3) == 300 and sched.queued == 600
    assert _order(sched) == [5, 3, 3, 1, 1, 1]
    assert sched.queued == 0


def test_incremental_streams_of_one_urgency_share_round_robin() -> None:
    sched = _sched((1, Priority(3, True)), (3, Priority(3, True)), (5, Priority(3, True)))
    _queue(sched, 1, 3)
    _queue(sched, 3, 1)
    _queue(sched, 5, 2)
    assert _order(sched) == [1, 3, 5, 1, 5, 1]


def test_non_incremental_streams_go_one_after_another_in_open_order() -> None:
    sched = _sched((1, Priority(3, False)), (3, Priority(3, False)), (5, Priority(3, True)))
    _queue(sched, 5, 2)  # incremental: after the non-incremental ones
    _queue(sched, 3, 2)
    _queue(sched, 1, 2)  # queued last, opened first
    assert _order(sched) == [1, 1, 3, 3, 5, 5]


def test_limit_is_exceeded_by_at_most_one_frame_and_the_rest_waits() -> None:
    sched = _sched((1, Priority(3)), (3, Priority(6)))
    _queue(sched, 3, 4, size=1000)
    _queue(sched, 1, 4, size=1000)
    frame = fr.HEADER_SIZE + 1000
    assert _order(sched, limit=0) == []
    assert _order(sched, limit=1) == [1]  # at least `limit`: a whole frame
    assert _order(sched, limit=frame + 1) == [1, 1]
    _queue(sched, 1, 1, size=1000)  # more urgent data arrives meanwhile: it goes first
    assert _order(sched, limit=frame * 2) == [1, 1]
    assert _order(sched) == [3, 3, 3, 3]


def test_reprioritising_moves_queued_bytes() -> None:
    sched = _sched((1, Priority(3)), (3, Priority(6)))
    _queue(sched, 1, 2)
    _queue(sched, 3, 2)
    sched.set_priority(3, Priority(1))
    assert sched.queued_up_to(1) == 200
    assert _order(sched) == [3, 3, 1, 1]
    assert sched.remove(3) == 0 and sched.remove(99) == 0


def test_queued_cost_counts_each_frame_not_only_its_bytes() -> None:
    """What the adapter's queue bounds count: 1-byte frames cost far more than a byte."""
    sched = _sched((1, Priority(3)), (3, Priority(6)))
    _queue(sched, 1, 1000, size=1)
    assert sched.queued_on(1) == 1000
    assert sched.cost_on(1) == 1000 * (1 + QUEUED_FRAME_COST)
    view = memoryview(bytes(2000))
    sched.push(3, fr.encode_header(FrameType.DATA, 0, 3, 1000), view[:1000])
    assert sched.cost_on(3) == 1000 + QUEUED_VIEW_COST == frame_cost(view[1000:])
    assert sched.cost_up_to(3) == sched.cost_on(1) and sched.cost_up_to(6) == sched.cost
    sched.set_priority(3, Priority(0))
    assert sched.cost_up_to(0) == sched.cost_on(3)
    _order(sched, limit=fr.HEADER_SIZE + 1000)  # stream 3's frame, now the most urgent
    assert sched.cost_on(3) == 0 and sched.cost == sched.cost_on(1)
    sched.remove(1)
    assert sched.cost == 0 and sched.cost_up_to(7) == 0
    _queue(sched, 3, 2)
    sched.clear()
    assert sched.cost == 0


def test_removed_and_finished_streams_leave_nothing_behind() -> None:
    sched = _sched((1, Priority(3, False)), (3, Priority(3, True)))
    _queue(sched, 1, 2)
    _queue(sched, 3, 2)
    assert sched.remove(1) == 200
    sched.finish(3)  # closed both ways, two frames still queued
    assert _order(sched) == [3, 3]
    assert sched.queued == 0 and sched.queued_on(3) == 0 and sched.priority_of(3) is None


# ---------------------------------------------------------------- the connection


def test_open_with_priority_sends_the_header_and_the_peer_adopts_it() -> None:
    link = _pair()
    sid = link.client.open_stream({"target": "x"}, Priority(6))
    link.flush()
    events = link.deliver(CLIENT)
    opened = [e for e in events if isinstance(e, StreamOpened)]
    assert opened[0].headers[HEADER_PRIORITY] == "u=6"
    assert link.server.priority(sid) == Priority(6) == link.client.priority(sid)
    other = link.client.open_stream({"target": "x", HEADER_PRIORITY: "u=1, i=?0"})
    assert link.client.priority(other) == Priority(1, False)
    plain = link.client.open_stream({"target": "x"})
    assert link.client.priority(plain) == DEFAULT_PRIORITY


def test_priority_update_changes_both_sides_and_the_sending_order() -> None:
    link = _pair()
    bulk = link.client.open_stream({"target": "x"}, Priority(6))
    viewer = link.client.open_stream({"target": "x"})
    link.flush()
    link.exchange()
    server = link.server
    server.send_data(bulk, b"b" * FRAME * 2)
    server.send_data(viewer, b"v" * FRAME * 2)
    assert _data_order(server.data_to_send()) == [viewer, viewer, bulk, bulk]
    link.client.set_priority(bulk, Priority(0, False))  # scrolled into view
    link.flush()
    link.exchange()
    assert server.priority(bulk) == Priority(0, False)
    server.send_data(viewer, b"v" * FRAME)
    server.send_data(bulk, b"b" * FRAME)
    assert _data_order(server.data_to_send()) == [bulk, viewer]
    link.client.set_priority(999, Priority(1))  # not open: ignored, nothing sent
    assert link.client.data_to_send() == b""


def test_priority_update_edge_cases() -> None:
    conn = raw_peer()
    conn.receive_data(open_frame(1), 0.0)
    bad = fr.encode(FrameType.PRIORITY_UPDATE, 0, 1, b"u=banana")
    assert conn.receive_data(bad, 0.0) == []
    assert conn.priority(1) == DEFAULT_PRIORITY
    conn.receive_data(fr.encode(FrameType.PRIORITY_UPDATE, 0, 1, b"u=7"), 0.0)
    assert conn.priority(1) == Priority(7)
    conn.reset_stream(1)
    assert conn.receive_data(fr.encode(FrameType.PRIORITY_UPDATE, 0, 1, b"u=1"), 0.0) == []
    too_long = fr.encode(FrameType.PRIORITY_UPDATE, 0, 1, b"u=1, " + b" " * 64)
    events = raw_peer().receive_data(open_frame(1) + too_long, 0.0)
    assert isinstance(events[-1], ConnectionTerminated)
    assert events[-1].code == ErrorCode.FRAME_SIZE_ERROR
    unopened = fr.encode(FrameType.PRIORITY_UPDATE, 0, 7, b"u=1")
    events = raw_peer().receive_data(unopened, 0.0)
    assert isinstance(events[-1], ConnectionTerminated)
    assert events[-1].code == ErrorCode.PROTOCOL_ERROR


def test_a_peer_without_priorities_ignores_the_update() -> None:
    """An old peer treats 0x8 as an unknown type: here the same path, with type 0x1f."""
    conn = raw_peer()
    conn.receive_data(open_frame(1), 0.0)
    assert conn.receive_data(fr.encode(0x1F, 0, 1, b"u=1"), 0.0) == []
    assert conn.is_open(1) and conn.terminated is None


def test_reset_drops_queued_data_and_keeps_its_link_credit() -> None:
    conn = raw_peer(client=True)
    sid = conn.open_stream({"t": "x"})
    conn.data_to_send()
    before = conn.send_credit(sid)
    conn.send_data(sid, b"x" * 1000)
    other = conn.open_stream({"t": "x"})
    assert conn.send_credit(other) == before - 1000
    conn.reset_stream(sid)
    assert conn.queued_data == 0
    assert conn.send_credit(other) == before
    assert _data_order(conn.data_to_send()) == []


def test_fin_after_queued_data_and_close_both_ways_still_sends_everything() -> None:
    link = _pair()
    sid = link.client.open_stream({"t": "x"})
    link.client.send_data(sid, b"a" * 100, end_stream=True)
    link.flush()
    link.exchange()
    link.server.send_data(sid, b"b" * (FRAME * 3), end_stream=True)
    assert link.server.queued_data == FRAME * 3
    assert not link.server.is_open(sid)  # forgotten by the core, frames still queued
    link.flush()
    got = b"".join(e.data for e in link.deliver(SERVER) if isinstance(e, DataReceived))
    assert got == b"b" * (FRAME * 3) and link.server.queued_data == 0


# ---------------------------------------------------------------- property


@st.composite
def _scenario(draw: st.DrawFn) -> tuple[list[int], list[tuple[str, int, int]]]:
    urgencies = draw(st.lists(st.integers(0, 7), min_size=2, max_size=5))
    ops = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["send", "send", "flush", "update"]),
                st.integers(0, len(urgencies) - 1),
                st.integers(0, FRAME * 3),
            ),
            max_size=40,
        )
    )
    return urgencies, ops


@settings(max_examples=200, deadline=None)
@given(_scenario())
def test_no_data_leaves_while_a_more_urgent_stream_has_some_queued(
    scenario: tuple[list[int], list[tuple[str, int, int]]],
) -> None:
    urgencies, ops = scenario
    client = Connection(client=True, settings=SETTINGS, now=0.0)
    server = Connection(client=False, settings=SETTINGS, now=0.0)
    server.receive_data(client.data_to_send(), 0.0)
    client.receive_data(server.data_to_send(), 0.0)
    ids = [client.open_stream({"t": "x"}, Priority(u)) for u in urgencies]
    urgency = dict(zip(ids, urgencies, strict=True))
    queued = dict.fromkeys(ids, 0)
    costs: dict[int, deque[int]] = {sid: deque() for sid in ids}  # per queued frame
    sent: dict[int, bytearray] = {sid: bytearray() for sid in ids}
    received: dict[int, bytearray] = {sid: bytearray() for sid in ids}
    decoder = fr.FrameDecoder(fr.MAX_MAX_FRAME)
    counter = 0

    def pump(limit: int | None) -> None:
        raw = client.data_to_send(limit)
        for frame in decoder.feed(raw):
            if frame.type == FrameType.PRIORITY_UPDATE:
                continue
            if frame.type != FrameType.DATA:
                continue
            sid = frame.stream_id
            waiting = [urgency[t] for t, n in queued.items() if n and t != sid]
            assert not waiting or urgency[sid] <= min(waiting), (sid, urgency, queued)
            queued[sid] -= len(frame.payload)
            assert costs[sid].popleft() - len(frame.payload) in (
                QUEUED_FRAME_COST,
                QUEUED_VIEW_COST,
            )
        for event in server.receive_data(raw, 0.0):
            if isinstance(event, DataReceived):
                received[event.stream_id] += event.data
                server.acknowledge_received_data(event.stream_id, len(event.data))
        client.receive_data(server.data_to_send(), 0.0)

    for op, index, size in ops:
        sid = ids[index]
        if op == "send":
            n = min(size, client.send_credit(sid))
            counter += 1
            payload = bytes([counter % 256]) * n
            client.send_data(sid, payload)
            sent[sid] += payload
            queued[sid] += n
            step = client.peer_max_frame
            if n <= step:
                costs[sid].append(n + QUEUED_FRAME_COST)
            else:
                costs[sid].extend(
                    len(payload[i : i + step]) + QUEUED_VIEW_COST for i in range(0, n, step)
                )
        elif op == "update":
            prio = Priority(size % 8, bool(size & 8))
            client.set_priority(sid, prio)
            urgency[sid] = prio.urgency
        else:
            pump(size)
        for sid in ids:
            assert client.queued_cost_on(sid) == sum(costs[sid]), (sid, costs[sid])
        for u in range(8):
            ahead = sum(sum(costs[t]) for t in ids if urgency[t] <= u)
            assert client.queued_cost_ahead_of(u) == ahead
        assert client.queued_cost == sum(sum(c) for c in costs.values())
    pump(None)
    assert client.queued_cost == 0
    assert all(n == 0 for n in queued.values())
    assert received == sent
    for sid in ids:
        assert server.priority(sid) == client.priority(sid)


def test_a_bare_fin_goes_out_under_a_limit() -> None:
    """A FIN without payload is queued like data: it must not wait for a byte count."""
    link = _pair()
    sid = link.client.open_stream({"t": "x"})
    link.client.data_to_send()
    link.client.end_stream(sid)
    assert link.client.queued_data == 0 and link.client.data_pending
    raw = link.client.data_to_send(limit=1)
    frames = list(fr.FrameDecoder(fr.MAX_MAX_FRAME).feed(raw))
    assert [(f.type, f.flags) for f in frames] == [(FrameType.DATA, fr.Flags.FIN)]
    assert not link.client.data_pending


def test_grow_window_gives_one_stream_more_credit_for_good() -> None:
    """(Without the harness's model, which holds every stream to the announced window.)"""
    client = Connection(client=True, settings=SETTINGS, now=0.0)
    server = Connection(client=False, settings=SETTINGS, now=0.0)

    def exchange() -> list[object]:
        got: list[object] = list(server.receive_data(client.data_to_send(), 0.0))
        got += client.receive_data(server.data_to_send(), 0.0)
        return got

    exchange()
    sid = client.open_stream({"t": "x"})
    other = client.open_stream({"t": "x"})
    exchange()
    window = server.send_credit(other)
    client.grow_window(sid, 3 * FRAME)
    client.grow_window(999, FRAME)  # not open: ignored
    exchange()
    assert server.send_credit(sid) == window + 3 * FRAME
    assert server.send_credit(other) == window
    # The receiver accepts all of it (no FLOW_CONTROL_ERROR) and returns it as read.
    server.send_data(sid, b"z" * (window + 3 * FRAME))
    events = client.receive_data(server.data_to_send(), 0.0)
    got = sum(len(e.data) for e in events if isinstance(e, DataReceived))
    assert got == window + 3 * FRAME and client.terminated is None
    client.acknowledge_received_data(sid, got)
    exchange()
    assert server.send_credit(sid) == window + 3 * FRAME


def test_emitted_counts_by_urgency_and_in_flight_follows_grants() -> None:
    link = _pair()
    client = link.client
    sid = client.open_stream({"t": "x"}, Priority(6))
    size = SETTINGS.stream_window // 2  # acknowledged at once: more than a quarter window
    client.send_data(sid, b"x" * size)
    assert client.in_flight(sid) == size and client.emitted(6) == 0  # queued counts as sent
    link.flush()
    assert client.emitted(6) == size and client.emitted(3) == 0
    link.exchange()
    link.server.acknowledge_received_data(sid, size)
    link.flush()
    link.exchange()
    assert client.in_flight(sid) == 0
    assert client.in_flight(999) == 0


def test_a_flooding_session_does_not_starve_a_small_one_on_the_same_link() -> None:
    """Two devices' sessions on one gateway link, as the gateway opens them (their
    `priority` header dropped: u=3, incremental). Device A reads a huge C-GET as fast as
    it can, so the agent keeps A's queue full; device B asks small things, one answer
    per round. The transport takes one frame's worth per round (the worst case for B).
    Counted, not timed: each of B's answers leaves in the round it was queued or the next,
    with at most one of A's frames between two of B's, while A's backlog never drains."""
    agent = Connection(client=False, settings=SETTINGS, now=0.0)
    gateway = Connection(client=True, settings=SETTINGS, now=0.0)
    flood = gateway.open_stream({"target": "session"})
    small = gateway.open_stream({"target": "session"})
    agent.receive_data(gateway.data_to_send(), 0.0)
    gateway.receive_data(agent.data_to_send(), 0.0)
    answer = b"b" * 300
    queued_at: deque[int] = deque()
    waits: list[int] = []
    flood_between: list[int] = []
    flood_since = flood_total = 0
    for round_ in range(200):
        while agent.queued_on(flood) < 4 * FRAME:  # A's writer keeps its queue full
            agent.send_data(flood, b"a" * FRAME)
        agent.send_data(small, answer)
        queued_at.append(round_)
        for event in gateway.receive_data(agent.data_to_send(limit=FRAME), 0.0):
            if not isinstance(event, DataReceived):
                continue
            gateway.acknowledge_received_data(event.stream_id, len(event.data))
            if event.stream_id == small:
                waits.append(round_ - queued_at.popleft())
                flood_between.append(flood_since)
                flood_since = 0
            else:
                flood_since += len(event.data)
                flood_total += len(event.data)
        agent.receive_data(gateway.data_to_send(), 0.0)  # A's and B's credit back
        assert agent.queued_on(flood) > 0  # A still has a backlog: contention throughout
    assert len(waits) >= 199 and max(waits) <= 1
    assert max(flood_between) <= FRAME
    assert flood_total >= 100 * FRAME  # and A is not starved either: it gets the rest
