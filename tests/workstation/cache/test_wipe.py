"""Removing files that another program holds open (Windows): the wipe, eviction, restarts.

On Windows, deleting a file that another handle has open (a prefetch writing its `.tmp`, a
read while serving, a virus scanner) raises PermissionError. Linux allows it, so these
tests simulate it: `busy` monkeypatches `Path.unlink` (what the store module removes files
with) to raise PermissionError for chosen paths, for a number of tries or for good.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from relay.dicom.session import OpenStream
from relay.workstation.cache import store as store_module
from relay.workstation.cache.sealing import Sealer, SealError
from relay.workstation.cache.service import WorkstationCache
from relay.workstation.cache.settings import CacheConfig, PrefetchConfig
from relay.workstation.cache.store import INDEX_FILE, CachedInstance, CacheStore, instance_id
from relay.workstation.service import Workstation
from tests.workstation.cache.conftest import MemoryKeyring

UID = "1.2.826.0.1.3680043.10.1341.4242"
DATA = b"DOE^CANARY RELAY0042 " * 50
FOREVER = 1_000_000


class Busy:
    """Paths that refuse removal (PermissionError, as Windows' "in use") for some tries."""

    def __init__(self) -> None:
        self.tries: dict[Path, int] = {}
        self.attempts: list[Path] = []

    def hold(self, path: Path, tries: int = FOREVER) -> None:
        self.tries[path] = tries

    def release(self, path: Path) -> None:
        self.tries.pop(path, None)


@pytest.fixture
def busy(monkeypatch: pytest.MonkeyPatch) -> Busy:
    state = Busy()
    real = Path.unlink

    def unlink(path: Path, missing_ok: bool = False) -> None:
        state.attempts.append(path)
        if state.tries.get(path, 0) > 0:
            state.tries[path] -= 1
            raise PermissionError(13, "The process cannot access the file (WinError 32)")
        real(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    return state


def new_store(tmp_path: Path, *, key: bytes | None = None, max_size: int = 1 << 20,
              persist: bool = True) -> CacheStore:  # fmt: skip
    s = CacheStore(tmp_path, Sealer(key or Sealer.new_key()), max_size=max_size,
                   max_age=3600.0, persist_index=persist)  # fmt: skip
    s.open(fresh_key=key is None)
    return s


def fill(s: CacheStore, study: str, count: int) -> None:
    s.begin(study, {"PatientName": "DOE^CANARY"}, count, "test")
    for n in range(count):
        sop = f"{study}.{n}"
        s.put(study, CachedInstance("1.2.840.10008.5.1.4.1.1.2", sop, f"{study}.9",
                                    "1.2.840.10008.1.2.1", 0), DATA)  # fmt: skip
    s.finish(study, complete=True)


def file_of(s: CacheStore, sop: str) -> Path:
    """The file of `sop`, an instance of the study its UID extends (as `fill` names them)."""
    return s.path_of(sop.rsplit(".", 1)[0], sop)


def files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def on_disk(s: CacheStore) -> int:
    return sum(p.stat().st_size for p in s.objects.iterdir())


def test_a_busy_file_does_not_stop_the_wipe(
    tmp_path: Path, busy: Busy, caplog: pytest.LogCaptureFixture
) -> None:
    s = new_store(tmp_path)
    fill(s, UID, 3)
    held = file_of(s, f"{UID}.1")
    busy.hold(held)
    busy.attempts.clear()
    with caplog.at_level(logging.WARNING):
        assert s.wipe("revoked") == 1  # no PermissionError
    assert busy.attempts[0] == tmp_path / INDEX_FILE  # the index goes first
    assert files(tmp_path) == {held}  # the index and every other file are gone
    assert busy.attempts.count(held) == 3  # tried again, a bounded number of times
    assert s.studies == {}
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("1 file" in m and str(tmp_path) in m for m in warning), warning
    assert held.name not in caplog.text and UID not in caplog.text
    assert "CANARY" not in caplog.text


def test_a_file_freed_on_retry_is_removed(
    tmp_path: Path, busy: Busy, caplog: pytest.LogCaptureFixture
) -> None:
    s = new_store(tmp_path)
    fill(s, UID, 3)
    held = file_of(s, f"{UID}.2")
    busy.hold(held, tries=1)  # the reader closes it before the second try
    with caplog.at_level(logging.WARNING):
        s.wipe("wiped")
    assert files(tmp_path) == set()
    assert "could not be removed" not in caplog.text


def test_revocation_forgets_the_key_whatever_the_wipe_meets(
    tmp_path: Path, busy: Busy, memory_keyring: MemoryKeyring
) -> None:
    async def no_stream(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("no network in this test")

    cache = WorkstationCache(
        CacheConfig(dir=tmp_path, key="keyring"), PrefetchConfig(), cast(OpenStream, no_stream),
        asyncio.Event, account="ws1 /cfg",
    )  # fmt: skip
    assert memory_keyring.items
    cache.store.open(fresh_key=True)
    fill(cache.store, UID, 2)
    held = file_of(cache.store, f"{UID}.0")
    busy.hold(held)
    cache.wipe("revoked")
    assert memory_keyring.items == {}  # the next start cannot read what is left
    assert files(tmp_path) == {held} and cache.store.studies == {}
    with pytest.raises(SealError):  # nor can this process
        cache.store.sealer.open(instance_id(UID, f"{UID}.0"), held.read_bytes())

    # Even a wipe that fails outright (a bug) leaves the key forgotten.
    memory_keyring.set_password("dmz-relay-cache", "ws1 /cfg", "a key")

    def broken(reason: str) -> int:
        raise RuntimeError("a bug")

    cache.store.wipe = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        cache.wipe("revoked")
    assert memory_keyring.items == {}


async def test_the_revoked_event_is_set_whatever_the_wipe_meets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken() -> int:
        raise RuntimeError("a bug")

    recorded: list[bool] = []
    owner = SimpleNamespace(
        cache=SimpleNamespace(wipe_revoked=broken),
        revoked=asyncio.Event(),
        _revoking=None,
        _record_revoked=lambda: recorded.append(True),
    )
    owner._wipe_then_stop = lambda: Workstation._wipe_then_stop(cast(Workstation, owner))
    Workstation._revoked(cast(Workstation, owner), "revoked by the hospital")
    await asyncio.wait_for(owner.revoked.wait(), 10.0)
    assert "the cache wipe on revocation failed" in caplog.text
    assert recorded == [True]  # the revocation is recorded whatever the wipe met


async def test_the_revocation_wipe_runs_off_the_event_loop(
    tmp_path: Path, busy: Busy, memory_keyring: MemoryKeyring
) -> None:
    """A wipe that takes a while (a file in use, tried again) leaves the loop free, stops
    the prefetcher first, and still ends with the files gone and the key forgotten."""

    async def no_stream(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("no network in this test")

    cache = WorkstationCache(
        CacheConfig(dir=tmp_path, key="keyring"), PrefetchConfig(), cast(OpenStream, no_stream),
        asyncio.Event, account="ws1 /cfg",
    )  # fmt: skip
    cache.store.open(fresh_key=True)
    fill(cache.store, UID, 3)
    busy.hold(file_of(cache.store, f"{UID}.1"), tries=2)  # two pauses of REMOVE_PAUSE
    stopped: list[bool] = []
    real_stop = cache.prefetcher.stop

    async def stop_prefetcher() -> None:
        stopped.append(True)
        await real_stop()

    cache.prefetcher.stop = stop_prefetcher  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    ticks: list[float] = []

    async def tick() -> None:
        while True:
            ticks.append(loop.time())
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    started = loop.time()
    try:
        assert await cache.wipe_revoked() == 1
    finally:
        ticker.cancel()
    took = loop.time() - started
    assert took >= 2 * store_module.REMOVE_PAUSE
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert len(ticks) > 10 and max(gaps) < 0.1, f"the loop stalled {max(gaps):.3f}s"
    assert stopped == [True]
    assert files(tmp_path) == set() and cache.store.studies == {}
    assert memory_keyring.items == {}


def test_eviction_keeps_counting_a_file_it_could_not_remove(tmp_path: Path, busy: Busy) -> None:
    s = new_store(tmp_path, max_size=5000, persist=False)
    fill(s, "1.1", 2)
    held = file_of(s, "1.1.0")
    busy.hold(held)
    assert s.evict(["1.1"]) == 1
    assert held.exists() and s.total == held.stat().st_size == on_disk(s)
    damaged = file_of(s, "1.2.1")
    fill(s, "1.2", 2)
    busy.hold(damaged)
    s.drop_instance("1.2", "1.2.1", "damaged")
    assert s.total == on_disk(s)  # both files still there, both still counted
    fill(s, "1.3", 2)  # does not fit: evicts 1.2 and tries the files left again
    assert s.total == on_disk(s) <= 5000

    busy.release(held)
    busy.release(damaged)
    s.purge_expired()  # the periodic sweep tries them again
    assert not held.exists() and not damaged.exists()
    assert s.total == on_disk(s) and set(s.studies) == {"1.3"}


def test_a_file_left_then_written_again_is_kept(tmp_path: Path, busy: Busy) -> None:
    s = new_store(tmp_path, persist=False)
    fill(s, "1.1", 2)
    held = file_of(s, "1.1.0")
    busy.hold(held)
    s.evict(["1.1"])
    busy.release(held)
    fill(s, "1.1", 2)  # the same instance fetched again, into the same file
    s.purge_expired()
    study = s.study("1.1")
    assert study is not None and s.read(study.instances["1.1.0"]) == DATA
    assert s.total == on_disk(s)


def test_the_next_start_removes_a_file_an_eviction_left(tmp_path: Path, busy: Busy) -> None:
    key = Sealer.new_key()
    s = new_store(tmp_path, key=key)
    fill(s, "1.1", 2)
    fill(s, "1.2", 2)
    held = file_of(s, "1.1.0")
    busy.hold(held)
    s.evict(["1.1"])
    busy.release(held)  # the process ends, its handles close
    again = new_store(tmp_path, key=key)  # keyring mode: the index is read back
    assert set(again.studies) == {"1.2"} and not held.exists()
    assert again.total == on_disk(again)


def test_files_left_are_tracked_up_to_a_bound(
    tmp_path: Path, busy: Busy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "MAX_LEFTOVER", 2)
    s = new_store(tmp_path, persist=False)
    fill(s, "1.1", 4)
    for n in range(4):
        busy.hold(file_of(s, f"1.1.{n}"))
    s.evict(["1.1"])
    assert len(s._leftover) == 2  # the other two: removed by the next start
    assert s.total == 2 * file_of(s, "1.1.0").stat().st_size


def test_an_index_save_under_way_does_not_bring_back_a_wiped_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index is sealed and written outside the lock: a wipe that comes meanwhile
    (`relay cache wipe`, a revocation) must not find it back on disk afterwards."""
    key = Sealer.new_key()
    s = new_store(tmp_path, key=key)
    fill(s, UID, 2)
    real_seal = s.sealer.seal
    wiped: list[int] = []

    def seal_then_wipe(item_id: str, data: bytes) -> bytes:
        sealed = real_seal(item_id, data)
        if item_id == "index" and not wiped:
            wiped.append(s.wipe("wiped"))  # while the save is under way
        return sealed

    monkeypatch.setattr(s.sealer, "seal", seal_then_wipe)
    s.touch(UID)
    s.finish(UID, complete=True)  # saves the index
    assert wiped == [1]
    assert not (tmp_path / INDEX_FILE).exists()
    assert files(tmp_path) == set()  # nor a temporary file
    again = new_store(tmp_path, key=key)
    assert again.studies == {}


def test_an_older_index_save_does_not_replace_a_newer_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two threads' saves: the one that took its copy first and wrote last loses."""
    key = Sealer.new_key()
    s = new_store(tmp_path, key=key)
    fill(s, UID, 1)
    real_seal = s.sealer.seal
    nested: list[bool] = []

    def seal_after_a_newer_save(item_id: str, data: bytes) -> bytes:
        if item_id == "index" and not nested:
            nested.append(True)
            fill(s, UID + ".7", 1)  # a newer save, which lands first
        return real_seal(item_id, data)

    monkeypatch.setattr(s.sealer, "seal", seal_after_a_newer_save)
    s.finish(UID, complete=True)
    again = new_store(tmp_path, key=key)
    assert set(again.studies) == {UID, UID + ".7"}
