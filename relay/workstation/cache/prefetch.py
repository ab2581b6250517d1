"""What to fetch ahead: worklist rules, `relay prefetch`, and each study's priors.

One bounded queue of study UIDs (`prefetch.queue`; a full queue refuses and counts), one
worker that fills them one at a time (prefetch takes what the link leaves; the viewer's
own requests are separate streams), one task per worklist rule. A study already complete
in the cache is skipped; a damaged one is queued again (`refetch`). With the link down
the worker waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from functools import partial

from relay.workstation.cache.fetch import FetchError, StudyFetcher
from relay.workstation.cache.settings import PrefetchConfig, PrefetchRule
from relay.workstation.cache.store import CacheStore

log = logging.getLogger(__name__)


@dataclass
class PrefetchCounters:
    queued: int = 0
    refused: int = 0  # the queue was full
    done: dict[str, int] = field(default_factory=lambda: {"complete": 0, "incomplete": 0,
                                                         "failed": 0})  # fmt: skip
    rule_runs: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class Job:
    study_uid: str
    source: str
    priors: bool


class Prefetcher:
    """Owns the queue, the worker and the rule tasks; `start()`, `stop()`."""

    def __init__(
        self,
        fetcher: StudyFetcher,
        store: CacheStore,
        config: PrefetchConfig,
        link_up: Callable[[], asyncio.Event],
        *,
        today: Callable[[], date] = date.today,
    ) -> None:
        self.fetcher = fetcher
        self.store = store
        self.config = config
        self.link_up = link_up
        self.today = today
        self.queue: asyncio.Queue[Job] = asyncio.Queue(config.queue)
        self.pending: set[str] = set()
        self.current: str | None = None
        self.counters = PrefetchCounters()
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._tasks.append(asyncio.create_task(self._worker(), name="prefetch worker"))
        for rule in self.config.rules:
            self._tasks.append(asyncio.create_task(self._rule(rule), name=f"rule {rule.name}"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()

    # -- queueing -----------------------------------------------------------------------

    def add(self, study_uid: str, source: str, *, priors: bool = True) -> bool:
        """Queue one study (on the loop); False when the queue is full."""
        if study_uid in self.pending or study_uid == self.current:
            return True
        try:
            self.queue.put_nowait(Job(study_uid, source, priors))
        except asyncio.QueueFull:
            self.counters.refused += 1
            log.warning("prefetch queue full (prefetch.queue %d); a study was not queued",
                        self.config.queue)  # fmt: skip
            return False
        self.pending.add(study_uid)
        self.counters.queued += 1
        return True

    def refetch(self, study_uid: str) -> None:
        """From any thread: a damaged study goes back into the queue."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(partial(self.add, study_uid, "refetch", priors=False))

    # -- the worker ---------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            job = await self.queue.get()
            self.pending.discard(job.study_uid)
            self.current = job.study_uid  # while it waits for the link too: not queued twice
            try:
                await self.link_up().wait()
                await self._one(job)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one study's failure never stops the worker
                self.counters.done["failed"] += 1
                log.warning("prefetch of a study failed: %s", _why(exc))
            finally:
                self.current = None

    async def _one(self, job: Job) -> None:
        study = self.store.study(job.study_uid)
        if study is not None and study.complete:
            self.store.touch(job.study_uid)
        else:
            result = await self.fetcher.fill(job.study_uid, job.source)
            self.counters.done["complete" if result.complete else "incomplete"] += 1
            self.counters.bytes += result.new_bytes
            self.counters.seconds += result.seconds
        if job.priors and self.config.priors > 0:
            for uid in await self._priors(job.study_uid):
                self.add(uid, "prior", priors=False)

    async def _priors(self, study_uid: str) -> list[str]:
        """The same patient's most recent earlier studies (same modality unless `any`)."""
        study = self.store.study(study_uid)
        if study is None:
            return []
        pid = study.attrs.get("PatientID", "")
        if not pid:
            return []
        found = await self.fetcher.find("STUDY", {
            "PatientID": pid, "StudyInstanceUID": "", "StudyDate": "", "StudyTime": "",
            "ModalitiesInStudy": "",
        })  # fmt: skip
        mine = (study.attrs.get("StudyDate", ""), study.attrs.get("StudyTime", ""))
        modalities = set(study.attrs.get("ModalitiesInStudy", "").split("\\")) - {""}
        earlier = []
        for ds in found:
            uid = str(ds.get("StudyInstanceUID", ""))
            when = (str(ds.get("StudyDate", "") or ""), str(ds.get("StudyTime", "") or ""))
            mods = ds.get("ModalitiesInStudy", "")
            theirs = set(str(mods).split("\\") if isinstance(mods, str) else map(str, mods))
            if uid == study_uid or not uid or when >= mine:
                continue
            if (
                self.config.priors_modality == "same"
                and modalities
                and not modalities & {str(m) for m in theirs}
            ):
                continue
            earlier.append((when, uid))
        earlier.sort(reverse=True)
        return [uid for _, uid in earlier[: self.config.priors]]

    # -- worklist rules --------------------------------------------------------------------

    async def _rule(self, rule: PrefetchRule) -> None:
        while True:
            await self.link_up().wait()
            try:
                keys = {"StudyInstanceUID": "", **rule.criteria(self.today())}
                found = await self.fetcher.find("STUDY", keys)
                self.counters.rule_runs[rule.name] = self.counters.rule_runs.get(rule.name, 0) + 1
                added = 0
                for ds in found:
                    uid = str(ds.get("StudyInstanceUID", "") or "")
                    study = self.store.study(uid)
                    if uid and (study is None or not study.complete):
                        added += self.add(uid, f"rule:{rule.name}")
                log.info("prefetch rule %s: %d matches, %d queued", rule.name, len(found), added)
            except asyncio.CancelledError:
                raise
            except (FetchError, Exception) as exc:
                log.warning("prefetch rule %s failed: %s", rule.name, _why(exc))
            await asyncio.sleep(rule.every)


def _why(exc: BaseException) -> str:
    """Our own errors' text (written without patient data), others' type only."""
    if isinstance(exc, FetchError):
        return str(exc)
    return type(exc).__name__
