"""Series flights and their holding area (relay.workstation.dicomweb.retrieve): a partial
retrieve is never served or kept as complete, a series complete in the cache is held by
its index and read per instance as asked (bounded memory, a damaged file cuts the answer
and sends the next request to the network), and a series without instances is not kept. The real
DicomwebServer over HTTP where the browser sees the difference (the scripted source of
test_server, the real disk cache of test_writethrough); the Retriever alone for what only
its holding area shows."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydicom.dataset import Dataset

from relay.dicom import rawds
from relay.dicom import status as st
from relay.dicom.codec import (
    DicomLimits,
    FinalResponse,
    Instance,
    MessageCodec,
    Request,
    read_message,
    write_message,
)
from relay.dicom.offer import CodecOffer
from relay.net.bytestream import ByteStream, pipe
from relay.workstation.cache.serve import CacheServer
from relay.workstation.cache.store import CachedInstance
from relay.workstation.dicomweb.kept import KeptBytes
from relay.workstation.dicomweb.retrieve import INDEX_COST, Retriever, read_budget
from relay.workstation.dicomweb.server import DicomwebServer
from relay.workstation.dicomweb.settings import DEFAULT_HOLD_SIZE
from relay.workstation.dicomweb.source import DicomSource, UpstreamError, retrieve_failure

from .test_server import CT, SERIES, STUDY, ScriptedSource, get, server
from .test_writethrough import datasets, make_cache, start, writer

__all__ = ["server"]  # the fixture

WAIT = 30.0  # seconds: a bound on waiting for a background step, not a measurement
Server = tuple[DicomwebServer, ScriptedSource]
LE = "1.2.840.10008.1.2.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"

PARTIAL = [
    FinalResponse(st.WARNING_SUBOPS, completed=len(CT), failed=1),
    FinalResponse(st.SUBOPS_FAILED, completed=len(CT), failed=1),
    FinalResponse(st.SUCCESS, completed=len(CT), failed=1),
]


def series_url(srv: DicomwebServer, series: str = SERIES) -> str:
    return f"{srv.url}/studies/{STUDY}/series/{series}"


# -- A: a partial retrieve ----------------------------------------------------------------


@pytest.mark.parametrize("final", PARTIAL, ids=["0xB000", "0xA702", "success-failed"])
async def test_a_partial_retrieve_is_cut_not_completed_and_not_kept(
    server: Server, final: FinalResponse
) -> None:
    srv, source = server
    source.final = source.header_final = final  # the headers-only retrieval says so too
    url = series_url(srv)
    for what in (url, f"{url}/metadata"):
        # every instance came, then the final said some failed: no closing delimiter
        with pytest.raises(aiohttp.ClientPayloadError):
            await get(what)
        assert srv.service.retriever.flights == {}  # not kept for the next request
    asked = source.retrieves
    assert asked >= 2  # each request asked the PACS again
    source.final = source.header_final = None  # the PACS has them all now
    status, headers, body = await get(url)
    assert status == 200 and datasets(headers, body) == [i.data for i in CT]
    assert source.retrieves == asked + 1
    assert len(srv.service.retriever.flights) == 1  # a complete series is held


async def test_a_partial_retrieve_without_instances_is_502_not_404(server: Server) -> None:
    srv, source = server
    source.final = source.header_final = FinalResponse(st.WARNING_SUBOPS, completed=0, failed=2)
    source.missing.add(SERIES)
    for what in ("", "/metadata", f"/instances/{CT[0].sop_instance}"):
        status, _, body = await get(series_url(srv) + what)
        assert status == 502 and b"incomplete" in body, what
    assert srv.service.retriever.flights == {}


async def test_an_instance_that_came_is_served_from_a_partial_series(server: Server) -> None:
    """One instance is whole when it came, whatever became of the rest of its series."""
    srv, source = server
    source.final = FinalResponse(st.WARNING_SUBOPS, completed=len(CT), failed=1)
    status, headers, body = await get(f"{series_url(srv)}/instances/{CT[1].sop_instance}")
    assert status == 200 and datasets(headers, body) == [CT[1].data]


def agent_answering(
    codec: MessageCodec, final: FinalResponse, opened: list[asyncio.Task[None]]
) -> Any:
    """An open_stream whose far end is an agent sending two CT instances, then `final`."""

    async def agent(end: ByteStream) -> None:
        assert isinstance(await read_message(end, codec), Request)
        for inst in CT[:2]:
            msg = Instance(inst.sop_class, inst.sop_instance, inst.transfer_syntax, inst.data)
            await write_message(end, codec, msg)
        await write_message(end, codec, final)

    async def open_stream(headers: dict[str, str]) -> ByteStream:
        near, far = pipe(headers)
        opened.append(asyncio.ensure_future(agent(far)))
        return near

    return open_stream


@pytest.mark.parametrize(
    ("final", "fails"),
    [
        (FinalResponse(st.WARNING_SUBOPS, completed=2, failed=1), True),
        (FinalResponse(st.SUBOPS_FAILED, completed=2, failed=1, comment="disk full"), True),
        (FinalResponse(st.SUCCESS, completed=2, failed=1), True),
        (FinalResponse(st.SUCCESS, completed=2, failed=0), False),
        (FinalResponse(st.SUCCESS, completed=3, failed=0), True),  # one did not come
    ],
    ids=["0xB000", "0xA702", "success-failed", "success", "success-fewer-came"],
)
async def test_the_source_fails_a_partial_retrieve_after_its_instances(
    final: FinalResponse, fails: bool
) -> None:
    codec = MessageCodec(DicomLimits())
    opened: list[asyncio.Task[None]] = []
    source = DicomSource(agent_answering(codec, final, opened), codec, timeout=WAIT,
                         offer=CodecOffer(()))  # fmt: skip
    ident = Dataset()
    ident.QueryRetrieveLevel = "SERIES"
    ident.StudyInstanceUID = STUDY
    ident.SeriesInstanceUID = SERIES
    outcome: list[FinalResponse] = []
    got: list[str] = []
    try:
        async for msg in source.retrieve(ident, outcome):
            got.append(msg.sop_instance)
    except UpstreamError as exc:
        assert fails and exc.http_status == 502 and "incomplete" in exc.reason
        assert "0x" in exc.reason and ("failed" in exc.reason or "2 of 3" in exc.reason)
    else:
        assert not fails
    assert got == [i.sop_instance for i in CT[:2]]  # every instance that came, first
    assert outcome == [final]  # the counts are still told
    await asyncio.gather(*opened)


def test_retrieve_failure_vouches_only_for_success_without_failures() -> None:
    assert retrieve_failure(FinalResponse(st.SUCCESS, completed=3, failed=0)) is None
    assert retrieve_failure(FinalResponse(st.SUCCESS)) is None
    # every sub-operation completed, some with warnings: nothing is missing
    assert (
        retrieve_failure(FinalResponse(st.WARNING_SUBOPS, completed=3, failed=0, warning=1)) is None
    )
    for final in (
        FinalResponse(st.WARNING_SUBOPS, completed=3),  # failures not counted: cannot tell
        FinalResponse(st.WARNING_SUBOPS, completed=2, failed=1),
        FinalResponse(st.SUBOPS_FAILED, completed=2, failed=1),
        FinalResponse(st.SUBOPS_FAILED, completed=0, failed=3),
        FinalResponse(st.CANCEL, completed=1),
        FinalResponse(st.PACS_UNREACHABLE),
    ):
        error = retrieve_failure(final)
        assert error is not None and error.http_status == 502, final
    unreachable = retrieve_failure(FinalResponse(st.PACS_UNREACHABLE))
    assert unreachable is not None and unreachable.reason == "the PACS is unreachable"
    busy = retrieve_failure(FinalResponse(st.AGENT_BUSY, comment="try again later"))
    assert busy is not None and busy.http_status == 503  # the agent's limits: retry soon
    assert busy.reason == "the agent is busy: try again later"


# -- B: a series read from the cache -------------------------------------------------------


def count_reads(cache: CacheServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """The store's reads (each one opens and authenticates a file), by SOP Instance UID."""
    reads: dict[str, int] = {}
    read = cache.store.read

    def counting(inst: CachedInstance) -> bytes:
        reads[inst.sop_instance] = reads.get(inst.sop_instance, 0) + 1
        return read(inst)

    monkeypatch.setattr(cache.store, "read", counting)
    return reads


async def cached_series(srv: DicomwebServer) -> None:
    """Retrieve the series once: written through, it is then complete in the cache."""
    status, _, _ = await get(series_url(srv))
    assert status == 200
    await writer(srv).drain()
    assert writer(srv).written == 1 and srv.service.retriever.flights == {}


async def test_a_cached_series_larger_than_hold_size_is_served_from_disk_per_instance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, _ = make_cache(tmp_path)
    srv, source = await start(cache)
    retriever = srv.service.retriever
    try:
        await cached_series(srv)
        reads = count_reads(cache, monkeypatch)
        retriever.hold_size = 300_000  # not one instance of the series (3 x 525 KB)
        retriever.reads = KeptBytes(64, 2 * len(CT[0].data))  # two of its instances
        series_size = sum(len(i.data) for i in CT)
        assert series_size > retriever.hold_size

        def within_bounds() -> None:
            assert retriever.held <= retriever.hold_size  # the index only
            assert retriever.reads.bytes <= retriever.reads.max_bytes
            assert retriever.held + retriever.reads.bytes < series_size

        status, headers, body = await get(series_url(srv))
        assert status == 200 and datasets(headers, body) == [i.data for i in CT]  # bit-exact
        assert reads == {i.sop_instance: 1 for i in CT}
        within_bounds()
        # OHIF: each instance's metadata, then its frames, one request each
        for inst in CT:
            url = f"{series_url(srv)}/instances/{inst.sop_instance}"
            for what in ("/metadata", "/frames/1", "/frames/1", ""):
                status, headers, body = await get(url + what)
                assert status == 200, what
                within_bounds()
            assert datasets(headers, body) == [inst.data]
        # each instance read once more at most (the LRU holds two of the three), never the
        # series per request: 12 requests after the series' own answer
        assert sum(reads.values()) <= 2 * len(CT)
        assert retriever.from_cache == 1 and len(retriever.flights) == 1  # indexed once, held
        assert source.retrieves == 1  # never the network
    finally:
        await srv.stop()


async def test_the_first_frame_of_a_cached_series_reads_only_its_instance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, _ = make_cache(tmp_path)
    srv, _source = await start(cache)
    try:
        await cached_series(srv)
        reads = count_reads(cache, monkeypatch)
        # the default hold_size's (this server's 4 MiB keeps 512 KiB: not one CT slice)
        srv.service.retriever.reads = KeptBytes(64, read_budget(DEFAULT_HOLD_SIZE))
        url = f"{series_url(srv)}/instances/{CT[1].sop_instance}/frames/1"
        status, _, _ = await get(url)
        assert status == 200
        assert reads == {CT[1].sop_instance: 1}  # not the series, not twice
        status, _, _ = await get(url)  # again (OHIF's repeated frame request): kept
        assert status == 200 and reads == {CT[1].sop_instance: 1}
    finally:
        await srv.stop()


async def test_an_instance_larger_than_the_reads_kept_is_read_once_within_hold_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OHIF asks for a multi-frame instance's frames one request each: an instance larger
    than the LRU of reads (an eighth of hold_size) was read and decrypted for each."""
    cache, _ = make_cache(tmp_path)
    srv, source = await start(cache)
    retriever = srv.service.retriever
    try:
        await cached_series(srv)
        reads = count_reads(cache, monkeypatch)
        size = len(CT[1].data)
        retriever.hold_size = 3 * size  # the LRU keeps 3/8 of one instance: none
        retriever.reads = KeptBytes(64, read_budget(retriever.hold_size))
        url = f"{series_url(srv)}/instances/{CT[1].sop_instance}"
        for what in ("/metadata", "/frames/1", "/frames/1", ""):
            status, headers, body = await get(url + what)
            assert status == 200, what
            assert retriever.held <= retriever.hold_size
        assert datasets(headers, body) == [CT[1].data]
        assert reads == {CT[1].sop_instance: 1}  # was 4: once per request
        assert retriever.reads.bytes == 0 and retriever.large.bytes == size
        assert source.retrieves == 1
    finally:
        await srv.stop()


def flip_a_byte(cache: CacheServer, sop_instance: str) -> None:
    path = cache.store.path_of(STUDY, sop_instance)
    sealed = bytearray(path.read_bytes())
    sealed[len(sealed) // 2] ^= 0x01
    path.write_bytes(bytes(sealed))


@pytest.mark.parametrize("what", ["series", "frames"])
async def test_a_damaged_cached_file_fails_its_answer_and_the_next_goes_to_the_network(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, what: str
) -> None:
    cache, _ = make_cache(tmp_path)
    refetched: list[str] = []
    cache.refetch = refetched.append
    srv, source = await start(cache)
    retriever = srv.service.retriever
    try:
        await cached_series(srv)
        flip_a_byte(cache, CT[1].sop_instance)
        caplog.clear()
        if what == "series":
            # CT[0] is sent, then CT[1] does not authenticate: cut, no closing delimiter
            with pytest.raises(aiohttp.ClientPayloadError):
                await get(series_url(srv))
        else:  # nothing sent yet: the HTTP error
            url = f"{series_url(srv)}/instances/{CT[1].sop_instance}/frames/1"
            status, _, _ = await get(url)
            assert status == 502
        study = cache.store.study(STUDY)
        assert study is not None and CT[1].sop_instance not in study.instances  # dropped
        assert SERIES not in study.series_done and not study.complete
        assert cache.counters.damaged == 1 and refetched == [STUDY]
        damaged = [r for r in caplog.records if "damaged" in r.getMessage()]
        assert len(damaged) == 1  # one line, without patient data
        patient = str(rawds.decode_dataset(CT[0].data, CT[0].transfer_syntax).PatientID)
        assert patient not in caplog.text
        assert retriever.flights == {}  # forgotten: the next request goes to the network
        status, headers, body = await get(series_url(srv))
        assert status == 200 and datasets(headers, body) == [i.data for i in CT]
        assert source.retrieves == 2
    finally:
        await srv.stop()


class Pacs:
    """A retrieve per series from `series`: its number of instances of `size` bytes each."""

    def __init__(self, series: dict[str, int], size: int = 100) -> None:
        self.series = series
        self.size = size
        self.retrieves = 0

    async def retrieve(
        self, identifier: Dataset, outcome: list[FinalResponse] | None = None, **_: Any
    ) -> AsyncIterator[Instance]:
        self.retrieves += 1
        uid = str(identifier.SeriesInstanceUID)
        count = self.series.get(uid, 0)
        for i in range(count):
            yield Instance(CT_IMAGE, f"{uid}.{i}", LE, bytes(self.size))
        if outcome is not None:
            outcome.append(FinalResponse(st.SUCCESS, completed=count, failed=0))


class Cache:
    """A cache with one complete series of `count` instances of `size` bytes; `gate` holds
    its index() (a slow disk); `present` False: the series left the cache."""

    def __init__(self, series: str, count: int, size: int) -> None:
        self.series, self.count, self.size = series, count, size
        self.gate = threading.Event()
        self.gate.set()
        self.present = True
        self.indexed = 0
        self.reads = 0

    def index(self, identifier: Dataset) -> list[CachedInstance] | None:
        if str(identifier.SeriesInstanceUID) != self.series or not self.present:
            return None
        assert self.gate.wait(WAIT)
        self.indexed += 1
        return [CachedInstance(CT_IMAGE, f"{self.series}.{i}", self.series, LE, self.size)
                for i in range(self.count)]  # fmt: skip

    def holds(self, study: str, series: str) -> bool:
        return self.present and series == self.series

    def read(self, study: str, inst: CachedInstance) -> bytes | None:
        self.reads += 1
        return b"\1" * self.size


def retriever(
    pacs: Pacs,
    cache: Cache | None = None,
    *,
    hold_size: int = 10_000,
    max_flights: int = 8,
    max_held: int = 256,
) -> Retriever:
    r = Retriever(pacs, None, hold_size=hold_size, max_flights=max_flights,  # type: ignore[arg-type]
                  max_held=max_held)  # fmt: skip
    r.cache = cache  # type: ignore[assignment]  # the read path only: no write-through
    return r


async def uids(r: Retriever, series: str) -> list[str]:
    flight = await r.series("1.2", series)
    return [i.sop_instance async for i in flight.instances()]


async def test_a_cached_series_larger_than_hold_size_is_held_by_its_index() -> None:
    cache = Cache("1.2.9", count=50, size=1_000)  # 50 KB in the cache, 40 KB holding
    r = retriever(Pacs({"1.2.1": 2, "1.2.2": 3}), cache, hold_size=40_000)
    try:
        assert await uids(r, "1.2.1") == ["1.2.1.0", "1.2.1.1"]
        assert len(await uids(r, "1.2.2")) == 3
        assert await uids(r, "1.2.9") == [f"1.2.9.{i}" for i in range(50)]
        assert cache.reads == 0  # the index only: nothing read before it is asked for
        # held, and the retrieved series not pushed out
        assert list(r.flights) == [("1.2", "1.2.1"), ("1.2", "1.2.2"), ("1.2", "1.2.9")]
        assert r.held == 500 + 50 * INDEX_COST <= r.hold_size
        flight = await r.series("1.2", "1.2.9")
        assert [await i.load() async for i in flight.instances()] == [b"\1" * 1_000] * 50
        assert cache.reads == 50 and cache.indexed == 1
        assert r.reads.max_bytes == read_budget(40_000) == 5_000
        assert r.reads.bytes <= 5_000 and len(r.reads) == 5  # the LRU's byte bound
        # the last ones read are kept, the first read again
        await flight.by_uid["1.2.9.49"].load()
        assert cache.reads == 50
        await flight.by_uid["1.2.9.0"].load()
        assert cache.reads == 51 and r.reads.bytes <= 5_000
        cache.present = False  # evicted: the held index is not used again
        assert await uids(r, "1.2.9") == [] and ("1.2", "1.2.9") not in r.flights
    finally:
        await r.close()


async def test_the_large_instance_kept_gives_its_room_to_a_series() -> None:
    """hold_size stays a cap: the large instance is kept only when it fits with the
    series held, and is the first to go when a retrieved series needs the room."""
    cache = Cache("1.2.9", count=3, size=6_000)  # each larger than the LRU (1,250 B)
    r = retriever(Pacs({"1.2.1": 4}, size=1_000), cache, hold_size=10_000)
    try:
        flight = await r.series("1.2", "1.2.9")
        await flight.finished()
        for _ in range(3):
            assert await flight.by_uid["1.2.9.0"].load() == b"\1" * 6_000
        assert cache.reads == 1 and r.held == 3 * INDEX_COST + 6_000 <= r.hold_size
        await flight.by_uid["1.2.9.1"].load()  # replaces it: one is kept
        assert cache.reads == 2 and r.held == 3 * INDEX_COST + 6_000
        assert await uids(r, "1.2.1") == [f"1.2.1.{i}" for i in range(4)]  # needs 4,000
        assert r.large.bytes == 0 and r.held == 3 * INDEX_COST + 4_000 <= r.hold_size
        assert ("1.2", "1.2.9") in r.flights  # the cached series' index stays held
        await flight.by_uid["1.2.9.1"].load()  # no room for it now: read, not kept
        await flight.by_uid["1.2.9.1"].load()
        assert cache.reads == 4 and r.large.bytes == 0 and r.held <= r.hold_size
        r.forget_cached()
        assert r.large.bytes == 0
    finally:
        await r.close()


def test_the_reads_kept_are_an_eighth_of_hold_size_up_to_64_mib() -> None:
    assert read_budget(1 << 20) == 128 << 10
    assert read_budget(256 << 20) == 32 << 20
    assert read_budget(1 << 30) == read_budget(64 << 30) == 64 << 20


async def test_cache_lookups_at_once_stay_bounded() -> None:
    cache = Cache("1.2.9", count=5, size=1_000)
    cache.gate.clear()
    r = retriever(Pacs({"1.2.1": 1}), cache, hold_size=10_000, max_flights=1)
    try:
        reading = await r.series("1.2", "1.2.9")
        with pytest.raises(UpstreamError) as refused:
            await r.series("1.2", "1.2.1")
        assert refused.value.http_status == 503
        cache.gate.set()
        await asyncio.wait_for(reading.finished(), WAIT)
        assert reading.error is None and len(reading.items) == 5
        assert list(r.flights) == [("1.2", "1.2.9")] and cache.reads == 0
        assert await uids(r, "1.2.1") == ["1.2.1.0"]
    finally:
        cache.gate.set()
        await r.close()


# -- C: series without instances, and the number held ----------------------------------------


async def test_a_series_without_instances_is_not_kept_and_asked_again(server: Server) -> None:
    srv, source = server
    source.missing.add(SERIES)  # not at the PACS yet
    status, _, _ = await get(series_url(srv))
    assert status == 404 and srv.service.retriever.flights == {}
    source.missing.clear()  # it arrives there
    status, headers, body = await get(series_url(srv))
    assert status == 200 and datasets(headers, body) == [i.data for i in CT]
    assert source.retrieves == 2


async def test_unknown_series_leave_nothing_held() -> None:
    pacs = Pacs({})
    r = retriever(pacs)
    try:
        for n in range(200):
            assert await uids(r, f"9.{n}") == []
        assert r.flights == {} and pacs.retrieves == 200
    finally:
        await r.close()


async def test_held_series_are_bounded_in_number() -> None:
    pacs = Pacs({f"1.2.{n}": 1 for n in range(10)}, size=10)
    r = retriever(pacs, max_held=3)
    try:
        for n in range(10):
            assert await uids(r, f"1.2.{n}") == [f"1.2.{n}.0"]
            assert len(r.flights) <= 3
        assert list(r.flights) == [("1.2", f"1.2.{n}") for n in (7, 8, 9)]  # LRU
        await uids(r, "1.2.7")  # used again: the least recently used goes next
        await uids(r, "1.2.0")
        assert list(r.flights) == [("1.2", f"1.2.{n}") for n in (9, 7, 0)]
        assert pacs.retrieves == 11
    finally:
        await r.close()


async def test_a_clear_forgets_what_is_kept_and_what_a_read_under_way_would_keep() -> None:
    """A cache wipe clears the reads kept (DicomwebServer.forget_cached): a read that
    started before it serves its request but keeps nothing."""
    kept: KeptBytes[str] = KeptBytes(8, 1000)
    kept.put("a", b"x" * 10)
    release = asyncio.Event()

    async def slow_read() -> bytes:
        await release.wait()
        return b"y" * 10

    reading = asyncio.ensure_future(kept.obtain("b", slow_read))
    await asyncio.sleep(0)
    kept.clear()
    release.set()
    assert await reading == b"y" * 10
    assert len(kept) == 0 and kept.bytes == 0
    assert kept.get("a") is None and kept.get("b") is None
