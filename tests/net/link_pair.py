"""Two real Links over a loopback TCP connection with small kernel buffers, so that the
transports pause again and again (what the backpressure and priority tests need)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from relay.net.aio import Link, Stream
from relay.proto import LinkSettings

SOCKBUF = 64 * 1024


async def small_buffer_pair(
    settings: LinkSettings,
    on_stream: Callable[[Stream], None],
    *,
    peer_sends_small: bool = True,
) -> tuple[Link, Link, asyncio.Server]:
    """(client, the server's Link, the server): both ends' kernel buffers SOCKBUF (the
    server's send buffer left as it is unless `peer_sends_small`), SETTINGS exchanged."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[Link] = loop.create_future()

    def server_link() -> Link:
        link = Link(client=False, settings=settings, on_stream=on_stream)
        accepted.set_result(link)
        return link

    server = await loop.create_server(server_link, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKBUF)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKBUF)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    _, client = await loop.create_connection(
        lambda: Link(client=True, settings=settings), sock=sock
    )
    peer = await accepted
    assert peer.transport is not None
    peer_sock = peer.transport.get_extra_info("socket")
    if peer_sends_small:
        peer_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKBUF)
    peer_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKBUF)
    await asyncio.sleep(0.1)  # SETTINGS exchanged: the wide windows apply
    return client, peer, server
