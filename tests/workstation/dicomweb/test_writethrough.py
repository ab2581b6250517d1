"""Browser retrievals written through to the encrypted disk cache: the DICOMweb server
over real HTTP with a real CacheStore on disk and the scripted source of test_server."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydicom.dataset import Dataset

from relay.dicom import rawds
from relay.dicom import status as st
from relay.dicom.codec import FinalResponse, Instance
from relay.ops.config import Address
from relay.proto import Priority
from relay.workstation.cache.sealing import Sealer
from relay.workstation.cache.serve import CacheServer
from relay.workstation.cache.store import CacheStore
from relay.workstation.dicomweb import part10
from relay.workstation.dicomweb.server import DicomwebServer
from relay.workstation.dicomweb.settings import DicomwebConfig
from relay.workstation.dicomweb.source import FindResult, UpstreamError
from relay.workstation.dicomweb.writethrough import WriteThrough, complete_by
from relay_dev import samples
from tests.workstation.cache.test_fetch import LockedOnly
from tests.workstation.dicomweb.test_server import (
    CT,
    INSTANCES,
    SERIES,
    STUDY,
    ScriptedSource,
    get,
    parts,
)

Setup = tuple[DicomwebServer, ScriptedSource, CacheServer, list[bool]]


def make_cache(tmp_path: Path, max_size: int = 64 << 20) -> tuple[CacheServer, list[bool]]:
    store = CacheStore(tmp_path, Sealer(Sealer.new_key()), max_size=max_size, max_age=3600)
    store.open(fresh_key=True)
    offline = [False]
    return CacheServer(store, lambda: offline[0], lambda uid: None), offline


async def start(
    cache: CacheServer, source: ScriptedSource | None = None
) -> tuple[DicomwebServer, ScriptedSource]:
    config = DicomwebConfig(Address("127.0.0.1", 0), hold_size=4 * 1024 * 1024)

    async def no_link(headers: Any) -> Any:
        raise OSError("no link")

    srv = DicomwebServer(config, no_link, cache=cache)
    source = source or ScriptedSource()
    srv.service.source = source  # type: ignore[assignment]
    srv.service.retriever.source = source  # type: ignore[assignment]
    assert srv.service.retriever.writer is not None
    srv.service.retriever.writer.source = source  # type: ignore[assignment]
    await srv.start()
    return srv, source


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    cache, offline = make_cache(tmp_path)
    srv, source = await start(cache)
    try:
        yield srv, source, cache, offline
    finally:
        await srv.stop()


def writer(srv: DicomwebServer) -> WriteThrough:
    assert srv.service.retriever.writer is not None
    return srv.service.retriever.writer


def datasets(headers: dict[str, str], body: bytes) -> list[bytes]:
    return [p[part10.split(p)[1] :] for _, p in parts(headers, body)]


def series_ident() -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = SERIES
    return ds


async def test_a_retrieved_series_is_cached_and_then_read_from_the_cache(setup: Setup) -> None:
    srv, source, cache, offline = setup
    url = f"{srv.url}/studies/{STUDY}/series/{SERIES}"
    status, headers, body = await get(url)
    assert status == 200 and datasets(headers, body) == [i.data for i in CT]
    await writer(srv).drain()
    study = cache.store.study(STUDY)
    assert study is not None and study.series_done == {SERIES: len(CT)}
    assert study.complete  # its one series is complete, and the PACS counts len(CT)
    assert study.attrs["PatientID"] and study.source == "browser"
    assert writer(srv).written == 1 and srv.service.retriever.flights == {}  # memory freed
    files = list(cache.store.objects.iterdir())
    assert len(files) == len(CT)
    assert not any(CT[0].data[-4096:] in f.read_bytes() for f in files)  # sealed on disk
    # the next request reads the cache: no second retrieval
    status, headers, body = await get(url)
    assert status == 200 and datasets(headers, body) == [i.data for i in CT]
    assert source.retrieves == 1 and srv.service.retriever.from_cache == 1
    # a DICOM viewer's C-GET at series level is planned from the cache too
    items = cache.plan(series_ident())
    assert items is not None and sorted(i.read() for i in items) == sorted(i.data for i in CT)
    # the link cut: still readable, instances, metadata and frames
    offline[0] = True
    source.down = True
    status, headers, body = await get(url)
    assert status == 200 and datasets(headers, body) == [i.data for i in CT]
    status, _, body = await get(f"{url}/metadata")
    assert status == 200
    status, _, _ = await get(f"{url}/instances/{CT[1].sop_instance}/frames/1")
    assert status == 200
    assert source.retrieves == 1


async def test_a_full_cache_never_fails_the_answer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache, _ = make_cache(tmp_path, max_size=len(CT[0].data) + 100)  # one instance fits
    srv, source = await start(cache)
    try:
        caplog.set_level(logging.INFO)
        url = f"{srv.url}/studies/{STUDY}/series/{SERIES}"
        status, headers, body = await get(url)
        assert status == 200 and datasets(headers, body) == [i.data for i in CT]
        await writer(srv).drain()
        assert writer(srv).failed == 1 and writer(srv).written == 0
        assert "served from memory" in caplog.text
        assert cache.plan(series_ident()) is None  # nothing half-cached is served
        assert cache.store.total <= cache.store.max_size
        status, headers, body = await get(url)  # still served, from the holding area
        assert status == 200 and datasets(headers, body) == [i.data for i in CT]
        assert source.retrieves == 1
        assert STUDY not in caplog.text  # no patient data in the log lines
        assert "DOE" not in caplog.text and "RELAY0001" not in caplog.text
    finally:
        await srv.stop()


async def test_a_disk_error_never_fails_the_answer(tmp_path: Path) -> None:
    cache, _ = make_cache(tmp_path)
    shutil.rmtree(cache.store.objects)
    cache.store.objects.write_bytes(b"")  # a file where the directory was: every write fails
    srv, _source = await start(cache)
    try:
        url = f"{srv.url}/studies/{STUDY}/series/{SERIES}"
        status, headers, body = await get(url)
        assert status == 200 and datasets(headers, body) == [i.data for i in CT]
        await writer(srv).drain()
        assert writer(srv).failed == 1
        assert cache.plan(series_ident()) is None
    finally:
        await srv.stop()


async def test_a_retrieve_with_failed_sub_operations_is_not_cached_as_complete(
    setup: Setup,
) -> None:
    srv, source, cache, _ = setup
    source.final = FinalResponse(st.WARNING_SUBOPS, completed=len(CT), failed=1)
    with pytest.raises(aiohttp.ClientPayloadError):  # cut: not served as complete either
        await get(f"{srv.url}/studies/{STUDY}/series/{SERIES}")
    await writer(srv).drain()
    study = cache.store.study(STUDY)
    assert study is not None and study.series_done == {} and not study.complete
    assert cache.plan(series_ident()) is None
    assert writer(srv).written == 0 and writer(srv).failed == 0


async def test_a_failed_retrieval_marks_nothing(setup: Setup) -> None:
    srv, source, cache, _ = setup
    source.down = True
    assert (await get(f"{srv.url}/studies/{STUDY}/series/{SERIES}"))[0] == 502
    await writer(srv).drain()
    assert cache.plan(series_ident()) is None and writer(srv).written == 0


async def test_write_throughs_at_once_are_bounded(setup: Setup) -> None:
    srv, _source, _, _ = setup
    writer(srv).max_running = 0
    status, _, _ = await get(f"{srv.url}/studies/{STUDY}/series/{SERIES}")
    assert status == 200 and writer(srv).skipped == 1 and writer(srv).running() == 0


def test_complete_by_the_final_response() -> None:
    assert complete_by(FinalResponse(st.SUCCESS, completed=3, failed=0), 3)
    assert not complete_by(FinalResponse(st.SUCCESS), 3)  # no counts: nothing vouches
    assert not complete_by(FinalResponse(st.SUCCESS, completed=0, failed=0), 3)
    assert complete_by(FinalResponse(st.SUCCESS, completed=2, failed=0), 3)  # all it counts is here
    assert not complete_by(FinalResponse(st.SUCCESS, completed=4, failed=0), 3)
    assert not complete_by(FinalResponse(st.SUCCESS, completed=3, failed=1), 3)
    assert not complete_by(FinalResponse(st.WARNING_SUBOPS, completed=3), 3)
    assert not complete_by(FinalResponse(st.SUCCESS), 0)
    assert not complete_by(None, 3)


async def test_a_success_without_counts_is_not_cached_as_complete(setup: Setup) -> None:
    """The counts of a final response are optional in DICOM: without them nothing says
    every instance came (headfirst.counts_match refuses the same answer)."""
    srv, source, cache, _ = setup
    source.final = FinalResponse(st.SUCCESS)
    url = f"{srv.url}/studies/{STUDY}/series/{SERIES}"
    status, headers, body = await get(url)
    assert status == 200 and datasets(headers, body) == [i.data for i in CT]
    await writer(srv).drain()
    study = cache.store.study(STUDY)
    assert study is not None and study.series_done == {} and not study.complete
    assert cache.plan(series_ident()) is None and writer(srv).written == 0


def other_series_of_this_study() -> samples.EncodedInstance:
    """A CT instance moved to another series of the same study."""
    ds = rawds.decode_dataset(CT[0].data, CT[0].transfer_syntax)
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.1341.9.1"
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.1341.9.2"
    return samples.encode_instance(ds, CT[0].transfer_syntax)


class LooseSource(ScriptedSource):
    """A PACS that matches an IMAGE-level retrieve on the SOP Instance UID alone, so a
    jump ahead can bring an instance of another series or study."""

    def __init__(self, others: Sequence[samples.EncodedInstance]) -> None:
        super().__init__()
        self.others = others

    async def retrieve(
        self,
        identifier: Dataset,
        outcome: list[FinalResponse] | None = None,
        *,
        headers_only: bool = False,
        priority: Priority | None = None,
    ) -> AsyncIterator[Instance]:
        if identifier.QueryRetrieveLevel == "IMAGE":
            for i in self.others:
                if i.sop_instance == identifier.SOPInstanceUID:
                    yield Instance(i.sop_class, i.sop_instance, i.transfer_syntax, i.data)
        async for msg in super().retrieve(
            identifier, outcome, headers_only=headers_only, priority=priority
        ):
            yield msg


@pytest.mark.parametrize("where", ["series", "study"])
async def test_an_instance_of_another_series_is_not_cached_under_this_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    foreign = other_series_of_this_study() if where == "series" else INSTANCES[-1]
    assert foreign.sop_instance not in {i.sop_instance for i in CT}
    cache, _ = make_cache(tmp_path)
    source = LooseSource([foreign])
    srv, _ = await start(cache, source)
    try:
        caplog.set_level(logging.INFO)
        source.release.clear()  # the series waits: the viewport's instance jumps ahead
        frame = (f"{srv.url}/studies/{STUDY}/series/{SERIES}/instances/"
                 f"{foreign.sop_instance}/frames/1")  # fmt: skip
        asked = asyncio.ensure_future(get(frame, headers={"Range": "bytes=0-1023"}))
        for _ in range(250):  # the jump ahead brings it, and it is refused (retrieve.py)
            if "another series or study" in caplog.text:
                break
            await asyncio.sleep(0.02)
        assert [uid for uid, _ in source.ahead] == [foreign.sop_instance]
        source.release.set()
        assert (await asyncio.wait_for(asked, 20))[0] == 404  # not of this series
        url = f"{srv.url}/studies/{STUDY}/series/{SERIES}"
        assert (await get(url))[0] == 200
        await writer(srv).drain()
        study = cache.store.study(STUDY)
        assert study is not None
        assert set(study.instances) == {i.sop_instance for i in CT}
        # never in the flight, so never offered to the cache (which would refuse it too)
        assert study.series_done == {SERIES: len(CT)} and writer(srv).refused == 0
        items = cache.plan(series_ident())  # the series' own instances, from the cache
        assert items is not None and sorted(i.read() for i in items) == sorted(i.data for i in CT)
        assert "another series or study" in caplog.text
        assert foreign.sop_instance not in caplog.text and SERIES not in caplog.text
        assert STUDY not in caplog.text
    finally:
        await srv.stop()


class QuotingSource(ScriptedSource):
    """A PACS whose C-FIND fails with an error comment quoting a patient ID (the agent
    forwards the comment verbatim)."""

    async def find(self, identifier: Dataset, max_matches: int, *, skip: int = 0) -> FindResult:
        raise UpstreamError(502, "C-FIND failed with status 0xC001: no such patient RELAY0001")


async def test_an_upstream_reason_never_reaches_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache, _ = make_cache(tmp_path)
    srv, _ = await start(cache, QuotingSource())
    try:
        caplog.set_level(logging.DEBUG)
        status, _, _ = await get(f"{srv.url}/studies/{STUDY}/series/{SERIES}")
        assert status == 200  # the browser is served; only the cache goes without
        await writer(srv).drain()
        assert "write-through skipped" in caplog.text and "HTTP 502" in caplog.text
        assert "RELAY0001" not in caplog.text
        assert cache.store.study(STUDY) is None
    finally:
        await srv.stop()


async def test_series_attributes_are_written_through_under_the_stores_lock(
    setup: Setup,
) -> None:
    """Index saves and C-FIND snapshots copy them on other threads."""
    srv, _, cache, _ = setup
    cache.store.adopt(STUDY, {}, None, "browser")
    study = cache.store.study(STUDY)
    assert study is not None
    study.series_attrs = LockedOnly(cache.store)
    status, _, _ = await get(f"{srv.url}/studies/{STUDY}/series/{SERIES}")
    assert status == 200
    await writer(srv).drain()
    assert writer(srv).written == 1 and set(study.series_attrs) == {SERIES}
