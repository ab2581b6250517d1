"""The cache on disk: sealed instance files, an index in memory, bounded size and age.

Every file under the directory is sealed (relay.workstation.cache.sealing) and named by an
HMAC; the index (which studies, their patient attributes for C-FIND, sizes, ages) is in
memory, and is written to disk only sealed (`index` object) when the key outlives the
process (keyring). Callers are the event loop (fetching) and pynetdicom's threads
(serving): one lock guards the index; file reads happen outside it.

Bounds: `max_size` counts the sealed bytes on disk; when a new file would pass it, the
studies read least recently are evicted first (the study being filled last of all). A
write takes its room under the lock before the file is written, so writers at once (a
prefetch and the browser's write-throughs) cannot each find room for one file and pass
the cap together. A
study that alone is larger than the cap is abandoned. `max_age` counts from when a study
was cached; `purge_expired()` removes older ones. Damage (a file that does not
authenticate, is missing, or a write that fails, e.g. a full disk) drops that entry with
one log line; the study is then incomplete and is not served from the cache.

A study is complete when the prefetcher filled it (`finish`) and a count of the PACS's
(the C-FIND's, the retrieve's final response's) vouches for what is here. A series can be
complete on its own (`finish_series`, the DICOMweb server writing a browser's retrieval
through): then that series is served from the cache even while its study is incomplete.

Removing a file can fail while another program holds it open (Windows: a read being
served, a prefetch's write, a virus scanner). A wipe then goes on: the index goes first
(nothing is read back), every other file is tried REMOVE_TRIES times, and one warning
counts what is left. A file an eviction cannot remove stays counted in `max_size` on a
list (at most MAX_LEFTOVER) that the next eviction and the expiry sweep try again; the
next start removes whatever no index names.

Durability (a persisted index, keyring mode; with the key in memory nothing outlives the
process, so nothing is synced): an instance file is written to a temp file and renamed
into place; before an index is written (a study or series complete, an eviction), the
files written since the last one are synced, in one batch (at most MAX_UNSYNCED waiting:
beyond, a file is synced as it is written), then the objects directory (their renames),
then the index, renamed, and its directory (relay.workstation.cache.durable). Synced one
by one as they were written, a 200-image CT took about twice as long to write here. A
power cut can therefore leave only whole files under an index; one that is not (a disk
that lied, a file cut short after the fact) is dropped at start when its size is not the
one the index recorded (zero length, short), or when it fails authentication as it is
read (sealed: AES-GCM), and then served from the network and fetched again. A file
whose sync fails is dropped from the cache (`abandoned`) and the index made without it:
kept for the next commit, it would fail every later one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from relay.ops import replacing
from relay.workstation.cache.durable import sync_directory, sync_file, write_file
from relay.workstation.cache.sealing import OVERHEAD, Sealer, SealError

log = logging.getLogger(__name__)

OBJECTS: Final = "objects"
INDEX_ID: Final = "index"
INDEX_FILE: Final = "index.bin"
# 2: instance files named and sealed under their study and SOP Instance UIDs together; an
# index of another format is not loaded (its files are named otherwise): the cache starts empty
INDEX_FORMAT: Final = 2
MAX_STUDIES: Final = 100_000  # index entries, whatever the sizes
REMOVE_TRIES: Final = 3  # a wipe's tries of a file another program holds open (Windows)
REMOVE_PAUSE: Final = 0.15  # seconds between them
MAX_LEFTOVER: Final = 1_000  # files an eviction could not remove, kept counted to retry
SYNC_ROUNDS: Final = 3  # makings of one index whose files failed to sync, before it gives up
MAX_UNSYNCED: Final = 10_000  # files written and not yet synced, kept to sync at the commit


@dataclass
class CachedInstance:
    sop_class: str
    sop_instance: str
    series: str
    transfer_syntax: str
    size: int  # sealed bytes on disk
    study: str = ""  # its study's UID, set by CacheStore.put: the file is sealed under both


@dataclass
class CachedStudy:
    """One study in the index; `attrs` hold the C-FIND attributes (patient data)."""

    uid: str
    attrs: dict[str, str] = field(default_factory=dict)
    series_attrs: dict[str, dict[str, str]] = field(default_factory=dict)
    expected: int | None = None  # the PACS's count of instances
    instances: dict[str, CachedInstance] = field(default_factory=dict)
    complete: bool = False
    # series complete on their own (written through by the browser's retrievals): series
    # UID -> the instances the PACS sent for it; servable while the study is incomplete
    series_done: dict[str, int] = field(default_factory=dict)
    filling: bool = False
    source: str = ""
    created: float = field(default_factory=time.time)
    last_read: float = field(default_factory=time.time)
    seq: int = 0  # a patient-free label: "study N"

    @property
    def size(self) -> int:
        return sum(i.size for i in self.instances.values())

    @property
    def label(self) -> str:
        return f"study {self.seq}"


class CacheFull(Exception):
    """A file does not fit even after evicting every other study."""


class CacheStore:
    """Sealed files in `directory`; `on_drop(reason)` counts every dropped or evicted entry."""

    def __init__(
        self,
        directory: Path,
        sealer: Sealer,
        *,
        max_size: int,
        max_age: float,
        persist_index: bool = False,
        on_drop: Callable[[str, int], None] | None = None,
    ) -> None:
        self.dir = Path(directory)
        self.objects = self.dir / OBJECTS
        self.sealer = sealer
        self.max_size = max_size
        self.max_age = max_age
        self.persist_index = persist_index
        self.on_drop = on_drop or (lambda reason, n: None)
        self.studies: dict[str, CachedStudy] = {}
        self.total = 0
        # object files that could not be removed (in use): path -> bytes `total` counts
        self._leftover: dict[Path, int] = {}
        self._lock = threading.RLock()
        self._seq = 0
        # index saves: each takes a number under the lock; one older than the last on
        # disk, or taken before a wipe, is not put in place (it ran outside the lock)
        self._saves = 0
        self._saved = 0
        self._wiped_at = 0
        self._epoch = 0  # wipes so far: a write begun before one adds nothing after it
        #: Files written since the last index (persisted only), with the instance each holds.
        self._unsynced: dict[Path, tuple[str, str]] = {}
        self._commit = threading.Lock()  # index saves' syncs and writes, one at a time

    # -- start, wipe ---------------------------------------------------------------

    def open(self, *, fresh_key: bool) -> None:
        """Create the directory; with a fresh key wipe what is there (unreadable anyway).
        OSError when a file cannot be written there (start-up names `cache.dir`)."""
        self.objects.mkdir(parents=True, exist_ok=True)
        self._probe_writable()
        if fresh_key or not self._load_index():
            removed = self._remove_files()
            if removed:
                log.info("cache: removed %d files a previous run left (unreadable now)", removed)
        else:
            on_disk = {p.name: p for p in self.objects.glob("*")}
            named = self._keep_present(on_disk)
            removed = self._remove([p for n, p in on_disk.items() if n not in named])
            if removed:
                log.info("cache: removed %d files no study in the index names", removed)
        self.purge_expired()

    def _probe_writable(self) -> None:
        """Write and remove one empty file: a read-only directory (which `mkdir` accepts
        when it exists) refuses start-up here, once, rather than every write later
        failing one by one. A probe left behind (a Windows scanner holding it) is removed
        with the temporary files at the next start."""
        probe = self.objects / f".probe.{secrets.token_hex(4)}.tmp"
        probe.write_bytes(b"")
        with contextlib.suppress(OSError):
            probe.unlink()

    def _keep_present(self, on_disk: dict[str, Path]) -> set[str]:
        """Drop from a loaded index every instance whose file is missing or not the size
        it was written at (a crash after an eviction or a write the index had not been
        saved for, a file cut short by a power loss): its study and series become
        incomplete, so nothing is served as complete that is not all here. The names of
        the files kept."""
        named: set[str] = set()
        dropped = 0
        with self._lock:
            for study in self.studies.values():
                for sop, inst in list(study.instances.items()):
                    name = self.sealer.name(instance_id(study.uid, inst.sop_instance))
                    path = on_disk.get(name)
                    try:
                        intact = path is not None and path.stat().st_size == inst.size
                    except OSError:
                        intact = False
                    if intact:
                        named.add(name)
                        continue
                    del study.instances[sop]
                    study.complete = False
                    study.series_done.pop(inst.series, None)
                    self.total -= inst.size
                    dropped += 1
        if dropped:
            log.warning("cache: %d files the index names are missing or cut short (a crash "
                        "before the index was saved?); their studies are incomplete",
                        dropped)  # fmt: skip
        return named

    def wipe(self, reason: str) -> int:
        """Erase every study and file now; the number of studies erased. The index in
        memory is emptied first, and a file in use never stops the wipe (see above)."""
        with self._lock:
            n = len(self.studies)
            self._forget_all()
            self._remove_files()
        log.warning("cache wiped (%s): %d studies", reason, n)
        if n:
            self.on_drop(reason, n)
        return n

    def close_temporary(self) -> None:
        """At a clean stop with an in-memory key: erase everything, directories included."""
        with self._lock:
            self._forget_all()
            self._remove_files()
        with contextlib.suppress(OSError):
            self.objects.rmdir()

    def _forget_all(self) -> None:
        """Empty the index in memory (under the lock); an index save already under way
        is not put in place after this."""
        self.studies.clear()
        self.total = 0
        self._leftover.clear()
        self._wiped_at = self._saves
        self._epoch += 1  # a write under way: its room was in the `total` just emptied
        self._unsynced.clear()

    def _remove_files(self) -> int:
        """Remove the sealed index first, then its temporary files and every object file;
        the number removed."""
        return self._remove(
            [self.dir / INDEX_FILE, *self.dir.glob(".*.tmp"), *self.objects.glob("*")]
        )

    def _remove(self, paths: list[Path]) -> int:
        """Remove `paths` in order, trying those in use again; the number removed. What is
        left is logged (a count: the names derive from UIDs) and object files left stay
        counted on the leftover list."""
        removed = 0
        for attempt in range(REMOVE_TRIES):
            if attempt:
                time.sleep(REMOVE_PAUSE)
            left = []
            for path in paths:
                try:
                    path.unlink()
                except FileNotFoundError:
                    continue
                except OSError:
                    left.append(path)
                    continue
                removed += 1
            paths = left
            if not paths:
                return removed
        index = self.dir / INDEX_FILE
        log.warning(
            "cache: %d files could not be removed from %s%s (in use by another program?); "
            "tried again later and at the next start",
            len(paths), self.dir, ", the index among them" if index in paths else "",
        )  # fmt: skip
        with self._lock:
            for path in paths:
                if path.parent == self.objects and len(self._leftover) < MAX_LEFTOVER:
                    try:
                        size = path.stat().st_size
                    except OSError:
                        size = 0
                    self._leftover[path] = self._leftover.get(path, 0) + size
                    self.total += size
        return removed

    def _discard(self, path: Path, size: int) -> int:
        """Remove one object file of `size` bytes (under the lock); the bytes gone from the
        disk. One that cannot be removed now (in use) returns 0 and stays counted on the
        leftover list, tried again by `_retry_leftover`; past MAX_LEFTOVER it is no longer
        counted and the next start removes it."""
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            if len(self._leftover) < MAX_LEFTOVER:
                self._leftover[path] = self._leftover.get(path, 0) + size
                return 0
        return size

    def _retry_leftover(self) -> None:
        """Try again to remove the files left in use (under the lock)."""
        for path, size in list(self._leftover.items()):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError:
                continue
            del self._leftover[path]
            self.total -= size

    # -- index -----------------------------------------------------------------------

    def study(self, uid: str) -> CachedStudy | None:
        with self._lock:
            return self.studies.get(uid)

    def begin(
        self, uid: str, attrs: dict[str, str], expected: int | None, source: str
    ) -> CachedStudy:
        """The study's index entry, created or refreshed, marked filling."""
        with self._lock:
            study = self._entry(uid, attrs, source)
            study.expected = expected
            study.filling = True
            study.complete = False
            return study

    def adopt(self, uid: str, attrs: dict[str, str], expected: int | None, source: str) -> None:
        """The study's index entry for a series written through: created, or its attributes
        refreshed; never marked filling, and its completeness left alone."""
        with self._lock:
            study = self._entry(uid, attrs, source)
            if expected is not None:
                study.expected = expected

    def _entry(self, uid: str, attrs: dict[str, str], source: str) -> CachedStudy:
        """The study's entry (under the lock), made if new (the index bounded at
        MAX_STUDIES), with `attrs` merged in."""
        study = self.studies.get(uid)
        if study is None:
            if len(self.studies) >= MAX_STUDIES:
                self._evict_one(keep=uid)
            self._seq += 1
            study = CachedStudy(uid=uid, source=source, seq=self._seq)
            self.studies[uid] = study
        study.attrs.update(attrs)
        return study

    def note_series(self, uid: str, series: str, attrs: dict[str, str]) -> None:
        """A series' attributes for C-FIND, the first given kept; under the lock, since
        index saves and C-FIND snapshots copy them on other threads (a dict changing size
        while copied fails the copy)."""
        with self._lock:
            study = self.studies.get(uid)
            if study is not None:
                study.series_attrs.setdefault(series, attrs)

    def finish_series(self, uid: str, series: str, count: int) -> bool:
        """Mark one series complete when `count` (the PACS's) instances of it are here; the
        study too when every instance it counts is here and each of its series is complete.
        False when the series is not all here (evicted or dropped meanwhile)."""
        with self._lock:
            study = self.studies.get(uid)
            if study is None or count <= 0:
                return False
            have = sum(1 for i in study.instances.values() if i.series == series)
            if have < count:
                return False
            study.series_done[series] = count
            held = {i.series for i in study.instances.values()}
            if (
                study.expected is not None
                and len(study.instances) >= study.expected
                and held <= set(study.series_done)
            ):
                study.complete = True
        self._save_index()
        return True

    def finish(self, uid: str, *, complete: bool, counted: int | None = None) -> None:
        """The fill is over; the study is complete when `complete` (the retrieve ended in
        success, none failed) and a count of the PACS's is reached: `counted` (its final
        response's completed sub-operations) and the C-FIND's `expected`, whichever were
        given, at least one of them. Neither given: incomplete, whatever came."""
        with self._lock:
            study = self.studies.get(uid)
            if study is None:
                return
            study.filling = False
            counts = [n for n in (study.expected, counted) if n is not None]
            study.complete = complete and bool(counts) and len(study.instances) >= max(1, *counts)
        self._save_index()

    def states(self) -> dict[str, int]:
        """Studies by state, cheaply (for every metrics scrape)."""
        out = {"complete": 0, "filling": 0, "incomplete": 0}
        with self._lock:
            for s in self.studies.values():
                out["complete" if s.complete else "filling" if s.filling else "incomplete"] += 1
        return out

    def snapshot(self) -> list[CachedStudy]:
        with self._lock:
            return [
                CachedStudy(**{**asdict(s), "instances": dict(s.instances)})
                for s in self.studies.values()
            ]

    # -- writing -----------------------------------------------------------------------

    def put(self, study_uid: str, inst: CachedInstance, dataset: bytes) -> None:
        """Seal and write one instance; CacheFull or OSError (entry not added) on failure."""
        inst.study = study_uid
        sealed = self.sealer.seal(instance_id(study_uid, inst.sop_instance), dataset)
        inst.size = len(sealed)
        path = self.path_of(study_uid, inst.sop_instance)
        with self._lock:
            study = self.studies.get(study_uid)
            if study is None:
                raise CacheFull("study no longer in the cache")
            old = study.instances.get(inst.sop_instance)
            need = inst.size - (old.size if old else 0)
            if self._leftover and self.total + need > self.max_size:
                self._retry_leftover()
            while self.total + need > self.max_size:
                if not self._evict_one(keep=study_uid):
                    raise CacheFull(
                        f"an instance of {inst.size} bytes does not fit in cache.max_size"
                    )
            # a file left in use under this name is replaced below (or kept on failure)
            stale = self._leftover.pop(path, 0)
            self.total -= stale
            # the room is taken now, under the lock: another writer's check counts it
            reserved = max(need, 0)
            self.total += reserved
            epoch = self._epoch
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        with self._lock:  # synced at the next commit, or now if too many wait
            batched = self.persist_index and len(self._unsynced) < MAX_UNSYNCED
        try:
            write_file(tmp, sealed, sync=self.persist_index and not batched)
            replacing.replace(tmp, path)  # Windows: a scanner may hold `path` a moment
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            with self._lock:
                if epoch == self._epoch:
                    self.total -= reserved
                if stale:
                    self.total += stale - self._discard(path, stale)
            raise
        with self._lock:
            if epoch == self._epoch:
                self.total -= reserved
            study = self.studies.get(study_uid)
            if study is None or epoch != self._epoch:  # evicted or wiped meanwhile
                self.total += inst.size - self._discard(path, inst.size)
                return
            old = study.instances.get(inst.sop_instance)
            self.total += inst.size - (old.size if old else 0)
            study.instances[inst.sop_instance] = inst
            if batched:
                self._unsynced[path] = (study_uid, inst.sop_instance)

    # -- reading -----------------------------------------------------------------------

    def read(self, inst: CachedInstance) -> bytes:
        """The instance's dataset bytes; SealError or OSError when the file is damaged."""
        sealed = self.path_of(inst.study, inst.sop_instance).read_bytes()
        return self.sealer.open(instance_id(inst.study, inst.sop_instance), sealed)

    def path_of(self, study_uid: str, sop_instance: str) -> Path:
        """The file of one instance of one study (a name that reveals neither UID)."""
        return self.objects / self.sealer.name(instance_id(study_uid, sop_instance))

    def touch(self, uid: str) -> None:
        with self._lock:
            study = self.studies.get(uid)
            if study is not None:
                study.last_read = time.time()

    def drop_instance(self, study_uid: str, sop_instance: str, reason: str) -> None:
        """A damaged file: remove it; the study is incomplete until it is fetched again."""
        with self._lock:
            study = self.studies.get(study_uid)
            inst = study.instances.pop(sop_instance, None) if study else None
            if study is not None:
                study.complete = False
                if inst is not None:
                    study.series_done.pop(inst.series, None)
            path = self.path_of(study_uid, sop_instance)
            if inst is not None:
                self.total -= self._discard(path, inst.size)
            elif path not in self._leftover:
                with contextlib.suppress(OSError):
                    path.unlink()
        self.on_drop(reason, 1)

    # -- bounds ---------------------------------------------------------------------------

    def evict(self, uids: Iterable[str], reason: str = "evicted") -> int:
        n = 0
        with self._lock:
            for uid in list(uids):
                if self._remove_study(uid):
                    n += 1
        if n:
            self.on_drop(reason, n)
            self._save_index()
        return n

    def purge_expired(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        with self._lock:
            self._retry_leftover()
            old = [u for u, s in self.studies.items() if now - s.created > self.max_age]
        n = self.evict(old, "expired")
        if n:
            log.info("cache: %d studies expired (cache.max_age)", n)
        return n

    def _evict_one(self, keep: str) -> bool:
        """Evict the least recently read study other than `keep`; False if there is none."""
        candidates = [s for u, s in self.studies.items() if u != keep and not s.filling]
        candidates = candidates or [s for u, s in self.studies.items() if u != keep]
        if not candidates:
            return False
        victim = min(candidates, key=lambda s: s.last_read)
        self._remove_study(victim.uid)
        log.info("cache: evicted %s (least recently read) for cache.max_size", victim.label)
        self.on_drop("size", 1)
        return True

    def _remove_study(self, uid: str) -> bool:
        study = self.studies.pop(uid, None)
        if study is None:
            return False
        for inst in study.instances.values():
            self.total -= self._discard(self.path_of(uid, inst.sop_instance), inst.size)
        return True

    # -- the sealed index (keyring mode only) ------------------------------------------------

    def _save_index(self) -> None:
        """Write the sealed index: made under the lock, sealed and written outside it
        (pynetdicom's serving threads wait on the lock), then put in place under it only
        if no later save is already there and no wipe came since: a wipe's index must not
        come back, and two threads' saves must not land in the wrong order."""
        if not self.persist_index:
            return
        path = self.dir / INDEX_FILE
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            # The files it names were written and renamed before it was made: their bytes
            # and renames on disk first, then the index, then its own rename. Made and
            # synced one save at a time: another's sync may have taken a file this one
            # names, and this one must not be made before that sync is done. Sealed and
            # written outside (a save nested in another is no deadlock); the numbers keep
            # an older save from replacing a newer one.
            with self._commit:
                number, data = self._index_synced()
                sync_directory(self.objects)
            sealed = self.sealer.seal(INDEX_ID, data)
            write_file(tmp, sealed, sync=True)
            with self._lock:
                replaced = number > max(self._saved, self._wiped_at)
                if replaced:
                    replacing.replace(tmp, path)  # Windows: a scanner may hold the index
                    self._saved = number
            if replaced:
                sync_directory(self.dir)
        except OSError as exc:
            log.error("cache: cannot write the index in cache.dir %s (%s: %s); a restart "
                      "may not find the studies cached since", self.dir, type(exc).__name__,
                      exc.strerror or "")  # fmt: skip
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)

    def _index_synced(self) -> tuple[int, bytes]:
        """The index to write (made under the lock, numbered in save order) once every
        file it names is synced. A file that cannot be synced is dropped and the index made
        again without it (files written meanwhile are synced in that round); a disk that
        keeps failing fails the save (OSError)."""
        for _ in range(SYNC_ROUNDS):
            with self._lock:
                self._saves += 1
                number = self._saves
                data = json.dumps(
                    {
                        "format": INDEX_FORMAT,
                        "seq": self._seq,
                        "studies": [_saved(s) for s in self.studies.values()],
                    }
                ).encode()
            if not self._sync_written():
                return number, data
        raise OSError(errno.EIO, f"files still failing to sync after {SYNC_ROUNDS} rounds")

    def _sync_written(self) -> int:
        """Sync the files written since the last index; the number that could not be, each
        dropped from the cache ("abandoned"), not kept for the next commit: after a failed
        sync the kernel may have let the bytes go and a later sync succeed all the same,
        and one file the disk refuses must not keep every later index from being saved
        (all that was cached after it would be lost at the next start)."""
        with self._lock:
            waiting, self._unsynced = self._unsynced, {}
        failed: list[tuple[str, str]] = []
        error: OSError | None = None
        for path, held in waiting.items():
            try:
                sync_file(path)
            except FileNotFoundError:  # evicted since
                continue
            except OSError as exc:
                failed.append(held)
                error = exc
        for study_uid, sop_instance in failed:
            self.drop_instance(study_uid, sop_instance, "abandoned")
        if error is not None:
            log.error("cache: %d file(s) in cache.dir %s could not be synced to disk (%s: %s); "
                      "dropped from the cache, fetched again when next asked for", len(failed),
                      self.dir, type(error).__name__, error.strerror or "")  # fmt: skip
        return len(failed)

    def _load_index(self) -> bool:
        if not self.persist_index:
            return False
        path = self.dir / INDEX_FILE
        try:
            data: dict[str, Any] = json.loads(self.sealer.open(INDEX_ID, path.read_bytes()))
        except FileNotFoundError:
            return False
        except (OSError, SealError, ValueError) as exc:
            log.error("cache: the index in cache.dir %s does not open (%s: damaged, or sealed "
                      "under another cache.key); wiping the cache", self.dir,
                      type(exc).__name__)  # fmt: skip
            return False
        if data.get("format") != INDEX_FORMAT:
            log.info("cache: the index is an older version's; starting an empty cache")
            return False
        with self._lock:
            self._seq = int(data.get("seq", 0))
            for raw in data.get("studies", []):
                insts = {k: CachedInstance(**v) for k, v in raw.pop("instances").items()}
                study = CachedStudy(**raw, instances=insts)  # series_done: {} if absent
                for inst in insts.values():
                    inst.study = study.uid
                study.filling = False
                self.studies[study.uid] = study
                self.total += study.size
        return True


def _saved(study: CachedStudy) -> dict[str, Any]:
    """A study's entry as the index keeps it (its instances' `study` is the entry's)."""
    entry = asdict(study)
    for inst in entry["instances"].values():
        del inst["study"]
    return entry


def instance_id(study_uid: str, sop_instance: str) -> str:
    """What an instance file is sealed and named under: its study and its SOP Instance
    UID together, so a file of one study never opens as another's (a PACS that gives two
    studies one SOP Instance UID gets two files). The length keeps the pair unambiguous,
    and no instance's identity is the index's."""
    return f"{len(study_uid)}:{study_uid}:{sop_instance}"


def sealed_size(plain: int) -> int:
    """The bytes a dataset of `plain` bytes takes on disk."""
    return plain + OVERHEAD
