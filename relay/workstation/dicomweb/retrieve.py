"""Series for the browser: from the cache when the study is complete there, else retrieved
through the agent once, shared by every request that wants it (single-flight).

A `SeriesFlight` collects a series's instances as they arrive; any number of requests
read it at the same time (`instances()` yields each instance as soon as it is there, so
answers stream). Finished series stay in a holding area bounded by `hold_size` bytes and
`max_held` series (least recently used first out); a series retrieved through the agent
that alone outgrows it fails with 507 rather than grow memory without bound. At most
`max_flights` retrievals and cache look-ups run at once (503 above). A failed retrieval
is forgotten at once, so that the next request tries again; so is a series that came
without instances (404 now, asked again next time: it may reach the PACS later).

Two kinds of instance, one interface (`SeriesItem`: `await item.load()` gives the
dataset bytes): a `HeldInstance` retrieved through the agent holds its bytes; a
`DiskInstance` of a series complete in the disk cache holds only its index entry
(`CacheServer.index`: nothing read when the flight is made), and its bytes are read and
authenticated (`CacheServer.read`, in a worker thread) when a request needs them. So a
cached series costs the holding area only its index (`INDEX_COST` per instance) and
stays there however large it is, and its first frame waits for one file, not the series.
The instances read are kept in `Retriever.reads`, an LRU of `read_budget(hold_size)`
bytes (min(hold_size // 8, 64 MiB)), so OHIF's metadata, frames and repeated requests of
one instance decrypt it once; requests for one instance at the same moment share one
read. One instance larger than that budget (a multi-frame one, whose frames OHIF asks
for one request each) is kept too (`Retriever.large`), counted in `held`: kept only
while it fits within hold_size with the series held, given back first when a series
needs the room (without it each frame request read and decrypted the whole file).
Memory for cached series: their indexes and the large instance (in `held`), the LRU,
and the instance each answer is writing (bounded by the requests in progress). An
instance's frame table (fragments.py: where each frame of encapsulated pixel data is,
made by its first frame request, 12 bytes a frame) is held with it and added to its
flight's size when made (`SeriesFlight.grow`, which runs the bound).

Nothing half-received is served as complete: a retrieve whose final response counts
failed sub-operations or does not say (0xB000 so, 0xA702 after some completed;
`source.retrieve_failure`) ends its flight with that 502 after the instances that came,
so a WADO-RS answer under way is cut without its closing delimiter, one not yet begun
gets the 502, and the partial series is not kept for the next request. A cached file
that does not authenticate when read (or has gone: evicted, wiped) fails its flight the
same way: that request gets a 502 (an answer under way is cut), the flight's other
readers end with it, the damaged entry is dropped and the study fetched again
(`CacheServer.read`, as plan() does), and the flight is forgotten so that the next
request goes to the network. A held cached flight whose series left the cache meanwhile
is not reused (`CacheServer.holds`).

Jump ahead (issue 14: what the viewer asks for next goes first): a series comes in the
PACS's order, so the slice a radiologist scrolls to may be far behind. When the viewport
asks for an instance (`Retriever.instance`) that its series has not brought within
`JUMP_AFTER`, that one instance is retrieved alone, at `priorities.VIEWPORT_NEXT`, ahead of
the series' stream, which carries on behind it. At most `MAX_JUMPS` run per series at
once; the series still brings the instance again later (its bytes cross the link twice:
the price of not waiting), and the flight keeps the first copy. An instance of another
series (a PACS matching the retrieve on its SOP Instance UID alone) is not added.

With the cache enabled, a retrieved series is also written through to it
(relay.workstation.dicomweb.writethrough); once complete there, its memory copy leaves the
holding area and the next request reads the cache. With the cache disabled the holding
area is the only copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, TypeAlias

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID

from relay.dicom.codec import FinalResponse, Instance
from relay.workstation import priorities
from relay.workstation.cache.serve import CacheServer
from relay.workstation.cache.store import CachedInstance
from relay.workstation.dicomweb import fragments, pixelview
from relay.workstation.dicomweb.fragments import FragmentIndex
from relay.workstation.dicomweb.kept import KeptBytes
from relay.workstation.dicomweb.source import DicomSource, UpstreamError, retrieve_failure
from relay.workstation.dicomweb.writethrough import WriteThrough, identify

__all__ = ["DiskInstance", "HeldInstance", "Retriever", "SeriesFlight", "SeriesItem", "decode"]

log = logging.getLogger(__name__)

MAX_FLIGHTS: Final = 8
MAX_HELD: Final = 256  # finished series in the holding area (hold_size bounds their bytes)
JUMP_AFTER: Final = 0.2  # s the viewport's instance may wait for its series to bring it
MAX_JUMPS: Final = 2  # single-instance retrievals ahead of one series, at once
# What one cached instance's index entry is counted in the holding area: its three UIDs,
# syntax and objects (about 0.5 KB in CPython; a 2,000-slice CT's index: ~1 MB).
INDEX_COST: Final = 512
# Cached instances read and kept for their next request (Retriever.reads): a viewer asks
# for an instance's metadata, then its frames, and again as the user scrolls; a 64 MiB
# LRU keeps ~120 CT slices of 0.5 MB, far more than the 6-12 requests a browser has in
# flight at once. At most an eighth of hold_size: it stays a small share of the memory
# granted for the browser (128 KiB at the 1 MiB minimum: larger instances are read per
# request, not kept).
MAX_READS_KEPT: Final = 64 * 1024 * 1024
MAX_READS_ENTRIES: Final = 4096


def read_budget(hold_size: int) -> int:
    """The bytes of cached instances kept read (see MAX_READS_KEPT)."""
    return max(1, min(hold_size // 8, MAX_READS_KEPT))


def decode(data: bytes, transfer_syntax: str, index: FragmentIndex | None = None) -> Dataset:
    """The decoded dataset, with the transfer syntax where pydicom's pixel code looks;
    its Pixel Data a view of `data`, not a copy (pixelview.py); carrying `index`, its
    instance's frame table (`SeriesItem.fragments`), if given."""
    ds = pixelview.read(data, transfer_syntax)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    if index is not None:
        fragments.attach(ds, index)
    return ds


async def _of_series(msg: Instance, flight: SeriesFlight) -> bool:
    """Whether an instance's own Study and Series Instance UIDs are the flight's: a PACS
    that matches an IMAGE-level retrieve on the SOP Instance UID alone sends the instance
    the URL named under another series, and added to this flight it would be served as
    one of its instances (in its WADO-RS answer and metadata) to every viewer of it."""
    try:
        study, series, _ = await asyncio.to_thread(identify, msg.dataset, msg.transfer_syntax)
    except Exception:  # undecodable: not shown as anything
        return False
    return (study, series) == (flight.study, flight.series)


@dataclass
class HeldInstance:
    """One instance as the PACS sent it: its dataset bytes and transfer syntax."""

    sop_class: str
    sop_instance: str
    transfer_syntax: str
    data: bytes
    # where its frames are, once a frame request looked (counted in its flight's size)
    fragments: FragmentIndex = field(default_factory=FragmentIndex, repr=False, compare=False)

    @property
    def footprint(self) -> int:
        """Bytes it keeps in memory when added (counted against hold_size; its frame
        table's are added to its flight's size when made)."""
        return len(self.data)

    async def load(self) -> bytes:
        return self.data


@dataclass
class DiskInstance:
    """One instance of a series complete in the disk cache: its index entry only; `load`
    reads and authenticates it (Retriever.read_cached, through the LRU of reads)."""

    sop_class: str
    sop_instance: str
    transfer_syntax: str
    reader: Callable[[], Awaitable[bytes]] = field(repr=False)
    fragments: FragmentIndex = field(default_factory=FragmentIndex, repr=False, compare=False)

    @property
    def footprint(self) -> int:
        return INDEX_COST

    async def load(self) -> bytes:
        """The dataset bytes; UpstreamError (502) if the file cannot be served."""
        return await self.reader()


SeriesItem: TypeAlias = HeldInstance | DiskInstance


@dataclass
class SeriesFlight:
    study: str
    series: str
    items: list[SeriesItem] = field(default_factory=list)
    by_uid: dict[str, SeriesItem] = field(default_factory=dict)
    size: int = 0
    done: bool = False
    error: UpstreamError | None = None
    from_cache: bool = False
    final: FinalResponse | None = None  # the retrieve's final response (its counts)
    retrieving: bool = False  # not in the cache: being retrieved through the agent
    jumping: set[str] = field(default_factory=set)  # instances retrieved ahead (<= MAX_JUMPS)
    readers: int = 0  # instances() iterations under way (answers being written, cache writes)
    # the holding area's bound, run when the flight grows after its instances came (a
    # frame table made: Retriever._bound)
    on_grow: Callable[[SeriesFlight], None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, item: SeriesItem) -> None:
        if item.sop_instance in self.by_uid:
            return
        self.items.append(item)
        self.by_uid[item.sop_instance] = item
        self.size += item.footprint
        loop = asyncio.get_running_loop()

        def built(nbytes: int) -> None:  # in the worker thread that cut a frame
            with contextlib.suppress(RuntimeError):  # the loop closed: nothing to count
                loop.call_soon_threadsafe(self.grow, nbytes)

        item.fragments.on_built = built
        self._wake()

    def grow(self, nbytes: int) -> None:
        """An instance's frame table was made (`fragments.FragmentIndex.on_built`, here on
        the loop): its bytes count as the flight's, within hold_size."""
        self.size += nbytes
        if self.on_grow is not None:
            self.on_grow(self)

    def finish(self, error: UpstreamError | None = None) -> None:
        self.done = True
        self.error = error
        self._wake()

    def fail(self, error: UpstreamError) -> None:
        """A finished flight found wrong (a cached file unreadable): its readers end with
        `error` instead of completing."""
        if self.error is None:
            self.error = error
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def instances(self) -> AsyncGenerator[SeriesItem, None]:
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

    async def get(self, sop_instance: str) -> SeriesItem | None:
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
        # cached instances read, kept for their next request (see MAX_READS_KEPT)
        self.reads: KeptBytes[str] = KeptBytes(MAX_READS_ENTRIES, read_budget(hold_size))
        # the last cached instance read that is larger than `reads` keeps, within hold_size
        self.large: KeptBytes[str] = KeptBytes(1, hold_size)
        self.retrievals = 0  # series retrieved through the agent
        self.from_cache = 0  # series read from the cache
        self.cache_failures = 0  # cached instances that could not be read (damaged, gone)
        self.shared = 0  # requests that joined a flight already there
        self.jumps = 0  # instances retrieved ahead of their series
        self.jumps_first = 0  # ... that came before the series brought them

    @property
    def held(self) -> int:
        """Bytes of series in memory: held, no longer held but still being read, and the
        large cached instance kept."""
        return sum(f.size for f in self.flights.values()) + self.pinned() + self.large.bytes

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
        if flight is not None and flight.from_cache and not self._still_cached(flight):
            self._forget(flight)  # evicted, wiped or damaged since: look again
            flight = None
        if flight is not None:
            self.flights.move_to_end(key)
            self.shared += 1
            return flight
        if self.running() >= self.max_flights:
            raise UpstreamError(503, f"{self.max_flights} series retrievals already running")
        if self.pinned() >= self.hold_size:
            raise UpstreamError(503, "dicomweb.hold_size is taken by answers still being read")
        # Registered before the first await: a request arriving meanwhile joins this one.
        flight = SeriesFlight(study, series, on_grow=self._bound)
        self.flights[key] = flight
        task = asyncio.get_running_loop().create_task(self._fill(flight), name="series flight")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return flight

    async def instance(self, flight: SeriesFlight, sop_instance: str) -> SeriesItem | None:
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
                if not await _of_series(msg, flight):
                    log.warning("an instance retrieved ahead of its series belongs to "
                                "another series or study; not served as of this one")  # fmt: skip
                    continue
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
        """The series' index from the cache if it is complete there (no file read yet)."""
        if self.cache is None:
            return False
        ident = Dataset()
        ident.QueryRetrieveLevel = "SERIES"
        ident.StudyInstanceUID = flight.study
        ident.SeriesInstanceUID = flight.series
        try:
            entries = await asyncio.to_thread(self.cache.index, ident)
        except Exception as exc:  # a cache fault must never cost the viewer its images
            log.error("cache lookup failed (%s); using the network", type(exc).__name__)
            return False
        if entries is None:
            return False
        for entry in entries:
            read = functools.partial(self.read_cached, flight, entry)
            flight.add(DiskInstance(entry.sop_class, entry.sop_instance, entry.transfer_syntax,
                                    read))  # fmt: skip
        flight.from_cache = True
        self.from_cache += 1
        flight.finish()
        return True

    async def read_cached(self, flight: SeriesFlight, entry: CachedInstance) -> bytes:
        """One cached instance's bytes: kept, being read for another request, or read and
        authenticated now. Unreadable (damaged: dropped by the cache; or gone): the flight
        fails and is forgotten, and this request gets a 502 (see the module's text)."""
        if flight.error is not None:
            raise flight.error
        cache = self.cache
        if cache is None:
            raise UpstreamError(502, "the cache is off")

        async def read() -> bytes:
            generation = self.reads.generation
            try:
                data = await asyncio.to_thread(cache.read, flight.study, entry)
            except Exception as exc:
                log.error("cache read failed (%s)", type(exc).__name__)
                data = None
            if data is None:
                self.cache_failures += 1
                raise UpstreamError(502, "an instance could not be read from the cache; "
                                         "the next request asks the PACS")  # fmt: skip
            if generation == self.reads.generation:  # no wipe meanwhile
                self._keep_large(entry.sop_instance, data)
            return data

        kept = self.large.get(entry.sop_instance)
        if kept is not None:
            return kept
        try:
            return await self.reads.obtain(entry.sop_instance, read)
        except UpstreamError as exc:
            self._forget(flight)
            flight.fail(exc)
            raise

    def _keep_large(self, sop_instance: str, data: bytes) -> None:
        """Keep an instance too large for `reads` if it fits in hold_size with what is
        held (it replaces the one kept before); else it is read per request, as before."""
        if len(data) <= self.reads.max_bytes:
            return  # `reads` keeps it
        if self.held - self.large.bytes + len(data) <= self.hold_size:
            self.large.put(sop_instance, data)

    def _still_cached(self, flight: SeriesFlight) -> bool:
        return self.cache is not None and self.cache.holds(flight.study, flight.series)

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
        than `hold_size` (a cached series whose index alone is: only with a tiny
        hold_size), it goes first, keeping the others; still retrieving and too large, it
        fails: 507 alone too large, else 503 (the memory is taken by answers being read:
        the write timeout ends a stalled one)."""
        total = self.held
        if total > self.hold_size and self.large.bytes:  # a cache of one read: goes first
            total -= self.large.bytes
            self.large.drop()
        if growing.done and growing.size > self.hold_size:
            self._forget(growing)  # its requests have it; the next looks in the cache again
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

    def forget_cached(self) -> None:
        """The disk cache was wiped: drop the instances read from it and the flights of
        cached series (answers under way end with their reads: the files are gone)."""
        self.reads.clear()
        self.large.drop()
        for flight in [f for f in self.flights.values() if f.from_cache]:
            self._forget(flight)

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
        self.reads = KeptBytes(MAX_READS_ENTRIES, read_budget(self.hold_size))
        self.large = KeptBytes(1, self.hold_size)
