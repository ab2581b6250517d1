"""Writing the browser's series retrievals through to the encrypted disk cache.

A series retrieved through the agent for a DICOMweb request is stored instance by instance
in relay.workstation.cache (the same store, sealing and `cache.max_size`/`max_age` bounds
as the prefetcher's), while the request is answered from memory. The study's index entry
gets the PACS's own study-level C-FIND attributes and count (as the prefetcher does).

Only an instance whose own Study and Series Instance UIDs are the series' is written (a
PACS that matches a retrieve on the SOP Instance UID alone can bring another series'
instance, e.g. to a jump ahead): any other is refused, with one log line per series.

The series counts as complete in the cache only when the retrieve ended in success with
no failed sub-operation and the PACS's own count of completed sub-operations is given and
no more than the instances written (a final response without counts vouches for nothing:
the series stays uncached, the browser is served from memory); then the next
request (and a DIMSE C-GET/C-MOVE at series level) is served from the cache, also with the
link down, and its study becomes complete once each of its series is. A write that fails
(a full disk, the size cap, a wipe meanwhile) stops the write-through with one log line:
the browser's answer never depends on it. At most `max_running` series are written at
once (a writer holds its series in memory until written); beyond that, one is skipped.
Log lines name a study "study N" and an upstream failure by its HTTP status only (a
PACS's error comment, which the reason carries, may quote patient data).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from pydicom.dataset import Dataset

from relay.dicom import rawds
from relay.dicom import status as st
from relay.dicom.codec import FinalResponse
from relay.workstation.cache.query import SERIES_KEYS, STUDY_KEYS, dicom_text
from relay.workstation.cache.store import CachedInstance, CacheFull, CacheStore
from relay.workstation.dicomweb.source import DicomSource, UpstreamError

if TYPE_CHECKING:
    from relay.workstation.dicomweb.retrieve import SeriesFlight

__all__ = ["MAX_WRITERS", "WriteThrough", "complete_by"]

log = logging.getLogger(__name__)

MAX_WRITERS: Final = 8
SOURCE: Final = "browser"  # the cache's `source` label for these studies


def complete_by(final: FinalResponse | None, written: int) -> bool:
    """Whether a series retrieve's final response vouches for `written` instances as the
    whole series: success, no failed sub-operation, and its count of completed
    sub-operations given (optional in DICOM; without it nothing says all came), not zero,
    and no more than `written` (headfirst.counts_match asks the same)."""
    if final is None or final.status != st.SUCCESS or final.failed or final.completed is None:
        return False
    return 0 < final.completed <= written


def identify(data: bytes, transfer_syntax: str) -> tuple[str, str, dict[str, str]]:
    """An instance's own Study and Series Instance UIDs and its series attributes (to
    check it belongs where it is cached; a worker thread's job: it decodes the dataset)."""
    ds = rawds.decode_dataset(data, transfer_syntax)
    attrs = {k: dicom_text(ds.get(k)) for k in SERIES_KEYS}
    return str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", "")), attrs


class WriteThrough:
    """Writers of retrieved series into `store`; `on_complete(study, series)` is told when
    a series is complete in the cache (the retriever then frees its memory copy)."""

    def __init__(
        self,
        store: CacheStore,
        source: DicomSource,
        *,
        on_complete: Callable[[str, str], None] = lambda study, series: None,
        max_running: int = MAX_WRITERS,
    ) -> None:
        self.store = store
        self.source = source
        self.on_complete = on_complete
        self.max_running = max_running
        self._tasks: set[asyncio.Task[None]] = set()
        self.written = 0  # series now complete in the cache
        self.failed = 0  # write-throughs given up (disk full, size cap, cache errors)
        self.skipped = 0  # not attempted: max_running writers busy
        self.refused = 0  # instances not cached: of another series or study

    def start(self, flight: SeriesFlight) -> None:
        """Write the series of `flight` as it arrives."""
        if len(self._tasks) >= self.max_running:
            self.skipped += 1
            log.warning("cache write-through skipped: %d series being written already",
                        self.max_running)  # fmt: skip
            return
        task = asyncio.get_running_loop().create_task(self._run(flight), name="write-through")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def running(self) -> int:
        return len(self._tasks)

    async def _run(self, flight: SeriesFlight) -> None:
        try:
            await self._write(flight)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # whatever goes wrong here, the browser is served
            self.failed += 1
            log.error("cache write-through failed (%s); served from memory, not cached",
                      type(exc).__name__)  # fmt: skip

    async def _study_attrs(self, study: str) -> tuple[dict[str, str], int | None] | None:
        ident = Dataset()
        ident.QueryRetrieveLevel = "STUDY"
        for keyword in STUDY_KEYS:
            setattr(ident, keyword, "")
        ident.StudyInstanceUID = study
        try:
            found = await self.source.find(ident, 1)
        except UpstreamError as exc:  # its reason may quote the PACS: the status only
            log.warning("cache write-through skipped: the study's C-FIND failed (HTTP %d)",
                        exc.http_status)  # fmt: skip
            return None
        if not found.matches or found.from_cache:
            return None
        attrs = {k: dicom_text(found.matches[0].get(k)) for k in STUDY_KEYS}
        count = attrs.pop("NumberOfStudyRelatedInstances", "").strip()
        return attrs, int(count) if count.isdigit() else None

    async def _write(self, flight: SeriesFlight) -> None:
        described = await self._study_attrs(flight.study)
        if described is None:
            return
        attrs, expected = described
        await asyncio.to_thread(self.store.adopt, flight.study, attrs, expected, SOURCE)
        entry = self.store.study(flight.study)
        label = entry.label if entry is not None else "a study"
        written = refused = 0
        try:
            async for item in flight.instances():
                data = await item.load()  # retrieved: held in the flight
                study, series, series_attrs = await asyncio.to_thread(
                    identify, data, item.transfer_syntax
                )
                if (study, series) != (flight.study, flight.series):
                    refused += 1
                    continue
                self.store.note_series(flight.study, flight.series, series_attrs)
                inst = CachedInstance(item.sop_class, item.sop_instance, flight.series,
                                      item.transfer_syntax, 0)  # fmt: skip
                await asyncio.to_thread(self.store.put, flight.study, inst, data)
                written += 1
        except UpstreamError:
            return  # the retrieval failed: the requests say so; nothing marked complete
        except Exception as exc:
            self.failed += 1
            log.error(
                "cache: writing a series of %s through failed after %d instances (%s); "
                "the browser is served from memory, the series is not cached",
                label, written, _why(exc),
            )  # fmt: skip
            return
        finally:
            self._note_refused(refused, label)
        if not complete_by(flight.final, written):
            log.info("cache: a series of %s written through incomplete (%d instances)",
                     label, written)  # fmt: skip
            return
        if await asyncio.to_thread(self.store.finish_series, flight.study, flight.series,
                                   written):  # fmt: skip
            self.written += 1
            log.info("cache: a series of %s written through (%d instances)", label, written)
            self.on_complete(flight.study, flight.series)

    def _note_refused(self, refused: int, label: str) -> None:
        """Count and log (once per series, without UIDs) the instances not cached."""
        if refused:
            self.refused += refused
            log.warning("cache: %d instance(s) retrieved with a series of %s belong to "
                        "another series or study; not cached", refused, label)  # fmt: skip

    async def drain(self) -> None:
        """Wait for the writers running now (tests; a clean stop could use it)."""
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _why(exc: Exception) -> str:
    """A write's failure for the log: the cache's own texts (a size, a path of sealed
    names), only the type of anything else (a decoder's text may quote values)."""
    if isinstance(exc, (CacheFull, OSError)):
        return f"{type(exc).__name__}: {exc}"
    return type(exc).__name__
