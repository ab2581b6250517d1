"""Series metadata from a headers-only retrieval before the pixels (headfirst.py): the
real DicomwebServer over HTTP on loopback, with the scripted source of test_server (the
agent's stripping applied as the agent does). The series flight is held back to show the
metadata does not wait for it; every way the headers can fall short falls back to it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from relay.dicom import status as st
from relay.dicom.codec import FinalResponse
from relay.ops.config import Address
from relay.workstation.dicomweb.headfirst import HeadFirst
from relay.workstation.dicomweb.server import DicomwebServer
from relay.workstation.dicomweb.settings import DicomwebConfig
from relay.workstation.dicomweb.source import UpstreamError

from .test_server import CT, SERIES, STUDY, ScriptedSource, get, server

__all__ = ["server"]  # the fixture

WAIT = 30.0  # seconds: a bound on waiting for a background step, not a measurement
Server = tuple[DicomwebServer, ScriptedSource]


def url(srv: DicomwebServer, what: str = "metadata") -> str:
    return f"{srv.url}/studies/{STUDY}/series/{SERIES}/{what}"


def headfirst(srv: DicomwebServer) -> HeadFirst:
    assert srv.service.headfirst is not None
    return srv.service.headfirst


async def until(what: str, check: Callable[[], bool]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not check():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def metadata_when_the_series_is_there(srv: DicomwebServer) -> list[dict[str, Any]]:
    """What the full instances give (the flight done and held: no headers involved)."""
    status, _, body = await get(url(srv))
    assert status == 200
    docs: list[dict[str, Any]] = json.loads(body)
    return docs


async def test_metadata_comes_from_the_headers_while_the_pixels_are_on_their_way(
    server: Server,
) -> None:
    srv, source = server
    source.release.clear()  # the series flight is stuck: its pixels "cross the link"
    status, headers, body = await asyncio.wait_for(get(url(srv)), WAIT)
    assert status == 200 and headers["Content-Type"] == "application/dicom+json"
    early = json.loads(body)
    assert (source.retrieves, source.header_retrieves) == (1, 1)
    assert headfirst(srv).answered == 1
    assert {d["00080018"]["Value"][0] for d in early} == {i.sop_instance for i in CT}
    for doc in early:
        assert doc["7FE00010"]["BulkDataURI"].endswith("/bulk/7FE00010")
        assert doc["00280010"]["Value"] == [512]  # Rows, from the header
    # the pixels: frames still wait for (and come from) the series flight
    frames = asyncio.ensure_future(
        get(f"{srv.url}/studies/{STUDY}/series/{SERIES}/instances/{CT[0].sop_instance}/frames/1")
    )
    await asyncio.sleep(0.1)
    assert not frames.done()
    source.release.set()
    status, _, body = await asyncio.wait_for(frames, WAIT)
    assert status == 200 and len(body) > 512 * 512 * 2
    # the same metadata as from the whole instances (order aside)
    full = await metadata_when_the_series_is_there(srv)
    assert (source.retrieves, source.header_retrieves) == (1, 1)  # held: no new retrieval
    key = "00080018"
    assert sorted(early, key=lambda d: d[key]["Value"][0]) == sorted(
        full, key=lambda d: d[key]["Value"][0]
    )


async def short_count_falls_back(srv: DicomwebServer, source: ScriptedSource) -> list[Any]:
    """Metadata is not answered before the flight; then it is whole, from the flight."""
    source.release.clear()
    task = asyncio.ensure_future(get(url(srv)))
    await until("the headers retrieval to end", lambda: headfirst(srv).fell_back == 1)
    await asyncio.sleep(0.05)
    assert not task.done()  # a partial list is never answered as complete
    source.release.set()
    status, _, body = await asyncio.wait_for(task, WAIT)
    assert status == 200
    docs: list[Any] = json.loads(body)
    assert len(docs) == len(CT) and headfirst(srv).answered == 0
    return docs


async def test_a_final_count_that_does_not_match_falls_back_to_the_flight(
    server: Server,
) -> None:
    srv, source = server
    source.header_final = FinalResponse(st.SUCCESS, completed=len(CT) + 1, failed=0)
    await short_count_falls_back(srv, source)


async def test_a_failed_sub_operation_falls_back(server: Server) -> None:
    srv, source = server
    source.header_final = FinalResponse(st.SUBOPS_FAILED, completed=len(CT), failed=1)
    await short_count_falls_back(srv, source)


async def test_a_headers_retrieval_that_breaks_falls_back(server: Server) -> None:
    srv, source = server
    source.header_error = UpstreamError(502, "the relay link was lost")
    await short_count_falls_back(srv, source)


async def test_headers_beyond_the_bound_fall_back(server: Server) -> None:
    srv, source = server
    headfirst(srv).max_bytes = 100  # smaller than one instance's header
    await short_count_falls_back(srv, source)
    assert "larger than 100 bytes" in headfirst(srv).sets[(STUDY, SERIES)].reason


async def test_an_older_agent_sending_whole_instances_is_noticed(server: Server) -> None:
    srv, source = server
    source.old_agent = True
    docs = await short_count_falls_back(srv, source)
    assert source.header_sent == 1  # stopped at the first whole instance
    hs = headfirst(srv).sets[(STUDY, SERIES)]
    assert hs.reason == "the agent sent whole instances" and hs.items == []
    assert all("BulkDataURI" in d["7FE00010"] for d in docs)
    # and no headers retrieval is tried again for a while
    assert headfirst(srv).start(STUDY, "1.2.3.4.5") is None


async def test_a_held_series_starts_no_headers_retrieval(server: Server) -> None:
    srv, source = server
    await metadata_when_the_series_is_there(srv)  # first: headers, flight completes
    before = source.header_retrieves
    await metadata_when_the_series_is_there(srv)
    assert source.header_retrieves == before  # held now: answered from the flight


async def test_at_most_max_running_headers_retrievals(server: Server) -> None:
    srv, source = server
    hf = headfirst(srv)
    hf.max_running = 1
    source.header_release.clear()
    first = hf.start(STUDY, SERIES)
    assert first is not None and hf.start(STUDY, SERIES) is first  # joined, not repeated
    assert hf.start(STUDY, "1.2.3.4.5") is None  # over the bound
    source.release.clear()
    task = asyncio.ensure_future(get(url(srv)))
    await until("the series flight", lambda: source.retrieves == 1)
    source.header_release.set()
    status, _, body = await asyncio.wait_for(task, WAIT)
    assert status == 200 and len(json.loads(body)) == len(CT)
    assert source.header_retrieves == 1 and hf.answered == 1
    source.release.set()


async def test_kept_header_sets_are_bounded(server: Server) -> None:
    srv, _source = server
    hf = headfirst(srv)
    hf.max_kept = 2
    for n in range(4):
        hs = hf.start(STUDY, f"1.2.3.{n}")  # no such series: completes empty
        assert hs is not None
        await asyncio.wait_for(hs.wait(), WAIT)
    assert len(hf.sets) == 2
    assert list(hf.sets) == [(STUDY, "1.2.3.2"), (STUDY, "1.2.3.3")]


async def test_kept_header_bytes_are_bounded(server: Server) -> None:
    srv, _source = server
    hf = headfirst(srv)
    first = hf.start(STUDY, SERIES)
    assert first is not None and await asyncio.wait_for(first.wait(), WAIT)
    hf.max_kept_bytes = first.size  # room for one series' headers
    second = hf.start(STUDY, "1.2.3.4.5")  # empty: fits beside the first
    assert second is not None and await asyncio.wait_for(second.wait(), WAIT)
    assert set(hf.sets) == {(STUDY, SERIES), (STUDY, "1.2.3.4.5")}
    hf.max_kept_bytes = first.size - 1  # the first no longer fits: it goes
    third = hf.start(STUDY, "1.2.3.4.6")
    assert third is not None and await asyncio.wait_for(third.wait(), WAIT)
    assert set(hf.sets) == {(STUDY, "1.2.3.4.5"), (STUDY, "1.2.3.4.6")}


async def test_the_metrics_count_headers(server: Server) -> None:
    srv, source = server
    source.release.clear()
    assert (await asyncio.wait_for(get(url(srv)), WAIT))[0] == 200
    source.release.set()
    values = {m.name: m.samples[0].value for m in srv.metrics.collect() if m.samples}
    assert values["relay_dicomweb_series_headers_retrievals"] == 1
    assert values["relay_dicomweb_series_metadata_from_headers"] == 1
    assert values["relay_dicomweb_series_headers_unused"] == 0
    assert values["relay_dicomweb_series_headers_complete"] == 1


async def test_headers_first_off_answers_from_the_flight() -> None:
    config = DicomwebConfig(Address("127.0.0.1", 0), headers_first=False)

    async def no_link(headers: Any) -> Any:
        raise OSError("no link")

    srv = DicomwebServer(config, no_link)
    source = ScriptedSource()
    srv.service.source = source  # type: ignore[assignment]
    srv.service.retriever.source = source  # type: ignore[assignment]
    await srv.start()
    try:
        assert srv.service.headfirst is None
        status, _, body = await asyncio.wait_for(get(url(srv)), WAIT)
        assert status == 200 and len(json.loads(body)) == len(CT)
        assert (source.retrieves, source.header_retrieves) == (1, 0)
    finally:
        await srv.stop()
