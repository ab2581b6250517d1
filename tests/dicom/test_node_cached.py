"""The node serving C-GET and C-MOVE from the workstation's cache (a real CacheServer on
disk): the viewer's C-CANCEL is honoured as on the network path."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import build_context

from relay.dicom import status as st
from relay.dicom.contexts import MODELS
from relay.dicom.node import DicomNode
from relay.dicom.session import STOPPING_REASON
from relay.dicom.stats import DicomCounters
from relay.net.bytestream import ByteStream
from relay.workstation.cache.sealing import Sealer
from relay.workstation.cache.serve import CacheServer
from relay.workstation.cache.store import CachedInstance, CacheStore
from relay_dev import samples

from . import viewer
from .helpers import capturing_scp, query, scu

N = 40
STUDY = samples.make_study(N, rows=16, cols=16, seed=71)
STUDY_UID = "1.2.826.0.1.3680043.10.1341.71"
SLOW = 0.01  # per C-STORE at the receiving end: a viewer writing each file


def cache(tmp_path: Path) -> CacheServer:
    """A cache holding STUDY, complete, as the prefetcher would leave it."""
    store = CacheStore(tmp_path, Sealer(Sealer.new_key()), max_size=1 << 26, max_age=600)
    store.open(fresh_key=True)
    store.begin(STUDY_UID, {}, N, "test")
    for x in STUDY:
        entry = CachedInstance(x.sop_class, x.sop_instance, "1.2.3.4", x.transfer_syntax, 0)
        store.put(STUDY_UID, entry, x.data)
    store.finish(STUDY_UID, complete=True)
    return CacheServer(store, lambda: False, lambda _uid: None)


async def no_stream(headers: Mapping[str, str]) -> ByteStream:
    raise AssertionError("a cached study must not need the agent")


@pytest.fixture
def tmp_cache(tmp_path: Path) -> CacheServer:
    return cache(tmp_path)


@pytest.fixture
async def node(tmp_cache: CacheServer) -> AsyncIterator[DicomNode]:
    n = DicomNode(no_stream, listen=("127.0.0.1", 0), timeout=20, cache=tmp_cache,
                  stats=DicomCounters())  # fmt: skip
    await n.start()
    yield n
    await n.stop()


def counts(final: Dataset) -> tuple[int, int, int, int]:
    """(remaining, completed, failed, warning) of a final response."""
    return (
        int(final.NumberOfRemainingSuboperations),
        int(final.NumberOfCompletedSuboperations),
        int(final.NumberOfFailedSuboperations),
        int(final.NumberOfWarningSuboperations),
    )


def cancelling(op: str) -> Any:
    """An `on_pending` that sends C-CANCEL after the second response."""
    model = MODELS[("study", op)]

    def on_pending(assoc: Any, n: int, status: Dataset) -> None:
        if n == 1:
            assoc.send_c_cancel(1, query_model=model)

    return on_pending


async def test_a_cached_get_stops_at_the_viewer_s_cancel(node: DicomNode) -> None:
    result = await asyncio.to_thread(
        viewer.get,
        node.address[1],
        query("STUDY", StudyInstanceUID=STUDY_UID),
        classes=[samples.CT_IMAGE_STORAGE],
        on_pending=cancelling("get"),
        before_store=lambda: time.sleep(SLOW),
    )
    final = result.final
    assert final.Status == st.CANCEL
    remaining, completed, failed, warning = counts(final)
    assert remaining > 0 and completed == len(result.received) < N
    assert remaining + completed + failed + warning == N
    assert isinstance(node.stats, DicomCounters)
    assert await until_counted(node.stats) == {("get", "cancel"): 1}


async def until_counted(stats: DicomCounters) -> dict[tuple[str, str], int]:
    """The operations counted, once there is one (the handler ends after the response)."""
    for _ in range(100):
        if stats.operations:
            break
        await asyncio.sleep(0.02)
    return dict(stats.operations)


async def test_a_cached_move_stops_at_the_viewer_s_cancel(tmp_cache: CacheServer) -> None:
    identifiers: list[Dataset | None] = []
    with capturing_scp("DEST", delay=SLOW) as (captured, port):
        n = DicomNode(no_stream, listen=("127.0.0.1", 0), timeout=20, cache=tmp_cache,
                      destinations={"DEST": ("127.0.0.1", port)})  # fmt: skip
        await n.start()
        try:
            statuses = await asyncio.to_thread(
                viewer.move,
                n.address[1],
                query("STUDY", StudyInstanceUID=STUDY_UID),
                "DEST",
                on_pending=cancelling("move"),
                identifiers=identifiers,
            )
        finally:
            await n.stop()
        received = captured.by_uid()
    final = statuses[-1]
    assert final.Status == st.CANCEL
    remaining, completed, failed, warning = counts(final)
    assert remaining > 0 and completed == len(received) < N
    assert remaining + completed + failed + warning == N
    # PS3.4 C.4.2.1.4.2: a Canceled response lists the sub-operations that failed (none
    # here); those not started are counted as remaining, not listed.
    failed_list = identifiers[-1]
    assert failed_list is not None and "FailedSOPInstanceUIDList" in failed_list
    assert not failed_list.FailedSOPInstanceUIDList


async def test_a_cached_get_without_cancel_is_whole(node: DicomNode) -> None:
    result = await asyncio.to_thread(
        viewer.get,
        node.address[1],
        query("STUDY", StudyInstanceUID=STUDY_UID),
        classes=[samples.CT_IMAGE_STORAGE],
    )
    assert result.final.Status == 0 and len(result.received) == N
    assert isinstance(node.stats, DicomCounters)
    assert await until_counted(node.stats) == {("get", "success"): 1}
    assert result.received == {x.sop_instance: (x.transfer_syntax, x.data) for x in STUDY}


class _Matches(list[Dataset]):
    """Matches that take a millisecond each to come (a large index): the viewer's
    C-CANCEL arrives while they are still being sent."""

    def __iter__(self) -> Iterator[Dataset]:
        for match in super().__iter__():
            time.sleep(0.001)
            yield match


class _OfflineIndex:
    """A cache whose index has many matches, with the relay link down."""

    def __init__(self, matches: int) -> None:
        self.matches = matches

    def offline(self) -> bool:
        return True

    def plan(self, identifier: Dataset) -> None:
        return None

    def find(self, identifier: Dataset) -> list[Dataset]:
        return _Matches(query("STUDY", StudyInstanceUID=f"1.2.3.{i}") for i in range(self.matches))


async def test_a_c_find_answered_from_the_cache_stops_at_the_viewer_s_cancel() -> None:
    """With the link down, C-FIND is answered from the cache's index; the viewer's
    C-CANCEL must stop the matches there too (pynetdicom leaves the check to the handler)."""
    matches = 2000
    model = MODELS[("study", "find")]

    def find_then_cancel(port: int) -> tuple[int, int]:
        assoc = scu("VIEWER").associate(
            "127.0.0.1", port, contexts=[build_context(model)], ae_title="RELAY"
        )
        assert assoc.is_established
        got, final = 0, -1
        for status, _match in assoc.send_c_find(
            query("STUDY", StudyInstanceUID=""), model, msg_id=7
        ):
            if status.Status in (0xFF00, 0xFF01):
                got += 1
                if got == 1:
                    assoc.send_c_cancel(7, query_model=model)
            else:
                final = int(status.Status)
        assoc.release()
        return got, final

    stats = DicomCounters()
    n = DicomNode(no_stream, listen=("127.0.0.1", 0), timeout=20, cache=_OfflineIndex(matches),
                  stats=stats)  # fmt: skip
    await n.start()
    try:
        got, final = await asyncio.wait_for(asyncio.to_thread(find_then_cancel, n.address[1]), 60)
    finally:
        await n.stop()
    assert final == st.CANCEL
    assert got < matches
    assert await until_counted(stats) == {("find", "cancel"): 1}


async def test_stopping_the_node_answers_a_cached_get_it_cuts_short(
    tmp_cache: CacheServer,
) -> None:
    """A retrieve served from the cache has no relay session for stop() to end: it looks
    at the node's stopping itself, and answers with the failure every operation cut
    short gets, the instances not sent counted and listed as failed."""
    n = DicomNode(no_stream, listen=("127.0.0.1", 0), timeout=20, cache=tmp_cache,
                  stats=DicomCounters())  # fmt: skip
    await n.start()
    sent = threading.Event()

    def slow_viewer() -> None:
        sent.set()
        time.sleep(0.05)

    try:
        task = asyncio.create_task(
            asyncio.to_thread(
                viewer.get,
                n.address[1],
                query("STUDY", StudyInstanceUID=STUDY_UID),
                classes=[samples.CT_IMAGE_STORAGE],
                before_store=slow_viewer,
            )
        )
        await asyncio.to_thread(sent.wait, 20)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await n.stop()
        assert loop.time() - started < 1.0 + 0.5
        result = await asyncio.wait_for(task, 30)
    finally:
        await n.stop()
    final = result.final
    assert "Status" in final, "the viewer got no final response"
    assert final.Status == st.LINK_LOST and final.ErrorComment == STOPPING_REASON
    completed = int(final.NumberOfCompletedSuboperations)
    assert completed == len(result.received) < N
    assert completed + int(final.NumberOfFailedSuboperations) == N


class _Unreadable:
    """A cached instance whose file can no longer be read (damaged while serving)."""

    def __init__(self, x: samples.EncodedInstance, readable: bool) -> None:
        self.sop_class, self.sop_instance = x.sop_class, x.sop_instance
        self.transfer_syntax = x.transfer_syntax
        self._data = x.data if readable else None

    def read(self) -> bytes:
        if self._data is None:
            raise OSError("damaged")
        return self._data


class _DamagedCache:
    """A cache whose plan holds instances of which the first `readable` can be read."""

    def __init__(self, readable: int) -> None:
        self.items = [_Unreadable(x, n < readable) for n, x in enumerate(STUDY[:3])]

    def offline(self) -> bool:
        return False

    def plan(self, identifier: Dataset) -> list[_Unreadable]:
        return self.items

    def find(self, identifier: Dataset) -> list[Dataset]:
        return []


@pytest.mark.parametrize(("readable", "status"), [(0, st.SUBOPS_FAILED), (1, st.WARNING_SUBOPS)])
async def test_a_cached_get_whose_files_fail_is_a_failure_when_nothing_completed(
    readable: int, status: int
) -> None:
    """Warning when some sub-operations completed, Failure (0xA702) when none did
    (PS3.4 C.4.3.3.1)."""
    n = DicomNode(no_stream, listen=("127.0.0.1", 0), timeout=20, cache=_DamagedCache(readable))
    await n.start()
    try:
        result = await asyncio.to_thread(
            viewer.get,
            n.address[1],
            query("STUDY", StudyInstanceUID=STUDY_UID),
            classes=[samples.CT_IMAGE_STORAGE],
        )
    finally:
        await n.stop()
    assert len(result.received) == readable
    assert result.final.Status == status
    final = result.final
    completed, failed = final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations
    assert (completed, failed) == (readable, 3 - readable)
