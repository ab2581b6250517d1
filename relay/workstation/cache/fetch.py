"""Filling one study through the relay: a C-FIND for its attributes and count, then a
retrieve of only what is missing (a `Skip` of what the cache already holds).

A study is marked complete only when the PACS's final status is a success, no
sub-operation failed, and a count of the PACS's says everything came: the cache holds (new
or skipped as held already) at least the instances the final response counts completed,
and at least the C-FIND's NumberOfStudyRelatedInstances. Both counts are optional in
DICOM; a study for which the PACS gives neither is kept incomplete (fetched again, served
through the agent), never taken as whole. An instance of another study (a PACS that adds
one) is not cached. A write that fails (a full disk, the size cap) abandons the study: it
is dropped, with one log line, and the viewer's requests for it go to the network.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from relay.dicom import rawds
from relay.dicom import status as st
from relay.dicom.codec import (
    VERSION,
    FinalResponse,
    Instance,
    MessageCodec,
    Pending,
    PixelMismatchError,
    Request,
    Skip,
    read_message,
    write_message,
)
from relay.dicom.offer import CodecOffer
from relay.dicom.session import OpenStream, end_stream
from relay.wire import HEADER_DICOM_VERSION, HEADER_PRIORITY, HEADER_TARGET, TARGET_DICOM
from relay.workstation import priorities
from relay.workstation.cache.query import SERIES_KEYS, STUDY_KEYS
from relay.workstation.cache.query import dicom_text as _text
from relay.workstation.cache.store import CachedInstance, CacheFull, CacheStore

log = logging.getLogger(__name__)

MAX_MATCHES = 10_000  # C-FIND matches one prefetch query may bring


class FetchError(Exception):
    """A study could not be filled; one line, no patient data."""


@dataclass
class FetchResult:
    label: str
    instances: int
    new_bytes: int
    seconds: float
    complete: bool


class StudyFetcher:
    """Runs prefetch queries and retrieves on the relay, into `store`, on streams at the
    background urgency (`priorities.PREFETCH`): a viewer's own requests go first."""

    def __init__(
        self,
        open_stream: OpenStream,
        store: CacheStore,
        codec: MessageCodec,
        *,
        timeout: float = 120.0,
        headers: Mapping[str, str] | None = None,
        offer: CodecOffer | None = None,
    ) -> None:
        """`offer`: the pixel codecs to announce (the workstation's, shared by its paths)."""
        self.open_stream = open_stream
        self.store = store
        self.codec = codec
        self.timeout = timeout
        self.offer = offer or CodecOffer()
        self.headers = {
            HEADER_TARGET: TARGET_DICOM,
            HEADER_DICOM_VERSION: str(VERSION),
            HEADER_PRIORITY: priorities.PREFETCH.field(),
            **(headers or {}),
        }

    async def find(self, level: str, keys: Mapping[str, str]) -> list[Dataset]:
        """A C-FIND on the PACS (study root) through the relay."""
        ds = Dataset()
        ds.QueryRetrieveLevel = level
        for keyword, value in keys.items():
            setattr(ds, keyword, value)
        request = Request(op="find", root="study", transfer_syntax=ExplicitVRLittleEndian,
                          dataset=rawds.encode_dataset(ds), calling_ae="RELAYCACHE")  # fmt: skip
        stream = await self.open_stream(self.headers)
        out: list[Dataset] = []
        dropped = 0
        done = False
        try:
            async with asyncio.timeout(self.timeout):
                await write_message(stream, self.codec, request)
                while (msg := await read_message(stream, self.codec)) is not None:
                    if isinstance(msg, Pending) and msg.dataset:
                        if len(out) < MAX_MATCHES:
                            out.append(rawds.decode_dataset(msg.dataset, msg.transfer_syntax))
                        else:
                            dropped += 1
                    elif isinstance(msg, FinalResponse):
                        done = True
                        if dropped:
                            log.warning("a prefetch query matched more than %d studies; "
                                        "%d ignored", MAX_MATCHES, dropped)  # fmt: skip
                        if msg.status not in (st.SUCCESS,):
                            raise FetchError(f"C-FIND failed at the PACS: 0x{msg.status:04X}")
                        return out
        finally:
            await end_stream(stream, done)
        raise FetchError("the C-FIND ended without a final response")

    async def fill(self, study_uid: str, source: str) -> FetchResult:
        """Bring the study into the cache (only what is missing)."""
        started = time.monotonic()
        keys = dict.fromkeys(STUDY_KEYS, "")
        keys["StudyInstanceUID"] = study_uid
        found = await self.find("STUDY", keys)
        if not found:
            raise FetchError("the PACS does not know this study")
        attrs = {k: _text(found[0].get(k)) for k in STUDY_KEYS}
        expected_text = attrs.pop("NumberOfStudyRelatedInstances", "")
        expected = int(expected_text) if expected_text.strip().isdigit() else None
        study = self.store.begin(study_uid, attrs, expected, source)
        have = tuple(study.instances)
        if expected is not None and len(have) >= expected:
            # finish saves the index (synced to disk): a worker thread, not the loop
            await _to_its_end(functools.partial(self.store.finish, study_uid, complete=True))
            return FetchResult(study.label, len(have), 0, time.monotonic() - started, True)
        try:
            new_bytes, final = await self._retrieve(study_uid, have)
        except BaseException:
            # Off the loop too: this save syncs every file the fill wrote. Awaited to its
            # end through any further cancel: the study is never left marked filling, and
            # whoever awaits the fill (a stop, then a wipe) goes on only after the save.
            await _to_its_end(functools.partial(self.store.finish, study_uid, complete=False))
            raise
        ok = final.status == st.SUCCESS and not final.failed
        done = functools.partial(self.store.finish, study_uid, complete=ok, counted=final.completed)
        await _to_its_end(done)  # as above: a cancel meanwhile ends the fill after its save
        study = self.store.study(study_uid) or study
        result = FetchResult(study.label, len(study.instances), new_bytes,
                             time.monotonic() - started, study.complete)  # fmt: skip
        log.info(
            "prefetched %s: %d instances (%d new bytes) in %.2f s, %s",
            result.label, result.instances, result.new_bytes, result.seconds,
            "complete" if result.complete else "incomplete",
        )  # fmt: skip
        return result

    async def _retrieve(self, study_uid: str, have: tuple[str, ...]) -> tuple[int, FinalResponse]:
        """The new bytes cached and the retrieve's final response (CacheStore.finish
        weighs its counts against the instances held)."""
        ident = Dataset()
        ident.QueryRetrieveLevel = "STUDY"
        ident.StudyInstanceUID = study_uid
        request = Request(op="retrieve", root="study", transfer_syntax=ExplicitVRLittleEndian,
                          dataset=rawds.encode_dataset(ident), calling_ae="RELAYCACHE",
                          resume=bool(have))  # fmt: skip
        stream = await self.open_stream({**self.offer.header(), **self.headers})
        new_bytes = 0
        done = False
        try:
            async with asyncio.timeout(self.timeout):
                await write_message(stream, self.codec, request)
                if have:
                    await write_message(stream, self.codec, Skip(have))
            while True:
                try:
                    async with asyncio.timeout(self.timeout):
                        msg = await read_message(stream, self.codec, offload=True)
                except PixelMismatchError as exc:
                    self.offer.distrust(exc.codec)  # the next attempt comes without it
                    raise FetchError(f"an instance failed its pixel check ({exc.codec})") from None
                if msg is None:
                    raise FetchError("the relay stream ended before the final response")
                if isinstance(msg, Instance):
                    new_bytes += await self._store(study_uid, msg)
                elif isinstance(msg, FinalResponse):
                    done = True
                    return new_bytes, msg
        finally:
            await end_stream(stream, done)

    async def _store(self, study_uid: str, msg: Instance) -> int:
        study_of, series, series_attrs = await asyncio.to_thread(_series_of, msg)
        if study_of != study_uid:
            study = self.store.study(study_uid)
            log.warning("prefetch of %s: the PACS sent an instance of another study; "
                        "not cached", study.label if study else "a study")  # fmt: skip
            return 0
        inst = CachedInstance(msg.sop_class, msg.sop_instance, series, msg.transfer_syntax, 0)
        try:
            await asyncio.to_thread(self.store.put, study_uid, inst, bytes(msg.dataset))
        except (CacheFull, OSError) as exc:
            study = self.store.study(study_uid)
            label = study.label if study else "a study"
            await asyncio.to_thread(self.store.evict, [study_uid], "abandoned")
            raise FetchError(f"cannot cache {label}: {type(exc).__name__}: {exc}") from None
        self.store.note_series(study_uid, series, series_attrs)
        return len(msg.dataset)


async def _to_its_end(work: Callable[[], None]) -> None:
    """`work()` in a worker thread, awaited until it has returned even if this task is
    cancelled meanwhile (once or more: the cancel is raised afterwards). `shield` alone
    let a second cancel end the task while the work still ran."""
    running = asyncio.ensure_future(asyncio.to_thread(work))
    cancelled = False
    while not running.done():
        try:
            await asyncio.wait({running})
        except asyncio.CancelledError:
            cancelled = True
    running.result()
    if cancelled:
        raise asyncio.CancelledError


def _series_of(msg: Instance) -> tuple[str, str, dict[str, str]]:
    """The instance's own Study and Series Instance UIDs, and its series attributes."""
    ds = rawds.decode_dataset(bytes(msg.dataset), msg.transfer_syntax)
    attrs = {k: _text(ds.get(k)) for k in SERIES_KEYS}
    return str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", "")), attrs
