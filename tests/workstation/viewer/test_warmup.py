"""The warm-up: a viewer URL naming a study starts its series flights while the viewer
boots, and OHIF's own requests join them. The real DicomwebServer on loopback with the
viewer wired as the workstation wires it; the relay is a scripted source (the DICOMweb
server tests' one), so what was retrieved is counted exactly."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydicom.dataset import Dataset

from relay.ops.config import Address
from relay.workstation.dicomweb import viewer_routes
from relay.workstation.dicomweb.server import DicomwebServer
from relay.workstation.dicomweb.settings import DicomwebConfig
from relay.workstation.dicomweb.source import FindResult, UpstreamError
from relay.workstation.viewer.warmup import KEY_WARMUP, Warmup, study_uids
from tests.workstation.dicomweb.test_server import CT, SERIES, STUDY, ScriptedSource
from tests.workstation.viewer.test_routes import install

WAIT = 30.0  # seconds: a bound on waiting for a background step, not a measurement


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[DicomwebServer, ScriptedSource, str]]:
    config = DicomwebConfig(Address("127.0.0.1", 0), viewer_dir=install(tmp_path),
                            hold_size=64 * 1024 * 1024, headers_first=True)  # fmt: skip

    async def no_link(headers: Any) -> Any:
        raise OSError("no link")

    srv = DicomwebServer(config, no_link, extra_routes=viewer_routes(config))
    source = ScriptedSource()
    srv.service.source = source  # type: ignore[assignment]
    srv.service.retriever.source = source  # type: ignore[assignment]
    await srv.start()
    assert srv.address is not None
    try:
        yield srv, source, f"http://127.0.0.1:{srv.address.port}"
    finally:
        await srv.stop()


def warmup_of(srv: DicomwebServer) -> Warmup:
    return srv.app[KEY_WARMUP]


async def page(url: str, **headers: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as r:
        await r.read()
        return r.status


async def until(what: str, check: Callable[[], bool]) -> None:
    """Poll `check` (background tasks have no event to wait on); fail naming `what`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not check():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_opening_the_viewer_on_a_study_fetches_it_once_for_the_viewer(
    server: tuple[DicomwebServer, ScriptedSource, str],
) -> None:
    srv, source, base = server
    source.release.clear()  # the series stays in flight until we let it go
    assert await page(f"{base}/viewer?StudyInstanceUIDs={STUDY}") == 200
    await until("the warm-up's retrieval", lambda: source.retrieves == 1)
    assert warmup_of(srv).started == 1
    # OHIF asks for the series' metadata while it is still arriving: it joins the flight
    async with aiohttp.ClientSession() as session:
        task = asyncio.ensure_future(
            session.get(f"{srv.url}/studies/{STUDY}/series/{SERIES}/metadata")
        )
        await until("the metadata request to join", lambda: srv.service.retriever.shared >= 1)
        source.release.set()
        async with await task as response:
            assert response.status == 200
            docs = json.loads(await response.read())
    assert len(docs) == len(CT)
    assert source.retrieves == 1  # one retrieval for the warm-up and the viewer
    await until("the warm-up to finish", lambda: not warmup_of(srv)._running)
    assert warmup_of(srv).series_started == 1


@pytest.mark.parametrize("site", ["cross-site", "same-site"])
async def test_a_navigation_from_another_site_fetches_nothing(
    server: tuple[DicomwebServer, ScriptedSource, str], site: str
) -> None:
    srv, source, base = server
    status = await page(f"{base}/viewer?StudyInstanceUIDs={STUDY}", **{"Sec-Fetch-Site": site})
    assert status == 200  # the page itself is served: only the fetch is not started
    assert warmup_of(srv).started == 0 and not warmup_of(srv)._running
    assert source.retrieves == 0


async def test_what_is_warmed_up_is_bounded(
    server: tuple[DicomwebServer, ScriptedSource, str],
) -> None:
    srv, source, base = server
    source.release.clear()
    others = ",".join(f"1.2.3.{i}" for i in range(5))
    assert await page(f"{base}/viewer?StudyInstanceUIDs={STUDY},{others}",
                      **{"Sec-Fetch-Site": "none"}) == 200  # fmt: skip
    warmup = warmup_of(srv)
    assert warmup.started == warmup.max_studies == 2  # the rest named are ignored
    assert await page(f"{base}/viewer?StudyInstanceUIDs={STUDY}") == 200
    assert warmup.started == 2  # already warming: not again
    source.release.set()
    await until("the warm-ups to finish", lambda: not warmup._running)
    assert source.retrieves == 1  # the unknown studies have no series: nothing retrieved
    for path in ("/", "/viewer", "/viewer?StudyInstanceUIDs=not-a-uid", "/app.js"):
        assert await page(base + path) == 200
    assert warmup.started == 2


async def test_a_pacs_down_costs_the_page_nothing(
    server: tuple[DicomwebServer, ScriptedSource, str], caplog: pytest.LogCaptureFixture
) -> None:
    srv, source, base = server
    source.down = True
    with caplog.at_level(logging.INFO, logger="relay.workstation.viewer"):
        assert await page(f"{base}/viewer?StudyInstanceUIDs={STUDY}") == 200
        await until("the warm-up to give up", lambda: not warmup_of(srv)._running)
    [record] = [r for r in caplog.records if "warm-up" in r.getMessage()]
    assert "HTTP 502" in record.getMessage() and STUDY not in record.getMessage()
    source.down = False
    url = f"{srv.url}/studies/{STUDY}/series/{SERIES}/metadata"
    async with aiohttp.ClientSession() as session, session.get(url) as r:
        assert r.status == 200  # the viewer's own request still works


async def test_the_pacs_error_comment_never_reaches_the_log(
    server: tuple[DicomwebServer, ScriptedSource, str], caplog: pytest.LogCaptureFixture
) -> None:
    """The agent forwards the PACS's ErrorComment verbatim; a PACS may quote a patient ID."""
    srv, source, base = server

    async def quoting(identifier: Dataset, max_matches: int, *, skip: int = 0) -> FindResult:
        raise UpstreamError(502, "C-FIND failed with status 0xC001: no patient RELAY0001")

    source.find = quoting  # type: ignore[method-assign]
    with caplog.at_level(logging.DEBUG):
        assert await page(f"{base}/viewer?StudyInstanceUIDs={STUDY}") == 200
        await until("the warm-up to give up", lambda: not warmup_of(srv)._running)
    assert "viewer warm-up stopped" in caplog.text and "HTTP 502" in caplog.text
    assert "RELAY0001" not in caplog.text


async def test_the_warmup_leaves_half_the_flight_slots_to_the_viewer(
    server: tuple[DicomwebServer, ScriptedSource, str],
) -> None:
    srv, source, base = server
    retriever = srv.service.retriever
    retriever.max_flights = 2
    source.release.clear()
    await retriever.series("1.2.3.98", SERIES)  # one flight already running: half of 2
    assert retriever.running() == 1
    assert await page(f"{base}/viewer?StudyInstanceUIDs={STUDY}") == 200
    await until("the warm-up to give way", lambda: not warmup_of(srv)._running)
    assert warmup_of(srv).series_started == 0
    source.release.set()


async def test_the_warmup_starts_no_series_once_half_the_holding_is_used(
    server: tuple[DicomwebServer, ScriptedSource, str],
) -> None:
    srv, source, base = server
    retriever = srv.service.retriever
    other = await retriever.series("1.2.3.98", SERIES)  # a series being read, held
    async for _ in other.instances():
        pass
    retriever.hold_size = 2 * retriever.held  # that series is half of what may be held
    assert await page(f"{base}/viewer?StudyInstanceUIDs={STUDY}") == 200
    await until("the warm-up to give way", lambda: not warmup_of(srv)._running)
    assert warmup_of(srv).series_started == 0 and source.retrieves == 1
    assert ("1.2.3.98", SERIES) in retriever.flights  # nothing evicted


async def test_stopping_cancels_a_warmup_in_flight(tmp_path: Path) -> None:
    config = DicomwebConfig(Address("127.0.0.1", 0), viewer_dir=install(tmp_path))

    async def no_link(headers: Any) -> Any:
        raise OSError("no link")

    srv = DicomwebServer(config, no_link, extra_routes=viewer_routes(config))
    source = ScriptedSource()
    srv.service.source = source  # type: ignore[assignment]
    srv.service.retriever.source = source  # type: ignore[assignment]
    source.release.clear()  # never released: the stop must not wait for it
    await srv.start()
    assert srv.address is not None
    await page(f"http://127.0.0.1:{srv.address.port}/viewer?StudyInstanceUIDs={STUDY}")
    await until("the retrieval", lambda: source.retrieves == 1)
    await srv.stop()
    assert not warmup_of(srv)._running


def test_study_uids_from_the_url() -> None:
    assert study_uids({"StudyInstanceUIDs": "1.2.3, 1.2.4,1.2.3"}) == ["1.2.3", "1.2.4"]
    assert study_uids({"StudyInstanceUIDs": "1.2.x,,../etc"}) == []
    assert study_uids({}) == []
    many = ",".join(f"1.2.{i}" for i in range(100))
    assert len(study_uids({"StudyInstanceUIDs": many})) == 16


async def test_the_warm_up_starts_the_headers_and_the_metadata_needs_no_pixels(
    server: tuple[DicomwebServer, ScriptedSource, str],
) -> None:
    srv, source, base = server
    source.release.clear()  # the pixels never come in this test
    assert await page(f"{base}/viewer?StudyInstanceUIDs={STUDY}") == 200
    await until("the warm-up's headers retrieval", lambda: source.header_retrieves == 1)
    headfirst = srv.service.headfirst
    assert headfirst is not None
    async with aiohttp.ClientSession() as session:
        meta = f"{srv.url}/studies/{STUDY}/series/{SERIES}/metadata"
        async with session.get(meta) as response:
            assert response.status == 200
            docs = json.loads(await response.read())
    assert len(docs) == len(CT) and headfirst.answered == 1
    assert (source.retrieves, source.header_retrieves) == (1, 1)  # joined, not repeated
    source.release.set()
