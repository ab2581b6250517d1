"""Jump ahead (relay.workstation.dicomweb.retrieve): the instance the viewport waits for
is retrieved alone, ahead of its series, at the viewport's urgency; the prefetcher's
requests are not."""

from __future__ import annotations

import asyncio
from urllib.parse import quote

import aiohttp

from relay.workstation import priorities
from relay.workstation.dicomweb.retrieve import JUMP_AFTER
from relay.workstation.dicomweb.server import DicomwebServer

from .test_server import CT, SERIES, STUDY, ScriptedSource, server

__all__ = ["server"]  # the fixture

ACCEPT = quote("image/jphc", safe="")


def frame_url(srv: DicomwebServer, sop: str) -> str:
    return (f"{srv.url}/studies/{STUDY}/series/{SERIES}/instances/{sop}/frames/1"
            f"?accept={ACCEPT}")  # fmt: skip


async def fetch(url: str, headers: dict[str, str]) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        return r.status, await r.read()


async def test_the_viewports_frame_comes_ahead_of_a_held_series(
    server: tuple[DicomwebServer, ScriptedSource],
) -> None:
    srv, source = server
    source.release.clear()  # the series brings nothing until released
    last = CT[-1].sop_instance
    status, body = await asyncio.wait_for(
        fetch(frame_url(srv, last), {"Range": "bytes=0-1023"}), 20
    )
    assert status == 206 and len(body) == 1024
    assert source.ahead == [(last, priorities.VIEWPORT_NEXT)]
    assert srv.service.retriever.jumps_first == 1
    source.release.set()


async def test_whole_frames_wait_for_their_series(
    server: tuple[DicomwebServer, ScriptedSource],
) -> None:
    """The prefetcher's whole-frame requests do not jump: each would cost its bytes twice."""
    srv, source = server
    source.release.clear()
    whole = asyncio.ensure_future(fetch(frame_url(srv, CT[-1].sop_instance), {}))
    await asyncio.sleep(JUMP_AFTER * 3)
    assert not whole.done() and source.ahead == []
    source.release.set()
    status, body = await asyncio.wait_for(whole, 20)
    assert status == 200 and body[:2] == b"\xff\x4f"  # an HTJ2K codestream (SOC marker)
    assert source.ahead == [] and srv.service.retriever.jumps == 0
