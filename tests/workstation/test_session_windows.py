"""The sealed session's viewer streams and its link window, over real sockets.

The workstation's inner Link gives the streams of a viewer (u<=3) 3 MiB more window
(priorities.VIEWER_WINDOW). When a viewer stops reading (a hung C-GET), what its stream
holds unread must not take the session's link window from everything else: four such
streams used to hold all 16 MiB, and another viewer's C-FIND, DICOMweb, forwards and
renewal all waited until the node's DIMSE timeout aborted them.
"""

from __future__ import annotations

import asyncio
import contextlib

from relay.net.aio import Link, Stream
from relay.proto import LinkSettings
from relay.wire import HEADER_TARGET, TARGET_DICOM, tcp_target
from relay.workstation import priorities
from relay.workstation.session import _SessionLink

SETTINGS = LinkSettings()  # what a workstation and its agent announce by default
CHUNK = 64 * 1024
WIDE = priorities.VIEWER_WINDOW_STREAMS  # viewer streams that get the extra window
STALLED = WIDE + 2  # and two more that get only the base window
DICOM = {HEADER_TARGET: TARGET_DICOM}


async def _session_pair() -> tuple[_SessionLink, asyncio.Queue[Stream], Link, asyncio.Server]:
    """The workstation's inner Link (client) and an agent-side Link over loopback TCP."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Queue[Stream] = asyncio.Queue()
    agent: asyncio.Future[Link] = loop.create_future()

    def agent_link() -> Link:
        link = Link(client=False, settings=SETTINGS, on_stream=accepted.put_nowait)
        agent.set_result(link)
        return link

    server = await loop.create_server(agent_link, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, workstation = await loop.create_connection(
        lambda: _SessionLink(client=True, settings=SETTINGS), "127.0.0.1", port
    )
    return workstation, accepted, await agent, server


async def _flood(stream: Stream) -> None:
    """The agent sends a study for as long as the stream takes it."""
    with contextlib.suppress(Exception):
        while True:
            await stream.write(b"s" * CHUNK)


async def _settled(streams: list[Stream], within: float = 10.0) -> int:
    """Until the bytes the stalled viewers hold stop growing; their sum."""
    last, still = -1, 0
    async with asyncio.timeout(within):
        while still < 3:
            await asyncio.sleep(0.1)
            held = sum(s.buffered for s in streams)
            still = still + 1 if held == last else 0
            last = held
    return last


async def test_stalled_viewers_leave_the_session_to_another_viewer() -> None:
    workstation, accepted, agent, server = await _session_pair()
    floods: list[asyncio.Task[None]] = []
    try:
        await asyncio.sleep(0.1)  # SETTINGS exchanged
        stalled = [workstation.open_stream(DICOM, priorities.VIEWER) for _ in range(STALLED)]
        for stream in stalled:
            await stream.write(b"C-GET")  # and then never reads
        async with asyncio.timeout(5):
            studies = [await accepted.get() for _ in range(STALLED)]
        floods = [asyncio.create_task(_flood(s)) for s in studies]
        held = await _settled(stalled)

        # Another viewer's C-FIND: answered at once, though the studies still wait.
        find = workstation.open_stream(DICOM, priorities.VIEWER)
        await find.write(b"C-FIND")
        answer = await asyncio.wait_for(accepted.get(), 5)

        async def reply() -> None:
            await answer.write(b"m" * (2 * CHUNK))
            await answer.write_eof()

        floods.append(asyncio.create_task(reply()))
        got = b""
        async with asyncio.timeout(2):
            while chunk := await find.read():
                got += chunk
        assert got == b"m" * (2 * CHUNK)

        # Each wide stream took its whole window, but held link credit for one base
        # window of it; the extra stayed within its bound.
        window, extra = SETTINGS.stream_window, priorities.VIEWER_WINDOW
        assert held == WIDE * (window + extra) + (STALLED - WIDE) * window
        assert workstation.conn.extra_window_held == WIDE * extra
    finally:
        for task in floods:
            task.cancel()
        await asyncio.gather(*floods, return_exceptions=True)
        workstation.abort()
        agent.abort()
        server.close()


async def _credit_at_agent(agent: Link, accepted: asyncio.Queue[Stream], stream: Stream) -> int:
    """The agent's credit on a stream, once a byte sent on it arrived (the WINDOW_UPDATE
    that widens it goes right behind the OPEN, before any DATA)."""
    await stream.write(b"?")
    async with asyncio.timeout(5):
        assert await (await accepted.get()).read() == b"?"
    return agent.conn.send_credit(stream.stream_id)


async def test_only_a_viewers_dicom_streams_get_the_extra_window_and_only_so_many() -> None:
    workstation, accepted, agent, server = await _session_pair()
    window, extra = SETTINGS.stream_window, priorities.VIEWER_WINDOW
    try:
        await asyncio.sleep(0.1)
        forward = workstation.open_stream({HEADER_TARGET: tcp_target("ris")})
        prefetch = workstation.open_stream(DICOM, priorities.PREFETCH)
        viewport = workstation.open_stream(DICOM, priorities.VIEWPORT_NEXT)
        assert await _credit_at_agent(agent, accepted, forward) == window  # kept alive for minutes
        assert await _credit_at_agent(agent, accepted, prefetch) == window
        assert await _credit_at_agent(agent, accepted, viewport) == window + extra
        viewers = [workstation.open_stream(DICOM) for _ in range(WIDE)]  # u=3 by default
        credits = [await _credit_at_agent(agent, accepted, s) for s in viewers]
        assert credits == [window + extra] * (WIDE - 1) + [window]  # the viewport's is one
        assert workstation.conn.extra_window_limit == WIDE * extra
        # One done (reset), the next viewer gets it again.
        viewport.reset()
        assert (
            await _credit_at_agent(agent, accepted, workstation.open_stream(DICOM))
            == window + extra
        )
    finally:
        workstation.abort()
        agent.abort()
        server.close()
