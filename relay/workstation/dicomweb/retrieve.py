"""Series for the browser: from the cache when the study is complete there, else retrieved
through the agent once, shared by every request that wants it (single-flight).

A `SeriesFlight` collects a series's instances as they arrive; any number of requests
read it at the same time (`instances()` yields each instance as soon as it is there, so
answers stream). Finished series stay in a holding area bounded by `hold_size` bytes and
`max_held` series (least recently used first out); a series retrieved through the agent
that alone outgrows it fails with 507 rather than grow memory without bound, and one read
from the cache that does (it is read whole, within `max_flights`) is served to the
requests that share its flight and then not kept. At most `max_flights` retrievals and
cache reads run at once (503 above). A failed retrieval is forgotten at once, so that the
next request tries again; so is a series that came without instances (404 now, asked
again next time: it may reach the PACS later).

Nothing half-received is served as complete: a retrieve whose final response counts
failed sub-operations or does not say (0xB000 so, 0xA702 after some completed;
`source.retrieve_failure`) ends its flight with that 502 after the instances that came,
so a WADO-RS answer under way is cut without its closing delimiter, one not yet begun
gets the 502, and the partial series is not kept for the next request.

Jump ahead (issue 14: what the viewer asks for next goes first): a series comes in the
PACS's order, so the slice a radiologist scrolls to may be far behind. When the viewport
asks for an instance (`Retriever.instance`) that its series has not brought within
`JUMP_AFTER`, that one instance is retrieved alone, at `priorities.VIEWPORT_NEXT`, ahead of
the series' stream, which carries on behind it. At most `MAX_JUMPS` run per series at
once; the series still brings the instance again later (its bytes cross the link twice:
the price of not waiting), and the flight keeps the first copy.

With the cache enabled, a retrieved series is also written through to it
(relay.workstation.dicomweb.writethrough); once complete there, its memory copy leaves the
holding area and the next request reads the cache. With the cache disabled the holding
area is the only copy.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Final

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID

from relay.dicom import rawds
from relay.dicom.codec import FinalResponse
from relay.workstation import priorities
from relay.workstation.cache.serve import CacheServer
from relay.workstation.dicomweb.source import DicomSource, UpstreamError, retrieve_failure
from relay.workstation.dicomweb.writethrough import WriteThrough

__all__ = ["HeldInstance", "Retriever", "SeriesFlight"]

log = logging.getLogger(__name__)

MAX_FLIGHTS: Final = 8
MAX_HELD: Final = 256  # finished series in the holding area (hold_size bounds their bytes)
JUMP_AFTER: Final = 0.2  # s the viewport's instance may wait for its series to bring it
MAX_JUMPS: Final = 2  # single-instance retrievals ahead of one series, at once


@dataclass
class HeldInstance:
    """One instance as the PACS sent it: its dataset bytes and transfer syntax."""

    sop_class: str
    sop_instance: str
    transfer_syntax: str
    data: bytes

    def dataset(self) -> Dataset:
        """The decoded dataset, with the transfer syntax where pydicom's pixel code looks."""
        ds = rawds.decode_dataset(self.data, self.transfer_syntax)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = UID(self.transfer_syntax)
        return ds


@dataclass
class SeriesFlight:
    study: str
    series: str
    items: list[HeldInstance] = field(default_factory=list)
    by_uid: dict[str, HeldInstance] = field(default_factory=dict)
    size: int = 0
    done: bool = False
    error: UpstreamError | None = None
    from_cache: bool = False
    final: FinalResponse | None = None  # the retrieve's final response (its counts)
    retrieving: bool = False  # not in the cache: being retrieved through the agent
    jumping: set[str] = field(default_factory=set)  # instances retrieved ahead (<= MAX_JUMPS)
    readers: int = 0  # instances() iterations under way (answers being written, cache writes)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, item: HeldInstance) -> None:
        if item.sop_instance in self.by_uid:
            return
        self.items.append(item)
        self.by_uid[item.sop_instance] = item
        self.size += len(item.data)
        self._wake()

    def finish(self, error: UpstreamError | None = None) -> None:
        self.done = True
        self.error = error
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def instances(self) -> AsyncGenerator[HeldInstance, None]:
        """Every instance, as soon as it is there; the flight's error at its end."""
        i = 0
        self.readers += 1  # while read, its memory counts against hold_size (Retriever.held)
        try:
            while True:
                while i < len(self.items):
                    yield self.items[i]
                    i += 1
                if self.done:
                    if self.error is not None:
                        raise self.error
                    return
                await self._changed.wait()
        finally:
            self.readers -= 1

    def mark_retrieving(self) -> None:
        self.retrieving = True
        self._wake()

    async def decided(self) -> None:
        """Until the flight is done or known to come through the agent (not the cache)."""
        while not (self.done or self.retrieving):
            await self._changed.wait()

    async def finished(self) -> None:
        """Until the flight is done (whatever its outcome)."""
        while not self.done:
            await self._changed.wait()

    async def get(self, sop_instance: str) -> HeldInstance | None:
        """One instance, waiting for it while the series is arriving; None if not in it."""
        while True:
            found = self.by_uid.get(sop_instance)
            if found is not None:
                return found
            if self.done:
                if self.error is not None:
                    raise self.error
                return None
            await self._changed.wait()


class Retriever:
    """The series flights and the holding area."""

    def __init__(
        self,
        source: DicomSource,
        cache: CacheServer | None,
        *,
        hold_size: int,
        max_flights: int = MAX_FLIGHTS,
        max_held: int = MAX_HELD,
    ) -> None:
        self.source = source
        self.cache = cache
        self.hold_size = hold_size
        self.max_flights = max_flights
        self.max_held = max(1, max_held)
        self.flights: OrderedDict[tuple[str, str], SeriesFlight] = OrderedDict()
        # Flights no longer held but still read (a slow viewer's answer): their memory
        # counts against hold_size until their last reader ends (at most the request bound).
        self.unlisted: list[SeriesFlight] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.writer = WriteThrough(cache.store, source, on_complete=self._cached) if cache else None
        self.retrievals = 0  # series retrieved through the agent
        self.from_cache = 0  # series read from the cache
        self.shared = 0  # requests that joined a flight already there
        self.jumps = 0  # instances retrieved ahead of their series
        self.jumps_first = 0  # ... that came before the series brought them

    @property
    def held(self) -> int:
        """Bytes of series in memory: held, and no longer held but still being read."""
        return sum(f.size for f in self.flights.values()) + self.pinned()

    def pinned(self) -> int:
        """Bytes of flights no longer held that requests still read."""
        self.unlisted = [f for f in self.unlisted if f.readers > 0]
        return sum(f.size for f in self.unlisted)

    def running(self) -> int:
        return sum(not f.done for f in self.flights.values())

    async def series(self, study: str, series: str) -> SeriesFlight:
        """The flight of one series: held, from the cache, or a new retrieval."""
        key = (study, series)
        flight = self.flights.get(key)
        if flight is not None:
            self.flights.move_to_end(key)
            self.shared += 1
            return flight
        if self.running() >= self.max_flights:
            raise UpstreamError(503, f"{self.max_flights} series retrievals already running")
        if self.pinned() >= self.hold_size:
            raise UpstreamError(503, "dicomweb.hold_size is taken by answers still being read")
        # Registered before the first await: a request arriving meanwhile joins this one.
        flight = SeriesFlight(study, series)
        self.flights[key] = flight
        task = asyncio.get_running_loop().create_task(self._fill(flight), name="series flight")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return flight

    async def instance(self, flight: SeriesFlight, sop_instance: str) -> HeldInstance | None:
        """One instance the viewport waits for: from its series, or retrieved ahead of it
        when the series has not brought it within JUMP_AFTER (see the module's text)."""
        waiting = asyncio.ensure_future(flight.get(sop_instance))
        try:
            done, _ = await asyncio.wait({waiting}, timeout=JUMP_AFTER)
            if not done and flight.retrieving and not flight.done:
                self._jump(flight, sop_instance)
            return await waiting
        finally:
            waiting.cancel()

    def _jump(self, flight: SeriesFlight, sop_instance: str) -> None:
        if len(flight.jumping) >= MAX_JUMPS or sop_instance in flight.jumping:
            return
        flight.jumping.add(sop_instance)
        self.jumps += 1
        task = asyncio.get_running_loop().create_task(
            self._ahead(flight, sop_instance), name="instance ahead"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ahead(self, flight: SeriesFlight, sop_instance: str) -> None:
        ident = Dataset()
        ident.QueryRetrieveLevel = "IMAGE"
        ident.StudyInstanceUID = flight.study
        ident.SeriesInstanceUID = flight.series
        ident.SOPInstanceUID = sop_instance
        try:
            async for msg in self.source.retrieve(ident, priority=priorities.VIEWPORT_NEXT):
                if msg.sop_instance != sop_instance or flight.done:
                    continue  # only what was asked; a finished series has its own copy
                if sop_instance not in flight.by_uid:
                    self.jumps_first += 1
                flight.add(HeldInstance(msg.sop_class, msg.sop_instance,
                                        msg.transfer_syntax, bytes(msg.dataset)))  # fmt: skip
                self._bound(flight)
        except UpstreamError as exc:
            log.info("instance ahead of its series not retrieved (%d): the series brings it",
                     exc.http_status)  # fmt: skip
        except Exception as exc:
            log.warning("instance ahead of its series failed: %s", type(exc).__name__)
        finally:
            flight.jumping.discard(sop_instance)

    async def _from_cache(self, flight: SeriesFlight) -> bool:
        if self.cache is None:
            return False
        ident = Dataset()
        ident.QueryRetrieveLevel = "SERIES"
        ident.StudyInstanceUID = flight.study
        ident.SeriesInstanceUID = flight.series
        try:
            plan = await asyncio.to_thread(self.cache.plan, ident)
            if plan is None:
                return False
            # plan() verified every file; read them all before any reader sees one
            held = [HeldInstance(i.sop_class, i.sop_instance, i.transfer_syntax,
                                 await asyncio.to_thread(i.read)) for i in plan]  # fmt: skip
        except Exception as exc:  # a cache fault must never cost the viewer its images
            log.error("cache lookup failed (%s); using the network", type(exc).__name__)
            return False
        for item in held:
            flight.add(item)
        flight.from_cache = True
        self.from_cache += 1
        flight.finish()
        return True

    async def _fill(self, flight: SeriesFlight) -> None:
        if await self._from_cache(flight):
            self._bound(flight)
            return
        self.retrievals += 1
        flight.mark_retrieving()
        ident = Dataset()
        ident.QueryRetrieveLevel = "SERIES"
        ident.StudyInstanceUID = flight.study
        ident.SeriesInstanceUID = flight.series
        error: UpstreamError | None = None
        if self.writer is not None:
            self.writer.start(flight)
        outcome: list[FinalResponse] = []
        try:
            async for msg in self.source.retrieve(ident, outcome):
                flight.add(HeldInstance(msg.sop_class, msg.sop_instance,
                                        msg.transfer_syntax, bytes(msg.dataset)))  # fmt: skip
                self._bound(flight)
                if flight.done:  # failed by _bound: too large
                    return
        except UpstreamError as exc:
            error = exc
        except Exception as exc:
            log.exception("series retrieval failed")
            error = UpstreamError(502, f"retrieval failed: {type(exc).__name__}")
        flight.final = outcome[0] if outcome else None
        if error is None:  # the source raises for these too; the flight checks for itself
            if flight.final is None:
                error = UpstreamError(502, "the retrieve ended without its final response")
            else:
                error = retrieve_failure(flight.final)
        if error is not None or not flight.items:
            self._forget(flight)  # failed, partial or empty: the next request asks again
        flight.finish(error)
        self._bound(flight)

    def _cached(self, study: str, series: str) -> None:
        """The series is complete in the disk cache: later requests read it there."""
        flight = self.flights.get((study, series))
        if flight is not None and flight.done:
            self._forget(flight)

    def _bound(self, growing: SeriesFlight) -> None:
        """Evict finished series no request reads (least recently used first) until the
        memory (`held`: read ones included) fits in `hold_size` bytes and `max_held`
        series. `growing` (the flight that changed) goes last; finished and alone larger
        than `hold_size` (read from the cache), it goes first, keeping the others; still
        retrieving and too large, it fails: 507 alone too large, else 503 (the memory is
        taken by answers being read: the write timeout ends a stalled one)."""
        total = self.held
        if growing.done and growing.size > self.hold_size:
            self._forget(growing)  # its requests have it; the next reads the cache again
            total -= growing.size  # and it does not push the held ones out meanwhile
        kept = sum(f.done for f in self.flights.values())
        for key in list(self.flights):
            if total <= self.hold_size and kept <= self.max_held:
                break
            other = self.flights[key]
            if other is growing or not other.done or other.readers > 0:
                continue  # a flight being read stays in memory held or not: kept to share
            self._forget(other)
            total -= other.size
            kept -= 1
        if total > self.hold_size and not growing.done:
            self._forget(growing)
            if growing.size > self.hold_size:
                growing.finish(UpstreamError(507, "the series is larger than dicomweb.hold_size"))
            else:
                growing.finish(UpstreamError(503, "dicomweb.hold_size is taken by answers "
                                                  "still being read"))  # fmt: skip

    def _forget(self, flight: SeriesFlight) -> None:
        key = (flight.study, flight.series)
        if self.flights.get(key) is flight:
            del self.flights[key]
            if flight.readers > 0:
                self.unlisted.append(flight)

    async def close(self) -> None:
        if self.writer is not None:
            await self.writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for flight in self.flights.values():
            if not flight.done:
                flight.finish(UpstreamError(503, "the workstation is stopping"))
        self.flights.clear()
        self.unlisted.clear()
