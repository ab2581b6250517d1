"""Series metadata before the pixels: a headers-only retrieval beside the series flight.

OHIF shows nothing before it has the WADO-RS metadata of the whole series. Answering that
from the series flight means waiting for every pixel to cross the link; so, for a series
being retrieved through the agent, a second retrieval of the same series runs with
`dicom-content: headers` (relay/dicom/headers_only.py): the agent runs the same C-GET
at the PACS (its LAN is fast) and sends each instance without its Pixel Data value, a
few KB each. The metadata is answered from those headers once they are complete: the
retrieve's final status success, nothing failed, and its completed count equal to the
instances received. Anything else (a failure, a short count, too many bytes) and the
metadata waits for the series flight as before: never a partial list as complete.

An older agent ignores the header and sends whole instances: the first instance with a
Pixel Data value stops the headers retrieval (the stream is reset, the agent aborts it)
and no headers retrieval is started for `RETRY_OLD_AGENT` seconds.

Bounded: `max_bytes` per series, `max_running` retrievals at once (more: the metadata
uses the series flight), completed sets kept for at most `max_kept` series and
`max_kept_bytes` in all (LRU).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Final, cast

from pydicom.dataset import Dataset

from relay.dicom import status as st
from relay.dicom.codec import FinalResponse, Instance
from relay.dicom.headers_only import pixel_data_length
from relay.dicom.rawds import MalformedDataset
from relay.workstation.dicomweb.retrieve import HeldInstance
from relay.workstation.dicomweb.source import DicomSource, UpstreamError

__all__ = ["HeadFirst", "HeaderSet"]

log = logging.getLogger(__name__)

MAX_BYTES: Final = 32 * 1024 * 1024  # headers of one series (a 2,000-slice CT: ~10 MB)
MAX_RUNNING: Final = 4
MAX_KEPT: Final = 16
MAX_KEPT_BYTES: Final = 64 * 1024 * 1024  # all finished sets together
RETRY_OLD_AGENT: Final = 600.0  # seconds without trying after an agent sent whole instances


class _Stop(Exception):
    """End a headers retrieval early with `reason`."""


@dataclass
class HeaderSet:
    """The headers of one series' instances; `complete` once the final says all came."""

    study: str
    series: str
    items: list[HeldInstance] = field(default_factory=list)
    uids: set[str] = field(default_factory=set)
    size: int = 0
    done: bool = False
    complete: bool = False
    reason: str = ""  # why not complete (no patient data)
    _finished: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, item: HeldInstance) -> None:
        if item.sop_instance in self.uids:
            return
        self.uids.add(item.sop_instance)
        self.items.append(item)
        self.size += len(item.data)

    def finish(self, complete: bool, reason: str = "") -> None:
        self.done, self.complete, self.reason = True, complete, reason
        self._finished.set()

    async def wait(self) -> bool:
        """True once complete; False if it ended otherwise."""
        await self._finished.wait()
        return self.complete


def counts_match(final: FinalResponse | None, received: int) -> bool:
    """The retrieve says every instance came: success, none failed, completed == received."""
    return (
        final is not None
        and final.status == st.SUCCESS
        and not final.failed
        and final.completed == received
    )


class HeadFirst:
    """The headers-only retrievals; `source()` is the relay's DICOM operations."""

    def __init__(
        self,
        source: Callable[[], DicomSource],
        *,
        max_bytes: int = MAX_BYTES,
        max_running: int = MAX_RUNNING,
        max_kept: int = MAX_KEPT,
        max_kept_bytes: int = MAX_KEPT_BYTES,
    ) -> None:
        self.source = source
        self.max_bytes = max_bytes
        self.max_running = max_running
        self.max_kept = max_kept
        self.max_kept_bytes = max_kept_bytes
        self.sets: OrderedDict[tuple[str, str], HeaderSet] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._old_agent_until = 0.0
        self.started = 0
        self.answered = 0  # metadata answers made from headers (app.py counts)
        self.fell_back = 0  # headers retrievals that did not complete
        self.completed = 0  # headers retrievals that did (answering or not)

    def running(self) -> int:
        return sum(not s.done for s in self.sets.values())

    def get(self, study: str, series: str) -> HeaderSet | None:
        found = self.sets.get((study, series))
        if found is not None:
            self.sets.move_to_end((study, series))
        return found

    def start(self, study: str, series: str) -> HeaderSet | None:
        """The series' header set: kept, running, or started now; None when none may
        start (at `max_running`, or the agent sent whole instances lately)."""
        found = self.get(study, series)
        if found is not None and (not found.done or found.complete):
            return found
        loop = asyncio.get_running_loop()
        if loop.time() < self._old_agent_until or self.running() >= self.max_running:
            return None
        hs = HeaderSet(study, series)
        self.sets[(study, series)] = hs
        self.sets.move_to_end((study, series))
        self.started += 1
        task = loop.create_task(self._run(hs), name="series headers")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._trim()
        return hs

    def _trim(self) -> None:
        """Forget finished sets (least recently used first) beyond `max_kept` sets or
        `max_kept_bytes` (running ones are bounded by `max_bytes` each)."""
        kept = sum(s.size for s in self.sets.values() if s.done)
        for key in [k for k, s in self.sets.items() if s.done]:
            if len(self.sets) <= self.max_kept and kept <= self.max_kept_bytes:
                return
            kept -= self.sets.pop(key).size

    async def _run(self, hs: HeaderSet) -> None:
        ident = Dataset()
        ident.QueryRetrieveLevel = "SERIES"
        ident.StudyInstanceUID = hs.study
        ident.SeriesInstanceUID = hs.series
        outcome: list[FinalResponse] = []
        reason = ""
        started = asyncio.get_running_loop().time()
        try:
            retrieval = cast(  # an async generator: closed early, it resets the stream
                "AsyncGenerator[Instance, None]",
                self.source().retrieve(ident, outcome, headers_only=True),
            )
            async with contextlib.aclosing(retrieval) as instances:
                async for msg in instances:
                    try:
                        pixels = pixel_data_length(msg.dataset, msg.transfer_syntax)
                    except MalformedDataset:
                        raise _Stop("a malformed instance") from None
                    if pixels != 0:
                        self._old_agent_until = asyncio.get_running_loop().time() + RETRY_OLD_AGENT
                        log.info("the agent sent whole instances for a headers-only retrieval "
                                 "(an older agent): metadata waits for the series")  # fmt: skip
                        raise _Stop("the agent sent whole instances")
                    hs.add(HeldInstance(msg.sop_class, msg.sop_instance,
                                        msg.transfer_syntax, bytes(msg.dataset)))  # fmt: skip
                    if hs.size > self.max_bytes:
                        raise _Stop(f"headers larger than {self.max_bytes} bytes")
        except _Stop as exc:
            reason = str(exc)
        except UpstreamError as exc:
            # The reason may quote the PACS's ErrorComment (patient data): not logged.
            reason = f"the retrieval failed ({exc.http_status})"
        except Exception as exc:
            reason = f"failed: {type(exc).__name__}"
        if not reason and not counts_match(outcome[0] if outcome else None, len(hs.items)):
            reason = "the retrieve's final counts do not match the instances received"
        if reason:
            self.fell_back += 1
            hs.items.clear()
            hs.size = 0
            log.info("series headers not used: %s", reason)
            hs.finish(False, reason)
            return
        self.completed += 1
        hs.finish(True)
        log.info("series headers complete: %d instances, %d KB in %.2f s", len(hs.items),
                 hs.size // 1024, asyncio.get_running_loop().time() - started)  # fmt: skip
        self._trim()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for hs in self.sets.values():
            if not hs.done:
                hs.finish(False, "stopping")
        self.sets.clear()
