"""Stream priorities through a real Link: the API, and what waits below the core.

Two Links over a real loopback TCP connection with small socket buffers. The receiver
stops reading, so a bulk (u=6) writer fills the sender's transport up to WRITE_HIGH and
then the core's queue up to QUEUE_STREAM; an urgent (u=3) stream written then must
arrive before every bulk byte that was still in the core: only what had already gone
below it (counted by `Link.bytes_out`) may come first. No timing is asserted.
"""

from __future__ import annotations

import asyncio

import pytest

from relay.net import aio
from relay.net.aio import (
    QUEUE_LINK,
    QUEUE_RESERVE,
    QUEUE_STREAM,
    WRITE_HIGH,
    Link,
    Stream,
    fits_in,
    queue_room,
)
from relay.proto import LinkSettings, Priority
from relay.wire import HEADER_PRIORITY
from tests.net.link_pair import small_buffer_pair

WIDE = LinkSettings(stream_window=64 * 1024 * 1024, link_window=64 * 1024 * 1024)
CHUNK = bytes(64 * 1024)
URGENT = 200 * 1024  # within QUEUE_STREAM: it all waits in the core


class _Recorder:
    """Accepts streams and records, per stream, the bytes received and in which order."""

    def __init__(self) -> None:
        self.streams: dict[int, Stream] = {}
        self.order: list[tuple[int, int]] = []  # (stream id, bytes) per DataReceived
        self.opened = asyncio.Event()

    def accept(self, stream: Stream) -> None:
        self.streams[stream.stream_id] = stream
        self.opened.set()
        recorder = self

        class _Listener:
            def on_data(self, s: Stream, data: bytes) -> None:
                recorder.order.append((s.stream_id, len(data)))
                s.acknowledge(len(data))

            def on_end(self, s: Stream) -> None:
                pass

            def on_credit(self, s: Stream) -> None:
                pass

            def on_reset(self, s: Stream, code: int) -> None:
                pass

        stream.listener = _Listener()

    def received(self, stream_id: int) -> int:
        return sum(n for sid, n in self.order if sid == stream_id)


async def _pair(recorder: _Recorder) -> tuple[Link, Link, asyncio.Server]:
    return await small_buffer_pair(WIDE, recorder.accept, peer_sends_small=False)


async def _until(predicate: object, what: str) -> None:
    for _ in range(1000):
        if callable(predicate) and predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


async def _bulk(stream: Stream) -> None:
    while True:
        await stream.write(CHUNK)


async def test_urgent_data_passes_everything_still_queued_in_the_core() -> None:
    recorder = _Recorder()
    client, peer, server = await _pair(recorder)
    assert peer.transport is not None and client.transport is not None
    try:
        peer.transport.pause_reading()
        bulk = client.open_stream({"target": "bulk"}, Priority(6))
        writer = asyncio.create_task(_bulk(bulk))
        conn = client.conn
        await _until(lambda: bulk in client._queue_blocked, "bulk writer waits for the queue")
        await asyncio.sleep(0.05)
        # The bounds hold: the writer waits, the transport holds at most WRITE_HIGH and
        # one frame, the core at most QUEUE_STREAM for the stream (at least half of it:
        # the writer is woken at half).
        assert not writer.done() and not client.writable
        assert conn.queued_cost_on(bulk.stream_id) >= QUEUE_STREAM // 2
        assert client.transport.get_write_buffer_size() <= WRITE_HIGH + conn.peer_max_frame
        assert conn.queued_cost_on(bulk.stream_id) <= QUEUE_STREAM

        urgent = client.open_stream({"target": "urgent"})  # default u=3
        assert urgent.send_credit() > 0  # the bulk's queue does not block a more urgent one
        await urgent.write(bytes(URGENT))
        await asyncio.sleep(0.05)  # let any flush happen: the transport is paused
        below_core = client.bytes_out
        assert conn.queued_on(urgent.stream_id) == URGENT

        peer.transport.resume_reading()
        await _until(lambda: recorder.received(urgent.stream_id) == URGENT, "urgent arrived")
        last_urgent = max(i for i, (sid, _) in enumerate(recorder.order) if sid == urgent.stream_id)
        bulk_before = sum(n for sid, n in recorder.order[:last_urgent] if sid == bulk.stream_id)
        assert bulk_before <= below_core
        # The bulk's queued bytes were still in the core when the urgent ones went.
        await _until(lambda: recorder.received(bulk.stream_id) > below_core, "bulk goes on")
        writer.cancel()
    finally:
        client.abort()
        peer.abort()
        server.close()


async def test_queue_bound_per_urgency_leaves_room_for_more_urgent_streams() -> None:
    recorder = _Recorder()
    client, peer, server = await _pair(recorder)
    assert peer.transport is not None
    try:
        peer.transport.pause_reading()
        streams = [client.open_stream({"target": f"b{i}"}, Priority(6)) for i in range(4)]
        writers = [asyncio.create_task(_bulk(s)) for s in streams]
        conn = client.conn
        await _until(lambda: all(s in client._queue_blocked for s in streams), "all wait")
        await asyncio.sleep(0.05)
        queued = conn.queued_cost  # the bounds count cost: payload and per-frame memory
        assert QUEUE_LINK // 2 <= queued <= QUEUE_LINK and not any(w.done() for w in writers)
        # A more urgent stream has the whole of its own queue; a less urgent one only
        # what is left of the link's.
        frame = conn.peer_max_frame
        u = client.open_stream({"target": "u"}, Priority(5))
        assert u.send_credit() == fits_in(QUEUE_STREAM, frame)
        v = client.open_stream({"target": "v"}, Priority(7))
        assert v.send_credit() == fits_in(QUEUE_LINK - queued, frame)
        for writer in writers:
            writer.cancel()
    finally:
        client.abort()
        peer.abort()
        server.close()


async def test_two_full_queues_leave_room_for_a_small_writer() -> None:
    """Two sessions of a gateway link keep their queues full (devices reading C-GETs as
    fast as they can) and a third has small answers, all at the default urgency, as the
    gateway opens them. The two fill the core's queue first (as when they are woken
    before the third, each time it drained to half): the third still has room
    (QUEUE_RESERVE). Before, the two held all of QUEUE_LINK and the third found it full
    again after every drain, for as long as they wrote. Then its answers arrive while the
    two go on writing."""
    recorder = _Recorder()
    client, peer, server = await _pair(recorder)
    try:
        floods = [client.open_stream({"target": f"session{i}"}) for i in range(2)]
        small = client.open_stream({"target": "session2"})
        conn = client.conn
        for flood in floods:  # no await: nothing is flushed meanwhile
            while (credit := flood.send_credit()) > 0:
                flood.send_nowait(bytes(credit))
        assert conn.queued_cost >= QUEUE_LINK - QUEUE_RESERVE - conn.peer_max_frame
        assert small.send_credit() >= fits_in(QUEUE_RESERVE, conn.peer_max_frame)
        answers = 50
        for i in range(answers):
            small.send_nowait(bytes([i]) * 300)
        assert all(f.send_credit() == 0 for f in floods)  # the reserve is not theirs
        assert conn.queued_cost <= QUEUE_LINK  # still the bound on memory
        writers = [asyncio.create_task(_bulk(s)) for s in floods]
        await _until(lambda: recorder.received(small.stream_id) == 300 * answers, "answers")
        assert not any(w.done() for w in writers)  # while the two still write
        for writer in writers:
            writer.cancel()
    finally:
        client.abort()
        peer.abort()
        server.close()


def test_queue_room_keeps_the_reserve_for_streams_holding_little() -> None:
    frame_room = QUEUE_LINK - QUEUE_RESERVE
    assert queue_room(0, 0) == QUEUE_STREAM  # an idle link: the stream's own bound
    assert queue_room(QUEUE_STREAM, frame_room) == 0  # a full flood: nothing more
    assert queue_room(100_000, frame_room) == 0  # past the reserve, no share of it
    assert queue_room(0, frame_room) == QUEUE_RESERVE  # a newcomer: the reserve
    assert queue_room(1_000, frame_room + 1_000) == QUEUE_RESERVE - 1_000  # up to it
    assert queue_room(0, QUEUE_LINK) == 0  # the link's bound holds whatever
    assert queue_room(0, QUEUE_LINK - 10) == 10


async def test_priority_is_announced_and_reprioritise_reaches_the_peer() -> None:
    recorder = _Recorder()
    client, peer, server = await _pair(recorder)
    try:
        stream = client.open_stream({"target": "x"}, Priority(6))
        assert stream.headers[HEADER_PRIORITY] == "u=6"
        await stream.write(b"hello")
        await asyncio.wait_for(recorder.opened.wait(), 5)
        remote = recorder.streams[stream.stream_id]
        assert remote.priority == Priority(6) == stream.priority
        stream.reprioritise(1)
        await _until(lambda: remote.priority == Priority(1), "update arrived")
        client.reprioritise(stream, 2, incremental=False)
        await _until(lambda: remote.priority == Priority(2, False), "second update")
        with pytest.raises(ValueError, match="urgency"):
            stream.reprioritise(9)
        stream.reset()
        stream.reprioritise(0)  # closed: ignored
        assert stream.priority is None
    finally:
        client.abort()
        peer.abort()
        server.close()


async def test_background_in_flight_is_capped_while_a_more_urgent_stream_is_busy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(aio, "ACTIVE_FOR", 3600.0)  # "recently" lasts for the whole test
    recorder = _Recorder()
    client, peer, server = await _pair(recorder)
    assert peer.transport is not None
    try:
        background = client.open_stream({"target": "bulk"}, Priority(6))
        # Nothing urgent yet: its queue.
        assert background.send_credit() == fits_in(QUEUE_STREAM, client.conn.peer_max_frame)
        assert not client.busier(6)
        urgent = client.open_stream({"target": "viewer"})
        await urgent.write(b"v" * 1000)
        await _until(lambda: client.busier(6), "the urgent stream's data went out")
        assert not client.busier(3)  # only streams less urgent than it are held back
        peer.transport.pause_reading()  # nothing comes back: in-flight only grows
        writer = asyncio.create_task(_bulk(background))
        await _until(lambda: background in client._background_held, "background held")
        assert client.conn.in_flight(background.stream_id) == aio.BACKGROUND_IN_FLIGHT
        assert background.send_credit() == 0 and not writer.done()
        assert urgent.send_credit() > 0  # the urgent one is not capped
        writer.cancel()
    finally:
        client.abort()
        peer.abort()
        server.close()


async def test_a_held_background_writer_goes_on_once_the_urgent_stream_is_quiet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(aio, "ACTIVE_FOR", 0.05)
    recorder = _Recorder()
    client, peer, server = await _pair(recorder)
    assert peer.transport is not None
    try:
        urgent = client.open_stream({"target": "viewer"})
        background = client.open_stream({"target": "bulk"}, Priority(6))
        peer.transport.pause_reading()
        await urgent.write(b"v" * 1000)
        total = 2 * aio.BACKGROUND_IN_FLIGHT
        await asyncio.wait_for(background.write(bytes(total)), 20)  # released by the timer
        assert client.conn.in_flight(background.stream_id) == total
    finally:
        client.abort()
        peer.abort()
        server.close()
