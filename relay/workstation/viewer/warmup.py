"""Start fetching a study when the viewer is opened on it, while the viewer boots.

A worklist or RIS opens the viewer by URL (`/viewer?StudyInstanceUIDs=...`). The page and
OHIF's scripts take seconds to start before OHIF asks for the first DICOMweb resource; the
study's series can be on their way through the relay meanwhile. So when the site serves
that page, `Warmup.open` starts, in the background, the series flights OHIF will ask for
(relay.workstation.dicomweb.retrieve): one C-FIND for the study's series, then the
series one after another in series-number order (the first one shown arrives first),
each with its headers-only retrieval (relay.workstation.dicomweb.headfirst), from which
OHIF's metadata request is answered before the pixels are here. OHIF's own requests join
the flights (one retrieval, never two).

Bounded: at most `max_studies` studies warming at once (others named are ignored), at
most `max_series` series per study, never more than half the retriever's flight slots
(OHIF's own requests keep theirs), and no further series once half of `hold_size` is
held (a warm-up must not evict what the radiologist is reading). Only a navigation the
user made (the address bar, a bookmark, a RIS link: `Sec-Fetch-Site` none or
same-origin, or absent) warms up: a page of another site that navigates here fetches
nothing. Failures are logged at INFO without identifiers (an upstream failure by its HTTP
status only: the reason may carry the PACS's error comment, which may quote patient data)
and cost nothing else: OHIF's requests report their own errors.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Mapping
from typing import Final

from aiohttp import web
from pydicom.dataset import Dataset

from relay.dicom.uids import is_uid
from relay.workstation.dicomweb.app import DicomwebService
from relay.workstation.dicomweb.retrieve import SeriesFlight
from relay.workstation.dicomweb.source import UpstreamError

__all__ = ["KEY_WARMUP", "Warmup", "study_uids"]

log = logging.getLogger(__name__)

MAX_STUDIES: Final = 2  # studies warming at once
MAX_SERIES: Final = 4  # series fetched ahead per study
MAX_NAMED: Final = 16  # UIDs read from one URL
MAX_FIND: Final = 1000  # series matches read from the C-FIND
USER_NAVIGATION: Final = frozenset({"", "none", "same-origin"})


def study_uids(query: Mapping[str, str]) -> list[str]:
    """The Study Instance UIDs a viewer URL names (`StudyInstanceUIDs=a,b` or repeated
    keys are not merged: OHIF uses one, comma-separated); anything not a UID is dropped."""
    raw = query.get("StudyInstanceUIDs") or query.get("studyInstanceUIDs") or ""
    out: list[str] = []
    for part in raw.split(",")[:MAX_NAMED]:
        uid = part.strip()
        if is_uid(uid) and uid not in out:
            out.append(uid)
    return out


def _number(ds: Dataset) -> int:
    try:
        return int(ds.get("SeriesNumber") or 0)
    except (TypeError, ValueError):
        return 0


class Warmup:
    """The background fetches started by viewer page loads."""

    def __init__(
        self,
        service: DicomwebService,
        *,
        max_studies: int = MAX_STUDIES,
        max_series: int = MAX_SERIES,
    ) -> None:
        self.service = service
        self.max_studies = max_studies
        self.max_series = max_series
        self._running: dict[str, asyncio.Task[None]] = {}
        self._closed = False
        self.started = 0  # studies warmed up (for tests and debugging)
        self.series_started = 0

    def open(self, query: Mapping[str, str], fetch_site: str | None) -> None:
        """A viewer page was served for `query`; start what it will ask for."""
        if self._closed or (fetch_site or "").lower() not in USER_NAVIGATION:
            return
        for uid in study_uids(query):
            if uid in self._running:
                continue
            if len(self._running) >= self.max_studies:
                break
            task = asyncio.get_running_loop().create_task(self._study(uid), name="warm-up")
            self._running[uid] = task
            task.add_done_callback(functools.partial(self._finished, uid))
            self.started += 1

    def _finished(self, uid: str, task: asyncio.Task[None]) -> None:
        if self._running.get(uid) is task:
            del self._running[uid]

    async def _study(self, study: str) -> None:
        try:
            for series in await self._series(study):
                retriever = self.service.retriever
                if self._closed or retriever.running() >= retriever.max_flights // 2:
                    return
                if retriever.held >= retriever.hold_size // 2:  # never crowd out what is read
                    return
                flight = await retriever.series(study, series)
                self.series_started += 1
                await self._headers(flight)
                async for _ in flight.instances():  # wait: one series at a time
                    pass
        except UpstreamError as exc:  # its reason may quote the PACS: the status only
            log.info("viewer warm-up stopped: the relay or the PACS failed (HTTP %d)",
                     exc.http_status)  # fmt: skip
        except Exception as exc:  # never let a background fetch take the server down
            log.info("viewer warm-up failed: %s", type(exc).__name__)

    async def _headers(self, flight: SeriesFlight) -> None:
        """Start the series' headers-only retrieval too (OHIF's metadata request will find
        it), unless the series comes from the cache or is held."""
        headfirst = self.service.headfirst
        if headfirst is None:
            return
        await flight.decided()
        if not flight.done:
            headfirst.start(flight.study, flight.series)

    async def _series(self, study: str) -> list[str]:
        ident = Dataset()
        ident.QueryRetrieveLevel = "SERIES"
        ident.StudyInstanceUID = study
        ident.SeriesInstanceUID = None
        ident.SeriesNumber = None
        found = await self.service.source.find(ident, MAX_FIND)
        matches = sorted(found.matches, key=_number)
        uids = [str(ds.get("SeriesInstanceUID", "") or "") for ds in matches]
        return [u for u in uids if is_uid(u)][: self.max_series]

    async def close(self, app: object = None) -> None:
        """Cancel what is running (the listener is stopping)."""
        self._closed = True
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


KEY_WARMUP: Final = web.AppKey("viewer_warmup", Warmup)  # the app's, for tests and debugging
