"""Jump ahead (relay.workstation.dicomweb.retrieve): the instance the viewport waits for
is retrieved alone, ahead of its series, at the viewport's urgency; the prefetcher's
requests are not."""

from __future__ import annotations

import asyncio
from urllib.parse import quote

import aiohttp
import pytest

from relay.dicom import rawds
from relay.workstation import priorities
from relay.workstation.dicomweb import part10
from relay.workstation.dicomweb.retrieve import JUMP_AFTER
from relay.workstation.dicomweb.server import DicomwebServer

from . import test_server
from .test_server import CT, SERIES, STUDY, ScriptedSource, get, parts, server

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


async def test_an_instance_of_another_series_retrieved_ahead_is_not_served_with_this_one() -> None:
    """A PACS that matches an IMAGE-level retrieve on the SOP Instance UID alone (as the
    scripted one does) sends the instance a URL names under a series it is not in: it
    must not join that series' flight, whose answers every viewer of the series reads."""
    mr = [i for i in test_server.INSTANCES if i not in CT]
    first = rawds.decode_dataset(mr[0].data, mr[0].transfer_syntax)
    study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    stranger = CT[0].sop_instance
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(test_server, "CT", test_server.INSTANCES)  # the PACS holds both
        async with test_server.scripted() as (srv, source):
            source.release.clear()  # the MR series brings nothing until released
            url = (f"{srv.url}/studies/{study}/series/{series}/instances/{stranger}"
                   f"/frames/1?accept={ACCEPT}")  # fmt: skip
            asked = asyncio.ensure_future(fetch(url, {"Range": "bytes=0-1023"}))
            flights = srv.service.retriever.flights
            for _ in range(250):
                flight = flights.get((study, series))
                if source.ahead and flight is not None and not flight.jumping:
                    break
                await asyncio.sleep(0.02)
            assert source.ahead == [(stranger, priorities.VIEWPORT_NEXT)]
            assert flight is not None and stranger not in flight.by_uid
            source.release.set()
            status, _ = await asyncio.wait_for(asked, 10)
            assert status == 404  # not in this series
            status, headers, body = await get(f"{srv.url}/studies/{study}/series/{series}")
            assert status == 200
            sops = [part10.split(p)[0][0x00020003] for _, p in parts(headers, body)]
            assert sops == [i.sop_instance for i in mr]
