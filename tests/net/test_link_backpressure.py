"""A Link whose transport is full stops its writers and lets them go on when it drains.

Two Links over a real loopback TCP connection; the receiving side stops reading, so the
sender's transport buffer passes WRITE_HIGH and asyncio pauses the Link.
"""

from __future__ import annotations

import asyncio

import pytest

from relay.net.aio import Link, Stream
from relay.net.bytestream import StreamResetError
from relay.proto import LinkSettings

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
