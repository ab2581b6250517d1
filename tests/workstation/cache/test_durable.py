"""A committed cache entry survives a power cut; a torn one is dropped, never served.

The store wrote each instance to a temp file and renamed it, and the index the same way,
with no fsync anywhere: a PC switched off at the end of a shift could keep a file
renamed into place with none of its bytes, or an index naming files whose renames were
never written. With a persisted index (keyring mode) the bytes are now synced before
each rename, and the objects directory before an index names its files.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from relay.ops import replacing
from relay.workstation.cache import durable
from relay.workstation.cache import store as store_module
from relay.workstation.cache.sealing import Sealer
from relay.workstation.cache.serve import CacheServer
from tests.workstation.cache.test_store import UID, fill, inst, store

Event = tuple[str, int]  # ("fsync" | "replace", inode)
WAIT = 10.0


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[Event]:
    """Every sync (durable.sync_fd: fsync, or F_FULLFSYNC on macOS) and every rename into
    place, in order, by the inode they touch."""
    seen: list[Event] = []
    real_sync, real_replace = durable.sync_fd, replacing.replace

    def sync_fd(fd: int) -> None:
        seen.append(("fsync", os.fstat(fd).st_ino))
        real_sync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        ino = os.stat(src).st_ino
        real_replace(src, dst)
        seen.append(("replace", ino))

    monkeypatch.setattr(durable, "sync_fd", sync_fd)
    monkeypatch.setattr(replacing, "replace", replace)
    return seen


class FakeFcntl:
    """An fcntl module as `choose_sync` sees it: with or without F_FULLFSYNC, recording
    its calls, refusing them when told (a file system without F_FULLFSYNC)."""

    def __init__(self, *, full: bool, refuse: bool = False) -> None:
        if full:
            self.F_FULLFSYNC = 51  # macOS's value
        self.refuse = refuse
        self.calls: list[tuple[int, int]] = []

    def fcntl(self, fd: int, op: int) -> int:
        self.calls.append((fd, op))
        if self.refuse:
            raise OSError(45, "Operation not supported")
        return 0


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The fds os.fsync was called with (and really synced)."""
    seen: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        seen.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


@pytest.mark.parametrize(
    ("platform", "fcntl", "full"),
    [
        ("darwin", FakeFcntl(full=True), True),  # fsync leaves the drive's cache: F_FULLFSYNC
        ("linux", FakeFcntl(full=False), False),  # no such call: fsync flushes the drive
        ("win32", None, False),  # no fcntl module: fsync (FlushFileBuffers)
        ("win32", FakeFcntl(full=True), False),  # never fcntl on Windows
    ],
)
def test_each_platform_gets_its_sync_call(
    tmp_path: Path, fsyncs: list[int], platform: str, fcntl: FakeFcntl | None, full: bool
) -> None:
    sync = durable.choose_sync(platform, fcntl)
    with (tmp_path / "f").open("wb") as f:
        f.write(b"data")
        f.flush()
        sync(f.fileno())
        if full:
            assert fcntl is not None and fcntl.calls == [(f.fileno(), 51)] and fsyncs == []
        else:
            assert fsyncs == [f.fileno()] and (fcntl is None or fcntl.calls == [])


def test_a_file_system_that_refuses_f_fullfsync_gets_fsync(
    tmp_path: Path, fsyncs: list[int]
) -> None:
    fcntl = FakeFcntl(full=True, refuse=True)
    with (tmp_path / "f").open("wb") as f:
        durable.choose_sync("darwin", fcntl)(f.fileno())
        assert fcntl.calls == [(f.fileno(), 51)] and fsyncs == [f.fileno()]


def test_this_platform_syncs_with_its_own_call() -> None:
    full = sys.platform == "darwin"  # the only platform whose fcntl has F_FULLFSYNC
    assert durable.sync_fd.__name__ == ("full_fsync" if full else "_fsync")


def test_every_write_goes_through_the_platforms_sync(tmp_path: Path, events: list[Event]) -> None:
    durable.write_file(tmp_path / "a", b"a", sync=True)
    durable.sync_file(tmp_path / "a")
    assert events == [("fsync", _ino(tmp_path / "a"))] * 2


def _ino(path: Path) -> int:
    return path.stat().st_ino


@pytest.mark.skipif(sys.platform == "win32", reason="inodes and directory fsync are POSIX")
def test_a_committed_entry_is_on_disk_before_the_index_names_it(
    tmp_path: Path, events: list[Event]
) -> None:
    """The files written since the last index, in one batch at the commit, then their
    directory, then the index's bytes, its rename, and that rename made durable."""
    s = store(tmp_path, key=Sealer.new_key(), persist=True)
    events.clear()  # the start's own writes (none are synced: nothing to commit yet)
    fill(s, UID, 3)
    files = [s.path_of(UID, f"{UID}.{n}") for n in range(3)]
    index, objects = tmp_path / "index.bin", tmp_path / "objects"
    order = events.index
    synced_objects = order(("fsync", _ino(objects)))
    for path in files:
        assert order(("replace", _ino(path))) < order(("fsync", _ino(path))) < synced_objects
    assert synced_objects < order(("fsync", _ino(index))) < order(("replace", _ino(index)))
    assert order(("replace", _ino(index))) < order(("fsync", _ino(tmp_path)))
    assert len([e for e in events if e[0] == "fsync"]) == 3 + 3  # nothing synced twice


@pytest.mark.skipif(sys.platform == "win32", reason="inodes and directory fsync are POSIX")
def test_past_the_bound_of_waiting_files_a_file_is_synced_as_it_is_written(
    tmp_path: Path, events: list[Event], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "MAX_UNSYNCED", 1)
    s = store(tmp_path, key=Sealer.new_key(), persist=True)
    s.begin(UID, {}, 3, "test")
    for n in range(3):
        s.put(UID, inst(f"{UID}.{n}"), b"image")
    first, *rest = (s.path_of(UID, f"{UID}.{n}") for n in range(3))
    assert ("fsync", _ino(first)) not in events  # waits for the commit
    for path in rest:  # one waits already: synced before their rename
        assert events.index(("fsync", _ino(path))) < events.index(("replace", _ino(path)))
    assert len(s._unsynced) == 1


def test_a_file_that_cannot_be_synced_is_dropped_and_later_commits_still_land(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One file the disk refuses to sync (EIO): that instance is dropped (one error line,
    counted as abandoned) and the index is saved without it; the commits after it land
    too. Kept for the next commit instead, it failed every later one, and everything
    cached after it was gone at the next start."""
    key = Sealer.new_key()
    dropped: list[tuple[str, int]] = []
    s = store(tmp_path, key=key, persist=True)
    s.on_drop = lambda reason, n: dropped.append((reason, n))
    fill(s, "1.1", 1)
    bad = s.path_of("1.2", "1.2.0")
    synced = durable.sync_file

    def refuses_one(path: Path) -> None:
        if path == bad:
            raise OSError(5, "Input/output error")
        synced(path)

    monkeypatch.setattr(store_module, "sync_file", refuses_one)
    with caplog.at_level(logging.ERROR):
        fill(s, "1.2", 2)
        fill(s, "1.3", 1)
    assert any("could not be synced" in r.getMessage() for r in caplog.records)
    assert not any("cannot write the index" in r.getMessage() for r in caplog.records)
    assert dropped == [("abandoned", 1)]
    assert not bad.exists() and not s._unsynced
    again = store(tmp_path, key=key, persist=True)
    assert sorted(again.studies) == ["1.1", "1.2", "1.3"]
    assert list(again.studies["1.2"].instances) == ["1.2.1"]
    assert not again.studies["1.2"].complete and again.studies["1.3"].complete


def test_with_the_key_in_memory_nothing_is_synced(tmp_path: Path, events: list[Event]) -> None:
    """Nothing of such a cache outlives the process (the next start wipes it): no cost."""
    s = store(tmp_path)
    fill(s, UID, 3)
    assert [e for e in events if e[0] == "fsync"] == []
    assert len([e for e in events if e[0] == "replace"]) == 3


def test_a_directory_is_not_opened_on_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> int:
        raise AssertionError("a directory cannot be opened for syncing on Windows")

    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(os, "open", refuse)
    durable.sync_directory(Path("."))


@pytest.mark.parametrize(
    "tear",
    [
        pytest.param(lambda p: p.write_bytes(b""), id="zero-length"),
        pytest.param(lambda p: p.write_bytes(p.read_bytes()[:-1]), id="short"),
    ],
)
def test_a_torn_file_is_dropped_at_start(tmp_path: Path, tear: Callable[[Path], None]) -> None:
    key = Sealer.new_key()
    fill(store(tmp_path, key=key, persist=True), UID, 3)
    victim = store(tmp_path, key=key, persist=True).path_of(UID, f"{UID}.1")
    tear(victim)
    again = store(tmp_path, key=key, persist=True)
    study = again.study(UID)
    assert study is not None and not study.complete  # not served as complete
    assert sorted(study.instances) == [f"{UID}.0", f"{UID}.2"]
    assert not victim.exists()  # no study names it now: removed


def test_a_same_size_torn_file_fails_authentication_and_is_not_served(tmp_path: Path) -> None:
    """A file of the right size with other bytes (zeros where the data never came) passes
    the size check at start; sealed, it fails authentication when the node plans to serve
    the study: dropped, the study fetched again, the viewer served from the network."""
    key = Sealer.new_key()
    fill(store(tmp_path, key=key, persist=True), UID, 3)
    again = store(tmp_path, key=key, persist=True)
    victim = again.path_of(UID, f"{UID}.1")
    victim.write_bytes(bytes(victim.stat().st_size))
    refetched: list[str] = []
    server = CacheServer(again, lambda: False, refetched.append)
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = UID
    assert server.plan(ident) is None  # not served from the cache
    study = again.study(UID)
    assert study is not None and not study.complete and f"{UID}.1" not in study.instances
    assert refetched == [UID] and not victim.exists()


def test_two_commits_at_once_never_put_an_index_before_its_files_are_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One commit's sync takes the files waiting, another's index names one of them too:
    that index must wait for the sync (it was put in place while the sync still ran)."""
    s = store(tmp_path, key=Sealer.new_key(), persist=True)
    s.begin(UID, {}, 2, "test")
    s.put(UID, inst(f"{UID}.0"), b"image")
    slow = s.path_of(UID, f"{UID}.0")
    seen: list[str] = []
    syncing, go_on = threading.Event(), threading.Event()
    real_sync, real_replace = durable.sync_file, replacing.replace

    def sync_file(path: Path) -> None:
        if path == slow:
            syncing.set()
            assert go_on.wait(WAIT)
        real_sync(path)
        seen.append(f"synced {path.name}")

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        real_replace(src, dst)
        seen.append(f"replaced {Path(dst).name}")

    monkeypatch.setattr(store_module, "sync_file", sync_file)
    monkeypatch.setattr(replacing, "replace", replace)
    first = threading.Thread(target=s.finish, args=(UID,), kwargs={"complete": False})
    first.start()
    assert syncing.wait(WAIT)
    second = threading.Thread(target=s.finish, args=(UID,), kwargs={"complete": False})
    second.start()
    second.join(1.0)  # it waits for the first (before: it went ahead, its index in place)
    go_on.set()
    first.join(WAIT)
    second.join(WAIT)
    assert seen.index(f"synced {slow.name}") < seen.index("replaced index.bin")
