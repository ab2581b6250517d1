"""The node serving C-GET and C-MOVE from the workstation's cache (a real CacheServer on
disk): the viewer's C-CANCEL is honoured as on the network path."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset

from relay.dicom import status as st
from relay.dicom.contexts import MODELS
from relay.dicom.node import DicomNode
from relay.dicom.stats import DicomCounters
from relay.net.bytestream import ByteStream
from relay.workstation.cache.sealing import Sealer
from relay.workstation.cache.serve import CacheServer
from relay.workstation.cache.store import CachedInstance, CacheStore
from relay_dev import samples

from . import viewer
from .helpers import capturing_scp, query

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
