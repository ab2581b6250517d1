"""A Link whose transport is full stops its writers and lets them go on when it drains.

Two Links over a real loopback TCP connection; the receiving side stops reading, so the
sender's transport buffer passes WRITE_HIGH and asyncio pauses the Link.
"""

from __future__ import annotations

import asyncio
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.net.aio import QUEUE_LINK, QUEUE_STREAM, Link, Stream, fits_in
from relay.net.bytestream import StreamResetError
from relay.proto import QUEUED_VIEW_COST, LinkSettings
from relay.proto import frames as fr

WIDE = LinkSettings(stream_window=64 * 1024 * 1024, link_window=64 * 1024 * 1024)
CHUNK = bytes(64 * 1024)
TOTAL = 24 * 1024 * 1024  # far beyond what the kernel's loopback buffers hold


async def _write_all(stream: Stream) -> None:
    """Write TOTAL bytes as an application would: a chunk at a time, yielding between."""
    for _ in range(TOTAL // len(CHUNK)):
        await stream.write(CHUNK)
        await asyncio.sleep(0)


async def _pair() -> tuple[Link, Link, asyncio.Server]:
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[Link] = loop.create_future()

    def server_link() -> Link:
        link = Link(client=False, settings=WIDE)
        link.on_stream = lambda stream: None
        accepted.set_result(link)
        return link

    server = await loop.create_server(server_link, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, client = await loop.create_connection(
        lambda: Link(client=True, settings=WIDE), "127.0.0.1", port
    )
    return client, await accepted, server


async def _until_paused(link: Link) -> None:
    for _ in range(500):
        if not link.writable:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the link never paused")


async def test_a_paused_link_holds_its_writer_until_the_peer_reads() -> None:
    client, peer, server = await _pair()
    assert peer.transport is not None
    await asyncio.sleep(0.1)  # SETTINGS exchanged: the wide windows apply
    peer.transport.pause_reading()
    stream = client.open_stream({"target": "t"})
    writer = asyncio.create_task(_write_all(stream))
    await _until_paused(client)
    assert not writer.done()
    peer.transport.resume_reading()
    await asyncio.wait_for(writer, 20)
    assert client.writable
    client.abort()
    server.close()


async def test_a_writer_waiting_on_a_paused_link_is_released_when_it_closes() -> None:
    client, peer, server = await _pair()
    assert peer.transport is not None
    await asyncio.sleep(0.1)
    peer.transport.pause_reading()
    stream = client.open_stream({"target": "t"})
    writer = asyncio.create_task(_write_all(stream))
    await _until_paused(client)
    client.abort()
    with pytest.raises(StreamResetError):
        await asyncio.wait_for(writer, 10)
    assert client.writable
    server.close()


async def _fill_paused(client: Link, peer: Link) -> Stream:
    """Pause `peer`'s reading and write big chunks until `client`'s transport pauses."""
    assert peer.transport is not None
    await asyncio.sleep(0.1)
    peer.transport.pause_reading()
    filler = client.open_stream({"target": "t"})
    while client.writable:
        await filler.write(CHUNK)
        await asyncio.sleep(0)
    return filler


async def _write_until_blocked(stream: Stream, size: int) -> int:
    """Small writes while send_credit() takes them (none waits): the bytes written."""
    written = 0
    while stream.send_credit() >= size:
        await stream.write(b"\x01" * size)
        written += size
    return written


async def test_small_writes_hold_no_more_memory_than_the_queue_bound() -> None:
    """QUEUE_STREAM bounds memory: 1-byte writes, one queued frame each, held ~110 times
    it when only their bytes were counted (28 MB for 256 KiB)."""
    client, peer, server = await _pair()
    await _fill_paused(client, peer)
    stream = client.open_stream({"target": "small"})
    await asyncio.sleep(0)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for size in (1, 2):  # 1-byte bytes objects are CPython singletons; 2-byte are not
            await _write_until_blocked(stream, size)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert client.conn.queued_cost_on(stream.stream_id) <= QUEUE_STREAM
    assert 0 < held <= QUEUE_STREAM, held
    client.abort()
    server.close()


async def test_small_writes_of_many_streams_keep_within_the_link_bound() -> None:
    client, peer, server = await _pair()
    await _fill_paused(client, peer)
    streams = [client.open_stream({"target": f"s{i}"}) for i in range(4)]
    for stream in streams:
        await _write_until_blocked(stream, 2)
    # The filler's chunks were admitted by the same bounds; all of it is QUEUE_LINK's.
    assert 0 < client.conn.queued_cost <= QUEUE_LINK
    client.abort()
    server.close()


@given(st.integers(-1, 4 * QUEUE_LINK), st.integers(fr.MIN_MAX_FRAME, fr.MAX_MAX_FRAME))
def test_fits_in_admits_the_largest_write_whose_worst_cost_fits(room: int, frame: int) -> None:
    def worst(n: int) -> int:
        return n + -(-n // frame) * QUEUED_VIEW_COST

    n = fits_in(room, frame)
    assert n >= 0 and worst(n) <= max(room, 0)
    if n:
        assert worst(n + QUEUED_VIEW_COST + 1) > room  # within one frame's cost of the most
