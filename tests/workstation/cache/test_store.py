"""The sealed store: no plaintext, tamper detection, key loss, size and age bounds."""

from __future__ import annotations

import json
import logging
import sys
import threading
from pathlib import Path

import pytest

from relay.ops import replacing
from relay.workstation.cache.sealing import Sealer, SealError
from relay.workstation.cache.store import CachedInstance, CacheFull, CacheStore
from tests.ops.test_replacing import flaky_replace

UID = "1.2.826.0.1.3680043.10.1341.4242"
SECRET = b"DOE^CANARY RELAY0042 " * 50


def store(tmp_path: Path, *, max_size: int = 1 << 20, max_age: float = 3600.0,
          key: bytes | None = None, persist: bool = False) -> CacheStore:  # fmt: skip
    s = CacheStore(tmp_path, Sealer(key or Sealer.new_key()), max_size=max_size,
                   max_age=max_age, persist_index=persist)  # fmt: skip
    s.open(fresh_key=key is None)
    return s


def inst(sop: str) -> CachedInstance:
    return CachedInstance("1.2.840.10008.5.1.4.1.1.2", sop, f"{UID}.9", "1.2.840.10008.1.2.1", 0)


def fill(s: CacheStore, study: str, count: int, size: int = 1000) -> None:
    s.begin(study, {"PatientName": "DOE^CANARY"}, count, "test")
    for n in range(count):
        s.put(study, inst(f"{study}.{n}"), SECRET[:size])
    s.finish(study, complete=True)


def test_files_hold_no_plaintext_and_names_reveal_nothing(tmp_path: Path) -> None:
    s = store(tmp_path, persist=True)
    fill(s, UID, 3)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 4  # three instances and the sealed index
    for path in files:
        assert b"CANARY" not in path.read_bytes() and UID.encode() not in path.read_bytes()
        assert UID not in path.name
    study = s.study(UID)
    assert study is not None and study.complete
    assert s.read(study.instances[f"{UID}.0"]) == SECRET[:1000]


def test_a_flipped_bit_or_a_swapped_file_does_not_authenticate(tmp_path: Path) -> None:
    sealer = Sealer(Sealer.new_key())
    a, b = sealer.seal("1.2.3", b"first"), sealer.seal("1.2.4", b"second")
    assert a[16:32] != sealer.seal("1.2.3", b"first")[16:32]  # a fresh salt each time
    bad = bytearray(a)
    bad[-3] ^= 1
    with pytest.raises(SealError):
        sealer.open("1.2.3", bytes(bad))
    with pytest.raises(SealError):
        sealer.open("1.2.3", b)  # another instance's file under this name
    with pytest.raises(SealError):
        Sealer(Sealer.new_key()).open("1.2.3", a)  # a lost key


def test_a_new_key_wipes_what_the_last_run_left(tmp_path: Path) -> None:
    fill(store(tmp_path), UID, 3)
    assert len(list((tmp_path / "objects").iterdir())) == 3
    again = store(tmp_path)
    assert again.studies == {} and list((tmp_path / "objects").iterdir()) == []


def test_a_kept_key_reloads_the_sealed_index(tmp_path: Path) -> None:
    key = Sealer.new_key()
    fill(store(tmp_path, key=key, persist=True), UID, 2)
    again = store(tmp_path, key=key, persist=True)
    study = again.study(UID)
    assert study is not None and study.complete and len(study.instances) == 2
    (tmp_path / "index.bin").write_bytes(b"RCv1" + b"\0" * 60)
    caplog_free = store(tmp_path, key=key, persist=True)
    assert caplog_free.studies == {} and list((tmp_path / "objects").iterdir()) == []


def test_size_cap_evicts_least_recently_read_first(tmp_path: Path) -> None:
    s = store(tmp_path, max_size=5000)
    fill(s, "1.1", 2)
    fill(s, "1.2", 2)
    s.touch("1.1")  # read most recently: 1.2 goes first
    fill(s, "1.3", 2)
    assert set(s.studies) == {"1.1", "1.3"}
    assert s.total <= 5000
    assert sum(p.stat().st_size for p in (tmp_path / "objects").iterdir()) == s.total


def test_a_study_larger_than_the_cap_is_refused(tmp_path: Path) -> None:
    s = store(tmp_path, max_size=2500)
    with pytest.raises(CacheFull):
        fill(s, "1.1", 3)
    assert s.total <= 2500


def test_expiry_purges(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = store(tmp_path, max_age=10.0)
    fill(s, UID, 2)
    study = s.study(UID)
    assert study is not None
    assert s.purge_expired(now=study.created + 5) == 0
    with caplog.at_level(logging.INFO):
        assert s.purge_expired(now=study.created + 11) == 1
    assert s.studies == {} and list((tmp_path / "objects").iterdir()) == []
    assert "expired" in caplog.text and "CANARY" not in caplog.text


def test_a_damaged_instance_makes_the_study_incomplete(tmp_path: Path) -> None:
    s = store(tmp_path)
    fill(s, UID, 2)
    s.drop_instance(UID, f"{UID}.0", "damaged")
    study = s.study(UID)
    assert study is not None and not study.complete and len(study.instances) == 1
    assert len(list((tmp_path / "objects").iterdir())) == 1


def test_states_count_studies_without_copying_the_index(tmp_path: Path) -> None:
    s = store(tmp_path)
    fill(s, "1.1", 1)
    s.begin("1.2", {}, 3, "test")
    assert s.states() == {"complete": 1, "filling": 1, "incomplete": 0}
    s.finish("1.2", complete=True)  # nothing arrived: not complete
    assert s.states() == {"complete": 1, "filling": 0, "incomplete": 1}


def test_a_scanner_holding_a_fresh_file_a_moment_loses_no_instance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows: an antivirus or the indexer makes the rename fail twice, then it works."""
    s = store(tmp_path)
    monkeypatch.setattr(sys, "platform", "win32")
    calls = flaky_replace(monkeypatch, failures=2)
    fill(s, UID, 1)
    study = s.study(UID)
    assert study is not None and s.read(study.instances[f"{UID}.0"]) == SECRET[:1000]
    assert len(calls) == 3


def test_two_writers_at_once_stay_within_the_size_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer's room is taken when it is checked: a second writer checking while the
    first is still writing its file sees it, and evicts (or is refused) instead of both
    landing past `max_size` (a prefetch and the browser's write-through, say)."""
    s = store(tmp_path, max_size=2500)
    fill(s, "1.1", 1)  # 1,048 bytes sealed: room for one more, not two
    s.begin("1.2", {}, None, "test")
    s.begin("1.3", {}, None, "test")
    real = replacing.replace
    first_writing, second_done = threading.Event(), threading.Event()

    def slow_first(src: Path, dst: Path) -> None:
        if not first_writing.is_set():
            first_writing.set()
            assert second_done.wait(5)
        real(src, dst)

    monkeypatch.setattr(replacing, "replace", slow_first)
    first = threading.Thread(target=s.put, args=("1.2", inst("1.2.0"), SECRET[:1000]))
    first.start()
    assert first_writing.wait(5)
    s.put("1.3", inst("1.3.0"), SECRET[:1000])
    second_done.set()
    first.join(5)
    on_disk = sum(p.stat().st_size for p in (tmp_path / "objects").iterdir())
    assert on_disk == s.total <= 2500
    assert "1.1" not in s.studies  # evicted for the second writer


def test_a_scanner_holding_the_index_a_moment_loses_no_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows: the sealed index is put in place as an instance is, riding out a scanner
    that holds the old one a moment (else the save is lost and a restart forgets it)."""
    key = Sealer.new_key()
    s = store(tmp_path, key=key, persist=True)
    s.begin(UID, {}, 1, "test")
    s.put(UID, inst(f"{UID}.0"), SECRET[:1000])
    monkeypatch.setattr(sys, "platform", "win32")
    calls = flaky_replace(monkeypatch, failures=2)
    s.finish(UID, complete=True)  # saves the index
    assert len(calls) == 3
    monkeypatch.undo()
    again = store(tmp_path, key=key, persist=True)
    study = again.study(UID)
    assert study is not None and study.complete


def test_a_reloaded_index_keeps_only_the_files_that_are_whole(tmp_path: Path) -> None:
    """The index is saved at a study's end, not at each write or size eviction: after a
    crash it can name a file gone since (evicted) or cut short (a power loss). Those
    entries go at start, their studies incomplete: never complete with a file missing."""
    key = Sealer.new_key()
    s = store(tmp_path, key=key, persist=True)
    fill(s, "1.1", 2)
    fill(s, "1.2", 2)
    one = s.total // 4
    s.path_of("1.1", "1.1.1").unlink()
    cut = s.path_of("1.2", "1.2.0")
    cut.write_bytes(cut.read_bytes()[:100])
    again = store(tmp_path, key=key, persist=True)
    for uid, kept in (("1.1", "1.1.0"), ("1.2", "1.2.1")):
        study = again.study(uid)
        assert study is not None and not study.complete
        assert list(study.instances) == [kept]
    on_disk = sum(p.stat().st_size for p in (tmp_path / "objects").iterdir())
    assert again.total == on_disk == 2 * one


def test_one_sop_instance_uid_in_two_studies_never_opens_as_the_other(tmp_path: Path) -> None:
    """Files are named and sealed under the study and the SOP Instance UID together: a
    PACS that gives one SOP Instance UID to two patients' studies gets two files, and a
    file of one study moved to another's name does not authenticate."""
    s = store(tmp_path)
    s.begin("1.1", {}, 1, "test")
    s.put("1.1", inst("9.9"), b"the first patient's image")
    s.begin("1.2", {}, 1, "test")
    s.put("1.2", inst("9.9"), b"the second patient's image")
    first, second = s.study("1.1"), s.study("1.2")
    assert first is not None and second is not None
    assert s.read(first.instances["9.9"]) == b"the first patient's image"
    assert s.read(second.instances["9.9"]) == b"the second patient's image"
    s.path_of("1.2", "9.9").write_bytes(s.path_of("1.1", "9.9").read_bytes())
    with pytest.raises(SealError):
        s.read(second.instances["9.9"])
    s.evict(["1.2"])
    assert s.read(first.instances["9.9"]) == b"the first patient's image"


def test_an_older_versions_index_starts_an_empty_cache(tmp_path: Path) -> None:
    """Its files are named otherwise (by the SOP Instance UID alone): nothing of it is
    loaded, and its files go."""
    key = Sealer.new_key()
    s = store(tmp_path, key=key, persist=True)
    fill(s, UID, 1)
    index = json.loads(s.sealer.open("index", (tmp_path / "index.bin").read_bytes()))
    del index["format"]
    (tmp_path / "index.bin").write_bytes(s.sealer.seal("index", json.dumps(index).encode()))
    again = store(tmp_path, key=key, persist=True)
    assert again.studies == {} and list((tmp_path / "objects").iterdir()) == []


def test_an_index_under_another_key_is_one_line_naming_cache_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A keyring entry replaced (another key): the user is told which setting and where."""
    fill(store(tmp_path, key=Sealer.new_key(), persist=True), UID, 1)
    with caplog.at_level(logging.INFO):
        again = store(tmp_path, key=Sealer.new_key(), persist=True)
    assert again.studies == {}
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "cache.key" in errors[0] and str(tmp_path) in errors[0]
