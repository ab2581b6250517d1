"""`Link.urgent_window`: the streams a Link opens at the default urgency or a more urgent
one get that much more receive window; background streams, and Links that do not set it,
keep the announced window. (The workstation's inner Link widens only a viewer's DICOM
streams: tests/workstation/test_session_windows.py.)"""

from __future__ import annotations

import asyncio

from relay.net.aio import Link
from relay.proto import LinkSettings, Priority
from relay.workstation import priorities

SETTINGS = LinkSettings()
EXTRA = 3 * 1024 * 1024


async def _pair(urgent_window: int) -> tuple[Link, Link, asyncio.Server]:
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[Link] = loop.create_future()

    def server_link() -> Link:
        link = Link(client=False, settings=SETTINGS, on_stream=lambda stream: None)
        accepted.set_result(link)
        return link

    server = await loop.create_server(server_link, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, client = await loop.create_connection(
        lambda: Link(client=True, settings=SETTINGS), "127.0.0.1", port
    )
    client.urgent_window = urgent_window
    return client, await accepted, server


async def _credit_at_peer(peer: Link, stream_id: int) -> int:
    for _ in range(500):
        if peer.conn.is_open(stream_id) and peer.conn.send_credit(stream_id) > 0:
            await asyncio.sleep(0.05)  # the WINDOW_UPDATE follows the OPEN
            return peer.conn.send_credit(stream_id)
        await asyncio.sleep(0.01)
    raise AssertionError("the stream never reached the peer")


async def test_urgent_streams_get_the_extra_window_and_background_ones_do_not() -> None:
    client, peer, server = await _pair(EXTRA)
    try:
        await asyncio.sleep(0.1)  # SETTINGS exchanged
        viewer = client.open_stream({"target": "x"})
        await viewer.write(b"v")
        urgent = client.open_stream({"target": "x"}, Priority(1))
        await urgent.write(b"u")
        background = client.open_stream({"target": "x"}, priorities.PREFETCH)
        await background.write(b"b")
        window = SETTINGS.stream_window
        assert await _credit_at_peer(peer, viewer.stream_id) == window + EXTRA
        assert await _credit_at_peer(peer, urgent.stream_id) == window + EXTRA
        assert await _credit_at_peer(peer, background.stream_id) == window
    finally:
        client.abort()
        peer.abort()
        server.close()


async def test_links_without_it_keep_the_announced_window() -> None:
    client, peer, server = await _pair(0)
    try:
        await asyncio.sleep(0.1)
        stream = client.open_stream({"target": "x"})
        await stream.write(b"x")
        assert await _credit_at_peer(peer, stream.stream_id) == SETTINGS.stream_window
    finally:
        client.abort()
        peer.abort()
        server.close()
