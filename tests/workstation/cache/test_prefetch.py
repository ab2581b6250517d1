"""Prefetch decisions: the patient's priors (same modality or any), the bounded queue."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset

from relay.workstation.cache.fetch import StudyFetcher
from relay.workstation.cache.prefetch import Prefetcher
from relay.workstation.cache.sealing import Sealer
from relay.workstation.cache.settings import PrefetchConfig
from relay.workstation.cache.store import CacheStore

HISTORY = [  # (uid, date, modalities) of one patient, as the PACS answers
    ("9.1", "20240301", "CT"), ("9.2", "20240201", "CT"), ("9.3", "20240115", "MR"),
    ("9.4", "20231201", "CT\\SR"), ("9.5", "20230101", "CT"), ("9.6", "20240401", "CT"),
]  # fmt: skip


class History:
    """Answers the prior query the way a PACS would (study level, one patient)."""

    async def find(self, level: str, keys: Mapping[str, str]) -> list[Dataset]:
        out = []
        for uid, day, mods in HISTORY:
            ds = Dataset()
            ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = uid, day, "120000"
            ds.ModalitiesInStudy = mods.split("\\")
            out.append(ds)
        return out


def prefetcher(tmp_path: Path, **config: Any) -> Prefetcher:
    store = CacheStore(tmp_path, Sealer(Sealer.new_key()), max_size=1 << 20, max_age=60)
    store.open(fresh_key=True)
    store.begin("9.1", {"PatientID": "P1", "StudyDate": "20240301", "StudyTime": "120000",
                        "ModalitiesInStudy": "CT"}, 1, "test")  # fmt: skip
    event = asyncio.Event()
    return Prefetcher(cast(StudyFetcher, History()), store, PrefetchConfig(**config),
                      lambda: event)  # fmt: skip


def test_priors_are_the_most_recent_earlier_studies_of_the_same_modality(tmp_path: Path) -> None:
    p = prefetcher(tmp_path, priors=2)
    assert asyncio.run(p._priors("9.1")) == ["9.2", "9.4"]


def test_priors_of_any_modality(tmp_path: Path) -> None:
    p = prefetcher(tmp_path, priors=3, priors_modality="any")
    assert asyncio.run(p._priors("9.1")) == ["9.2", "9.3", "9.4"]


def test_the_queue_is_bounded_and_counts_refusals(tmp_path: Path) -> None:
    async def run() -> Prefetcher:
        p = prefetcher(tmp_path, queue=2)
        assert p.add("1.1", "test") and p.add("1.2", "test") and p.add("1.1", "test")
        assert not p.add("1.3", "test")
        return p

    p = asyncio.run(run())
    assert p.counters.queued == 2 and p.counters.refused == 1


def test_a_study_taken_while_the_link_is_down_is_not_queued_again(tmp_path: Path) -> None:
    """The worker holds a job until the link is up: a rule or `relay prefetch` naming the
    same study meanwhile must not queue it a second time."""

    async def run() -> Prefetcher:
        p = prefetcher(tmp_path)
        p.start()
        try:
            assert p.add("1.1", "test")
            for _ in range(100):  # the worker takes it, then waits for the link
                if not p.pending:
                    break
                await asyncio.sleep(0.01)
            assert p.add("1.1", "test")
            assert p.queue.qsize() == 0
        finally:
            await p.stop()
        return p

    p = asyncio.run(run())
    assert p.counters.queued == 1
