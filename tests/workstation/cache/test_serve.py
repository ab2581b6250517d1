"""What the node gets from the cache: complete studies only, every file verified first."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from relay.workstation.cache.sealing import Sealer, SealError
from relay.workstation.cache.serve import CacheServer
from relay.workstation.cache.store import CachedInstance, CacheStore

STUDY = "1.2.3"


def server(tmp_path: Path, *, buffer: int, count: int = 4) -> tuple[CacheServer, list[str]]:
    store = CacheStore(tmp_path, Sealer(Sealer.new_key()), max_size=1 << 20, max_age=60)
    store.open(fresh_key=True)
    store.begin(STUDY, {}, count, "test")
    for n in range(count):
        inst = CachedInstance("1.2.840.10008.5.1.4.1.1.2", f"{STUDY}.{n}",
                              f"{STUDY}.{n % 2}", "1.2.840.10008.1.2.1", 0)  # fmt: skip
        store.put(STUDY, inst, f"dataset {n}".encode())
    store.finish(STUDY, complete=True)
    refetched: list[str] = []
    return CacheServer(store, lambda: False, refetched.append, serve_buffer=buffer), refetched


def ident(level: str = "STUDY", **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    ds.StudyInstanceUID = STUDY
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def corrupt(srv: CacheServer, sop: str) -> None:
    path = srv.store.path_of(STUDY, sop)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def test_study_series_and_image_levels(tmp_path: Path) -> None:
    srv, _ = server(tmp_path, buffer=1 << 20)
    items = srv.plan(ident())
    assert items is not None and sorted(i.read() for i in items)[0] == b"dataset 0"
    series = srv.plan(ident("SERIES", SeriesInstanceUID=f"{STUDY}.1"))
    assert series is not None and {i.sop_instance for i in series} == {f"{STUDY}.1", f"{STUDY}.3"}
    image = srv.plan(ident("IMAGE", SeriesInstanceUID=f"{STUDY}.1", SOPInstanceUID=f"{STUDY}.3"))
    assert image is not None and [i.read() for i in image] == [b"dataset 3"]
    assert srv.plan(ident("IMAGE", SOPInstanceUID="9.9")) is None  # not cached: network


def test_a_tampered_file_sends_the_study_to_the_network(tmp_path: Path) -> None:
    srv, refetched = server(tmp_path, buffer=1 << 20)
    corrupt(srv, f"{STUDY}.2")
    assert srv.plan(ident()) is None
    assert refetched == [STUDY] and srv.counters.damaged == 1
    study = srv.store.study(STUDY)
    assert study is not None and not study.complete and f"{STUDY}.2" not in study.instances
    assert srv.plan(ident()) is None  # incomplete now: not served until refetched


def test_an_incomplete_study_is_not_served(tmp_path: Path) -> None:
    srv, _ = server(tmp_path, buffer=1 << 20)
    srv.store.begin(STUDY, {}, 5, "test")  # the PACS now counts one more
    srv.store.finish(STUDY, complete=True)
    assert srv.plan(ident()) is None


@pytest.mark.parametrize("buffer", [0, 1 << 20])
def test_serve_buffer_decides_whether_a_read_is_decrypted_again(
    tmp_path: Path, buffer: int
) -> None:
    srv, _ = server(tmp_path, buffer=buffer)
    items = srv.plan(ident())
    assert items is not None
    corrupt(srv, items[0].sop_instance)  # after verification, before sending
    if buffer:
        assert items[0].read()  # held: what was verified is what is sent
    else:
        with pytest.raises(SealError):
            items[0].read()  # read again: the node ends the operation with a failure


def partial(tmp_path: Path) -> CacheServer:
    """A study of 4 instances in two series, only series .0 (instances 0 and 2) written
    through; the study's expected count says it has 4."""
    store = CacheStore(tmp_path, Sealer(Sealer.new_key()), max_size=1 << 20, max_age=60)
    store.open(fresh_key=True)
    store.adopt(STUDY, {"PatientID": "P"}, 4, "browser")
    for n in (0, 2):
        inst = CachedInstance("1.2.840.10008.5.1.4.1.1.2", f"{STUDY}.{n}", f"{STUDY}.0",
                              "1.2.840.10008.1.2.1", 0)  # fmt: skip
        store.put(STUDY, inst, f"dataset {n}".encode())
    return CacheServer(store, lambda: False, lambda uid: None)


def test_a_series_complete_on_its_own_is_served_while_its_study_is_not(tmp_path: Path) -> None:
    srv = partial(tmp_path)
    series0 = ident("SERIES", SeriesInstanceUID=f"{STUDY}.0")
    assert srv.plan(series0) is None  # written, but not yet vouched for
    assert not srv.store.finish_series(STUDY, f"{STUDY}.0", 3)  # the PACS sent 3: one missing
    assert srv.plan(series0) is None
    assert srv.store.finish_series(STUDY, f"{STUDY}.0", 2)
    study = srv.store.study(STUDY)
    assert study is not None and not study.complete  # series .1 is not here
    items = srv.plan(series0)
    assert items is not None and sorted(i.read() for i in items) == [b"dataset 0", b"dataset 2"]
    image = srv.plan(ident("IMAGE", SeriesInstanceUID=f"{STUDY}.0", SOPInstanceUID=f"{STUDY}.2"))
    assert image is not None and [i.read() for i in image] == [b"dataset 2"]
    assert srv.plan(ident()) is None  # the study level: network
    assert srv.plan(ident("SERIES", SeriesInstanceUID=f"{STUDY}.1")) is None
    assert srv.plan(ident("SERIES", SeriesInstanceUID=f"{STUDY}.0\\{STUDY}.1")) is None
    assert srv.find(ident()) == []  # the offline C-FIND lists complete studies only


def test_the_study_becomes_complete_when_each_series_is(tmp_path: Path) -> None:
    srv = partial(tmp_path)
    assert srv.store.finish_series(STUDY, f"{STUDY}.0", 2)
    for n in (1, 3):
        inst = CachedInstance("1.2.840.10008.5.1.4.1.1.2", f"{STUDY}.{n}", f"{STUDY}.1",
                              "1.2.840.10008.1.2.1", 0)  # fmt: skip
        srv.store.put(STUDY, inst, f"dataset {n}".encode())
    study = srv.store.study(STUDY)
    assert study is not None and not study.complete
    assert srv.store.finish_series(STUDY, f"{STUDY}.1", 2)
    assert study.complete
    items = srv.plan(ident())
    assert items is not None and len(items) == 4
    assert [ds.StudyInstanceUID for ds in srv.find(ident(PatientID="P"))] == [STUDY]


def test_a_damaged_file_takes_its_series_out_of_the_cache(tmp_path: Path) -> None:
    srv = partial(tmp_path)
    assert srv.store.finish_series(STUDY, f"{STUDY}.0", 2)
    corrupt(srv, f"{STUDY}.2")
    series0 = ident("SERIES", SeriesInstanceUID=f"{STUDY}.0")
    assert srv.plan(series0) is None
    study = srv.store.study(STUDY)
    assert study is not None and study.series_done == {}
    assert srv.plan(series0) is None  # stays out until written again


def test_series_done_survives_a_restart_with_a_keyring_key(tmp_path: Path) -> None:
    key = Sealer.new_key()
    store = CacheStore(tmp_path, Sealer(key), max_size=1 << 20, max_age=60, persist_index=True)
    store.open(fresh_key=True)
    store.adopt(STUDY, {}, 2, "browser")
    inst = CachedInstance("1.2.840.10008.5.1.4.1.1.2", f"{STUDY}.0", f"{STUDY}.0",
                          "1.2.840.10008.1.2.1", 0)  # fmt: skip
    store.put(STUDY, inst, b"dataset 0")
    assert store.finish_series(STUDY, f"{STUDY}.0", 1)
    again = CacheStore(tmp_path, Sealer(key), max_size=1 << 20, max_age=60, persist_index=True)
    again.open(fresh_key=False)
    study = again.study(STUDY)
    assert study is not None and study.series_done == {f"{STUDY}.0": 1} and not study.complete


def test_index_reads_nothing_and_read_drops_a_damaged_file_as_plan_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DICOMweb server's path: the index without opening a file, then one file read and
    authenticated as asked; a damaged one is dropped (the study fetched again)."""
    srv, refetched = server(tmp_path, buffer=1 << 20)
    opened: list[str] = []
    read = srv.store.read

    def counting(inst: CachedInstance) -> bytes:
        opened.append(inst.sop_instance)
        return read(inst)

    monkeypatch.setattr(srv.store, "read", counting)
    corrupt(srv, f"{STUDY}.3")  # index() does not notice: it reads nothing
    entries = srv.index(ident("SERIES", SeriesInstanceUID=f"{STUDY}.1"))
    assert entries is not None and opened == []
    assert [e.sop_instance for e in entries] == [f"{STUDY}.1", f"{STUDY}.3"]
    assert srv.holds(STUDY, f"{STUDY}.1")
    assert srv.read(STUDY, entries[0]) == b"dataset 1" and opened == [f"{STUDY}.1"]
    assert srv.read(STUDY, entries[1]) is None  # damaged
    assert refetched == [STUDY] and srv.counters.damaged == 1
    study = srv.store.study(STUDY)
    assert study is not None and f"{STUDY}.3" not in study.instances
    assert not srv.holds(STUDY, f"{STUDY}.1")  # incomplete now: a held index is stale
    assert srv.index(ident("SERIES", SeriesInstanceUID=f"{STUDY}.1")) is None


def test_a_read_after_an_eviction_is_not_counted_as_damage(tmp_path: Path) -> None:
    srv, refetched = server(tmp_path, buffer=1 << 20)
    entries = srv.index(ident())
    assert entries is not None
    srv.store.evict([STUDY])
    assert srv.read(STUDY, entries[0]) is None and not srv.holds(STUDY, entries[0].series)
    assert refetched == [] and srv.counters.damaged == 0
