"""A peer that asks for answers and does not read them: a PING flood, an OPEN flood that
is answered with RESETs (CVE-2019-9512 and 9514 for HTTP/2).

The Link answers every PING with a PONG and every refused OPEN with a RESET, whatever the
state of its transport; without a bound those answers pile up in the transport's buffer
until WRITE_HARD (32 MiB) per link. Bounded: at most CONTROL_REPLIES of them unsent in
the transport's buffer; beyond, the link is aborted. A peer that reads, however slowly,
and a bulk transfer in both directions at once are never aborted.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from functools import partial

import pytest

from relay.net import aio
from relay.net.aio import CONTROL_REPLIES, WRITE_HARD, WRITE_HIGH, Link, Stream
from relay.net.bytestream import read_exactly
from relay.proto import Connection, ErrorCode, LinkSettings
from relay.proto import frames as fr
from relay.proto.frames import FrameType
from tests.net.link_pair import small_buffer_pair

PING = fr.encode(FrameType.PING, 0, 0, bytes(8))
# Bounds of the transport's buffer when the link is aborted: WRITE_HIGH (answers written
# before the transport paused) plus the allowance, plus the answers to the reads of one
# loop iteration (a read is at most 256 KiB; an answer at most 16/13 of its request).
BOUND = WRITE_HIGH + CONTROL_REPLIES + 1024 * 1024


def _bad_opens(first: int, count: int) -> bytes:
    """`count` OPENs whose header blocks are malformed: each is answered with a RESET."""
    return b"".join(
        fr.encode(FrameType.OPEN, 0, sid, b"\xff") for sid in range(first, first + 2 * count, 2)
    )


def _unknown_target_opens(first: int, count: int) -> bytes:
    """`count` well-formed OPENs that the application refuses (REFUSED_STREAM: no
    on_stream), as the gateway refuses a device's forbidden targets."""
    block = fr.encode_headers({"target": "nope"})
    return b"".join(
        fr.encode(FrameType.OPEN, 0, sid, block) for sid in range(first, first + 2 * count, 2)
    )


async def _flood(make: Callable[[int], bytes]) -> tuple[Link, int, int]:
    """A server Link on one end of a socket pair; the other end sends `make(i)` batches
    and never reads. Returns the link, the peak of its transport buffer, and bytes sent."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    theirs.setblocking(False)
    links: list[Link] = []

    def factory() -> Link:
        links.append(Link(client=False, settings=LinkSettings()))
        return links[-1]

    transport, _ = await loop.connect_accepted_socket(factory, ours)
    await loop.sock_sendall(theirs, Connection(client=True, now=0).data_to_send())
    peak = sent = 0
    batch = 0
    try:
        while not transport.is_closing() and sent < 40 * 1024 * 1024:
            chunk = make(batch)
            batch += 1
            try:
                await asyncio.wait_for(loop.sock_sendall(theirs, chunk), 2.0)
            except (ConnectionError, TimeoutError):
                break
            sent += len(chunk)
            await asyncio.sleep(0)
            peak = max(peak, transport.get_write_buffer_size())
        await asyncio.sleep(0.05)
    finally:
        theirs.close()
    return links[0], peak, sent


async def test_a_ping_flood_that_is_never_read_aborts_the_link_early() -> None:
    link, peak, sent = await _flood(lambda _: PING * 4096)
    assert link.closed.done()
    assert link.transport is not None and link.transport.is_closing()
    assert peak <= BOUND < WRITE_HARD
    assert sent < 4 * BOUND  # aborted long before the 40 MiB the peer wanted to send
    end = link.closed.result()
    assert end.code == ErrorCode.LIMIT_EXCEEDED and "does not read" in end.reason


async def test_a_flood_of_bad_opens_that_is_never_read_aborts_the_link_early() -> None:
    per = 4096  # OPENs per batch; stream ids keep growing
    link, peak, _ = await _flood(lambda i: _bad_opens(1 + 2 * per * i, per))
    assert link.closed.done()
    assert peak <= BOUND < WRITE_HARD


async def test_a_flood_of_refused_opens_that_is_never_read_aborts_the_link_early() -> None:
    per = 2048
    link, peak, _ = await _flood(lambda i: _unknown_target_opens(1 + 2 * per * i, per))
    assert link.closed.done()
    assert peak <= BOUND < WRITE_HARD


# --------------------------------------------------------------------------- legitimate peers

WIDE = LinkSettings(stream_window=8 * 1024 * 1024, link_window=64 * 1024 * 1024)
TOTAL = 24 * 1024 * 1024


async def _pair(on_stream: Callable[[Stream], None]) -> tuple[Link, Link, asyncio.Server]:
    return await small_buffer_pair(WIDE, on_stream)


async def test_bulk_both_ways_at_once_with_pings_is_never_aborted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Upload and download at once, both transports over WRITE_HIGH again and again,
    each side PINGing the other all along: answers are written behind DATA, more of them
    in all than the allowance, yet neither link is aborted (an answer the peer has read
    no longer counts), and nothing deadlocks (reading never stops)."""
    allowance = 2 * 1024  # 102 answers unread at once; the default is 1 MiB
    monkeypatch.setattr(aio, "CONTROL_REPLIES", allowance)
    tasks: list[asyncio.Task[bytes]] = []
    payload = bytes(range(256)) * (TOTAL // 256)

    async def serve(stream: Stream) -> bytes:
        writer = asyncio.ensure_future(stream.write(payload))
        got = await read_exactly(stream, TOTAL)
        await writer
        await stream.write_eof()
        return got

    client, peer, server = await _pair(lambda s: tasks.append(asyncio.ensure_future(serve(s))))
    links = (client, peer)
    stream = client.open_stream({"target": "bulk"})
    paused_seen = 0
    counted = 0

    async def pinging() -> None:
        nonlocal paused_seen, counted
        while True:
            for link in links:
                if link.transport is not None and not link.transport.is_closing():
                    link.conn._out.append(PING * 4)  # as a peer's keepalive would, but often
                    link.flush()
                paused_seen += not link.writable
                counted = max(counted, link._replies_unread)
            await asyncio.sleep(0.002)

    pinger = asyncio.ensure_future(pinging())
    try:
        writer = asyncio.ensure_future(stream.write(payload))
        got = await asyncio.wait_for(read_exactly(stream, TOTAL), 60)
        await asyncio.wait_for(writer, 60)
        assert got == payload
        assert await asyncio.wait_for(tasks[0], 60) == payload
    finally:
        pinger.cancel()
    assert not client.closed.done() and not peer.closed.done()
    assert paused_seen and counted  # the scenario happened: answers written while paused
    assert sum(link.conn.replies_queued for link in links) > allowance
    client.abort()
    server.close()


async def test_a_slow_reader_that_pings_within_reason_is_never_aborted() -> None:
    """The peer stops reading (the link pauses), sends some PINGs, then reads again: the
    answers it left unread stay under the allowance, and those it read no longer count."""
    readers: list[asyncio.Task[None]] = []

    async def drain(stream: Stream) -> None:
        while await stream.read():
            pass

    client, peer, server = await _pair(lambda s: readers.append(asyncio.ensure_future(drain(s))))
    assert peer.transport is not None
    await asyncio.sleep(0.05)
    stream = client.open_stream({"target": "bulk"})

    async def write_forever() -> None:
        chunk = bytes(256 * 1024)
        while True:
            await stream.write(chunk)

    writer = asyncio.ensure_future(write_forever())
    transport = client.transport
    assert transport is not None

    def answered(total: int) -> bool:
        return client.conn.replies_queued >= total

    def read_up_to(offset: int) -> bool:
        return client.bytes_out - transport.get_write_buffer_size() >= offset

    pings = CONTROL_REPLIES // len(PING) // 2
    for round_ in range(3):
        peer.transport.pause_reading()
        await until(lambda: not client.writable, "the client's transport pauses")
        total = client.conn.replies_queued + pings * len(PING)
        for _ in range(pings):  # half the allowance, each round
            peer.transport.write(PING)
        await until(partial(answered, total), "every PING answered")
        assert not client.closed.done(), round_
        peer.transport.resume_reading()  # it reads the answers: they no longer count
        assert client._reply_marks
        await until(partial(read_up_to, client._reply_marks[-1][0]), "the answers read")
    assert not client.closed.done()
    writer.cancel()
    client.abort()
    server.close()


async def until(check: Callable[[], bool], what: str) -> None:
    for _ in range(2000):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")
