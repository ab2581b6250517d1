"""What the DICOM node and the DICOMweb server ask of the cache: a verified retrieval plan,
an index to read from, or C-FIND matches.

`plan()` (the node's C-GET/C-MOVE) serves only a complete study (or, at series and image
level, series complete on their own: see CacheStore.finish_series), and only after every
file it would send has been opened and authenticated: a damaged file drops that entry (one
log line), the study goes back to the network and is queued to be fetched again, and
nothing is half-served.

`index()` (the DICOMweb server's series flights) answers the same question, complete or
not, without reading any file; `read()` then opens and authenticates one instance when a
request needs it. A file found damaged there is dropped exactly as plan() drops it, and
the caller must not serve what it has begun as complete (retrieve.py cuts the answer).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.dataset import Dataset

from relay.workstation.cache.query import find_matches
from relay.workstation.cache.sealing import SealError
from relay.workstation.cache.store import CachedInstance, CachedStudy, CacheStore

log = logging.getLogger(__name__)

DEFAULT_SERVE_BUFFER = 256 * 1024 * 1024  # cache.serve_buffer


@dataclass(frozen=True)
class CachedItem:
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    read: Callable[[], bytes]


@dataclass
class CacheCounters:
    hits: int = 0
    misses: int = 0
    damaged: int = 0
    offline_finds: int = 0
    served_bytes: int = 0


class CacheServer:
    """The node's view of the cache; `offline()` says whether the gateway link is down."""

    def __init__(
        self,
        store: CacheStore,
        offline: Callable[[], bool],
        refetch: Callable[[str], None],
        *,
        serve_buffer: int = DEFAULT_SERVE_BUFFER,
    ) -> None:
        """`serve_buffer`: a read whose datasets fit is decrypted once and held until sent;
        a larger one is verified first and decrypted again as it is sent."""
        self.serve_buffer = serve_buffer
        self.store = store
        self.offline = offline
        self.refetch = refetch
        self.counters = CacheCounters()

    def plan(self, identifier: Dataset) -> list[CachedItem] | None:
        """The instances of a C-GET/C-MOVE identifier if all are cached and intact, else None."""
        found = self._chosen(identifier)
        if found is None:
            return None
        study_uid, study, chosen = found
        started = time.monotonic()
        hold = sum(i.size for i in chosen) <= self.serve_buffer
        held: dict[str, bytes] = {}
        for inst in chosen:
            data = self._intact(study_uid, inst)
            if data is None:
                self.counters.misses += 1
                return None
            if hold:
                held[inst.sop_instance] = data
        self.store.touch(study_uid)
        self.counters.hits += 1
        log.info(
            "serving %s from the cache: %d instances verified in %.3f s",
            study.label, len(chosen), time.monotonic() - started,
        )  # fmt: skip
        return [
            CachedItem(i.sop_class, i.sop_instance, i.transfer_syntax, self._reader(i, held))
            for i in chosen
        ]

    def index(self, identifier: Dataset) -> list[CachedInstance] | None:
        """The index entries of a retrieve identifier if all are cached (as plan() decides),
        else None; no file is read: `read()` authenticates each one when it is needed."""
        found = self._chosen(identifier)
        if found is None:
            return None
        study_uid, study, chosen = found
        self.store.touch(study_uid)
        self.counters.hits += 1
        log.info("serving %s from the cache: %d instances, read as asked", study.label,
                 len(chosen))  # fmt: skip
        return chosen

    def holds(self, study_uid: str, series: str) -> bool:
        """Whether the series is still complete in the cache (not evicted, wiped or damaged
        since index() answered)."""
        study = self.store.study(study_uid)
        return study is not None and (study.complete or series in study.series_done)

    def read(self, study_uid: str, inst: CachedInstance) -> bytes | None:
        """One instance of an index() answer, opened and authenticated; None when it can no
        longer be served: damaged (its entry dropped and the study fetched again, as plan()
        does) or evicted or wiped since."""
        try:
            data = self.store.read(inst)
        except (SealError, OSError) as exc:
            study = self.store.study(study_uid)
            if study is None or inst.sop_instance not in study.instances:
                return None  # evicted or wiped meanwhile: no damage to report
            self._damaged(study_uid, inst, exc)
            return None
        self.counters.served_bytes += len(data)
        return data

    def _chosen(self, identifier: Dataset) -> tuple[str, CachedStudy, list[CachedInstance]] | None:
        """The study and its instances an identifier names, if all are in the cache."""
        study_uid = str(identifier.get("StudyInstanceUID", "") or "").strip()
        if not study_uid or "\\" in study_uid or "*" in study_uid:
            return None
        study = self.store.study(study_uid)
        level = str(identifier.get("QueryRetrieveLevel", "STUDY")).strip().upper()
        series = _uids(identifier, "SeriesInstanceUID") if level in ("SERIES", "IMAGE") else None
        sops = _uids(identifier, "SOPInstanceUID") if level == "IMAGE" else None
        done = dict(study.series_done) if study is not None else {}
        if study is None or not (
            study.complete or (series is not None and all(s in done for s in series))
        ):
            self.counters.misses += 1
            return None
        chosen = [
            i
            for i in list(study.instances.values())
            if (series is None or i.series in series) and (sops is None or i.sop_instance in sops)
        ]
        if (
            not chosen
            or (sops is not None and len(chosen) < len(sops))
            or (not study.complete and sops is None and not _all_of(chosen, done))
        ):
            self.counters.misses += 1
            return None
        return study_uid, study, chosen

    def find(self, identifier: Dataset) -> list[Dataset]:
        self.counters.offline_finds += 1
        return find_matches(self.store.snapshot(), identifier)

    def _intact(self, study_uid: str, inst: CachedInstance) -> bytes | None:
        try:
            return self.store.read(inst)
        except (SealError, OSError) as exc:
            self._damaged(study_uid, inst, exc)
            return None

    def _damaged(self, study_uid: str, inst: CachedInstance, exc: Exception) -> None:
        """Drop a damaged file's entry (one log line, no patient data); fetch it again."""
        label = self.store.study(study_uid)
        log.error(
            "cache: a file of %s is damaged (%s); entry dropped, served from the network "
            "and fetched again", label.label if label else "a study", type(exc).__name__,
        )  # fmt: skip
        self.counters.damaged += 1
        self.store.drop_instance(study_uid, inst.sop_instance, "damaged")
        self.refetch(study_uid)

    def _reader(self, inst: CachedInstance, held: dict[str, bytes]) -> Callable[[], bytes]:
        def read() -> bytes:
            data = held.pop(inst.sop_instance, None)
            if data is None:
                data = self.store.read(inst)
            self.counters.served_bytes += len(data)
            return data

        return read


def _all_of(chosen: list[CachedInstance], done: dict[str, int]) -> bool:
    """Whether `chosen` holds every instance of each complete series it touches."""
    counts: dict[str, int] = {}
    for inst in chosen:
        counts[inst.series] = counts.get(inst.series, 0) + 1
    return all(n >= done.get(series, n + 1) for series, n in counts.items())


def _uids(identifier: Dataset, keyword: str) -> set[str] | None:
    value = identifier.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return {v.strip() for v in value.split("\\")}
    return {str(v).strip() for v in value}
