"""Filling a study (relay.workstation.cache.fetch): when the PACS's counts let it be
complete. A scripted agent on an in-memory stream speaks the relay's DICOM messages (the
answers here are ones a real PACS behind pynetdicom cannot be made to give: counts that
are absent, or larger than what came); the cache is a real CacheStore on disk, and
the DICOM node's view of it a real CacheServer."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from relay.dicom import rawds
from relay.dicom import status as st
from relay.dicom.codec import (
    DicomLimits,
    FinalResponse,
    Instance,
    MessageCodec,
    Pending,
    Request,
    Skip,
    read_message,
    write_message,
)
from relay.net.bytestream import ByteStream, pipe
from relay.workstation.cache import durable
from relay.workstation.cache import store as store_module
from relay.workstation.cache.fetch import FetchError, StudyFetcher
from relay.workstation.cache.sealing import Sealer
from relay.workstation.cache.serve import CacheServer
from relay.workstation.cache.store import CachedInstance, CacheStore
from relay_dev import samples
from tests.ends_helpers import wait_until

INSTANCES = samples.demo_studies(ct_slices=3, mr_slices=1)
CT = [i for i in INSTANCES if i.sop_class.endswith(".1.2")]
MR = [i for i in INSTANCES if i.sop_class.endswith(".1.4")]  # another study
STUDY = str(rawds.decode_dataset(CT[0].data, CT[0].transfer_syntax).StudyInstanceUID)
SERIES = str(rawds.decode_dataset(CT[0].data, CT[0].transfer_syntax).SeriesInstanceUID)
PATIENT = "CANARY-PID-4711"  # quoted by the scripted PACS's error comment


@dataclass
class ScriptedAgent:
    """The agent's side of the relay streams: a study-level C-FIND answer with or without
    NumberOfStudyRelatedInstances, then a retrieve sending `sends` (less what the Skip
    lists) and ending with `final`."""

    count: int | None
    sends: Sequence[samples.EncodedInstance]
    final: FinalResponse
    skipped: list[str] = field(default_factory=list)

    async def open_stream(self, headers: object) -> ByteStream:
        ours, theirs = pipe(limit=8 << 20)
        asyncio.get_running_loop().create_task(self._serve(theirs))
        return ours

    async def _serve(self, end: ByteStream) -> None:
        codec = MessageCodec(DicomLimits())
        req = await read_message(end, codec)
        assert isinstance(req, Request)
        if req.op == "find":
            await self._find(end, codec)
        else:
            if req.resume:
                skip = await read_message(end, codec)
                assert isinstance(skip, Skip)
                self.skipped.extend(skip.uids)
            for i in self.sends:
                if i.sop_instance not in self.skipped:
                    msg = Instance(i.sop_class, i.sop_instance, i.transfer_syntax, i.data)
                    await write_message(end, codec, msg)
            await write_message(end, codec, self.final)
        await end.write_eof()

    async def _find(self, end: ByteStream, codec: MessageCodec) -> None:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = STUDY
        ds.PatientID = PATIENT
        if self.count is not None:  # an optional return key: a PACS may leave it out
            ds.NumberOfStudyRelatedInstances = str(self.count)
        pending = Pending(dataset=rawds.encode_dataset(ds), transfer_syntax=ExplicitVRLittleEndian)
        await write_message(end, codec, pending)
        await write_message(end, codec, FinalResponse(st.SUCCESS))


def cache(tmp_path: Path) -> CacheServer:
    store = CacheStore(tmp_path, Sealer(Sealer.new_key()), max_size=1 << 30, max_age=3600)
    store.open(fresh_key=True)
    return CacheServer(store, lambda: False, lambda uid: None)


def study_ident() -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = STUDY
    return ds


async def fill(server: CacheServer, agent: ScriptedAgent) -> bool:
    fetcher = StudyFetcher(agent.open_stream, server.store,
                           MessageCodec(DicomLimits(), accept_pixels=True), timeout=10)  # fmt: skip
    result = await asyncio.wait_for(fetcher.fill(STUDY, "test"), 20)
    study = server.store.study(STUDY)
    assert study is not None and study.complete == result.complete
    return result.complete


def success(completed: int | None) -> FinalResponse:
    if completed is None:
        return FinalResponse(st.SUCCESS)  # the counts are optional in a final response
    return FinalResponse(st.SUCCESS, completed=completed, failed=0, warning=0, remaining=0)


@pytest.mark.parametrize(
    ("count", "sent", "completed"),
    [
        (None, 1, 3),  # no study count; the final counts 3, one came
        (None, 3, None),  # no count at all: nothing says all came
        (3, 1, None),  # the study count says 3, one came
        (None, 0, 0),  # nothing came, nothing counted
    ],
)
async def test_a_study_no_count_vouches_for_is_kept_incomplete(
    tmp_path: Path, count: int | None, sent: int, completed: int | None
) -> None:
    server = cache(tmp_path)
    complete = await fill(server, ScriptedAgent(count, CT[:sent], success(completed)))
    assert not complete
    assert server.plan(study_ident()) is None  # a viewer's C-GET goes to the network
    study = server.store.study(STUDY)
    assert study is not None and len(study.instances) == sent  # what came is kept


@pytest.mark.parametrize(("count", "completed"), [(None, 3), (3, None), (3, 3)])
async def test_a_study_a_count_vouches_for_is_complete(
    tmp_path: Path, count: int | None, completed: int | None
) -> None:
    server = cache(tmp_path)
    assert await fill(server, ScriptedAgent(count, CT, success(completed)))
    plan = server.plan(study_ident())
    assert plan is not None and sorted(i.read() for i in plan) == sorted(i.data for i in CT)


async def test_instances_held_already_count_toward_the_final_count(tmp_path: Path) -> None:
    """A resumed fill: the PACS counts every instance, the agent skips those held."""
    server = cache(tmp_path)
    store = server.store
    store.begin(STUDY, {}, None, "test")
    for i in CT[:2]:
        store.put(STUDY, CachedInstance(i.sop_class, i.sop_instance, SERIES,
                                        i.transfer_syntax, 0), i.data)  # fmt: skip
    store.finish(STUDY, complete=False)
    agent = ScriptedAgent(None, CT, success(len(CT)))
    assert await fill(server, agent)
    assert sorted(agent.skipped) == sorted(i.sop_instance for i in CT[:2])
    short = ScriptedAgent(None, CT, success(len(CT) + 1))  # one more counted than exists
    assert not await fill(server, short)


async def test_an_instance_of_another_study_is_not_cached(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = cache(tmp_path)
    caplog.set_level(logging.INFO)
    agent = ScriptedAgent(None, [*CT, MR[0]], success(len(CT) + 1))
    assert not await fill(server, agent)  # the PACS counted it: the study is not whole
    study = server.store.study(STUDY)
    assert study is not None and set(study.instances) == {i.sop_instance for i in CT}
    assert "another study" in caplog.text
    assert STUDY not in caplog.text and MR[0].sop_instance not in caplog.text
    assert PATIENT not in caplog.text


class LockedOnly(dict[str, dict[str, str]]):
    """A study's `series_attrs` that must be written only under the store's lock: index
    saves and C-FIND snapshots copy it on other threads."""

    def __init__(self, store: CacheStore) -> None:
        super().__init__()
        self.store = store

    def _check(self) -> None:
        assert self.store._lock._is_owned(), "series attributes written outside the lock"  # type: ignore[attr-defined]

    def __setitem__(self, key: str, value: dict[str, str]) -> None:
        self._check()
        super().__setitem__(key, value)

    def setdefault(self, key: str, default: dict[str, str]) -> dict[str, str]:
        self._check()
        return super().setdefault(key, default)


async def test_series_attributes_are_written_under_the_stores_lock(tmp_path: Path) -> None:
    server = cache(tmp_path)
    study = server.store.begin(STUDY, {}, None, "test")
    study.series_attrs = LockedOnly(server.store)
    assert await fill(server, ScriptedAgent(None, CT, success(len(CT))))
    assert set(study.series_attrs) == {SERIES}


@dataclass
class CutShort(ScriptedAgent):
    """The retrieve sends `sends` and then its stream ends without a final response (the
    link dropped), or, `hang`, sends nothing more and never ends."""

    hang: bool = False

    async def _serve(self, end: ByteStream) -> None:
        codec = MessageCodec(DicomLimits())
        req = await read_message(end, codec)
        assert isinstance(req, Request)
        if req.op == "find":
            await self._find(end, codec)
            await end.write_eof()
            return
        for i in self.sends:
            msg = Instance(i.sop_class, i.sop_instance, i.transfer_syntax, i.data)
            await write_message(end, codec, msg)
        if self.hang:
            await asyncio.Event().wait()  # cancelled with the test's loop
        await end.write_eof()


def persisted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[CacheStore, list[str]]:
    """A keyring-mode store (its index persisted, so an index save syncs the files written
    since the last), and the name of the thread each of those syncs ran in."""
    store = CacheStore(tmp_path, Sealer(Sealer.new_key()), max_size=1 << 30, max_age=3600,
                       persist_index=True)  # fmt: skip
    store.open(fresh_key=True)
    synced_in: list[str] = []

    def sync_file(path: Path) -> None:
        synced_in.append(threading.current_thread().name)
        durable.sync_file(path)

    monkeypatch.setattr(store_module, "sync_file", sync_file)
    return store, synced_in


async def test_a_fill_the_link_cuts_short_syncs_its_files_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its index save syncs every file it wrote (up to store.MAX_UNSYNCED: seconds of
    disk work for a large study) in a worker thread, as a fill that ends does; it ran on
    the event loop, and the session, DICOMweb and the forwards waited for the disk."""
    store, synced_in = persisted(tmp_path, monkeypatch)
    fetcher = StudyFetcher(CutShort(None, CT, success(len(CT))).open_stream, store,
                           MessageCodec(DicomLimits(), accept_pixels=True), timeout=10)  # fmt: skip
    with pytest.raises(FetchError, match="before the final response"):
        await asyncio.wait_for(fetcher.fill(STUDY, "test"), 20)
    study = store.study(STUDY)
    assert study is not None and not study.filling and len(study.instances) == len(CT)
    assert len(synced_in) == len(CT)  # all of them, at that save
    assert threading.current_thread().name not in synced_in


async def test_a_cancelled_fill_saves_its_index_off_the_event_loop_before_it_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prefetcher's stop cancels a fill under way: its index is saved (synced) in a
    worker thread, and saved by the time the cancelled fill has ended."""
    store, synced_in = persisted(tmp_path, monkeypatch)
    fetcher = StudyFetcher(CutShort(None, CT, success(len(CT)), hang=True).open_stream, store,
                           MessageCodec(DicomLimits(), accept_pixels=True), timeout=10)  # fmt: skip
    task = asyncio.create_task(fetcher.fill(STUDY, "test"))
    await wait_until(lambda: len(getattr(store.study(STUDY), "instances", ())) == len(CT))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 20)
    study = store.study(STUDY)
    assert study is not None and not study.filling
    assert len(synced_in) == len(CT)
    assert threading.current_thread().name not in synced_in


async def test_a_fill_cancelled_twice_still_ends_only_once_its_save_has(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop that cancels again (a second stop, the run's end cancelling what is left)
    must not end the fill before its save: whoever awaited the fill (the prefetcher's
    stop, then a revocation's wipe, or the cache's stop) would go on while the save, its
    syncs and the index's rename still ran in the thread. Shielded only, the second
    cancel ended the fill at once."""
    store, _ = persisted(tmp_path, monkeypatch)
    saving, go_on = threading.Event(), threading.Event()
    real_finish = store.finish
    finished: list[str] = []

    def held_finish(uid: str, *, complete: bool, counted: int | None = None) -> None:
        saving.set()
        assert go_on.wait(20), "the test never let the save go"
        real_finish(uid, complete=complete, counted=counted)
        finished.append(threading.current_thread().name)

    monkeypatch.setattr(store, "finish", held_finish)
    fetcher = StudyFetcher(CutShort(None, CT, success(len(CT)), hang=True).open_stream, store,
                           MessageCodec(DicomLimits(), accept_pixels=True), timeout=10)  # fmt: skip
    task = asyncio.create_task(fetcher.fill(STUDY, "test"))
    await wait_until(lambda: len(getattr(store.study(STUDY), "instances", ())) == len(CT))
    task.cancel()
    try:
        assert await asyncio.to_thread(saving.wait, 20)  # the save is under way, in a thread
        task.cancel()  # again
        for _ in range(20):  # the loop runs on, and the fill waits for its save
            await asyncio.sleep(0)
        assert not task.done() and finished == []
    finally:
        go_on.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 20)
    assert finished and finished[0] != threading.current_thread().name
    study = store.study(STUDY)
    assert study is not None and not study.filling
