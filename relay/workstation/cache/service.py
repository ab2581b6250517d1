"""The workstation's cache as one object: key, store, serving, fetching, prefetching.

Started with the workstation when `cache.enabled` (the default); wiped on `relay cache
wipe`, at expiry (a sweep every `SWEEP` seconds at most), and when the device learns it
was revoked (`wipe("revoked")`, which also forgets a keyring key).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from relay.dicom.codec import DicomLimits, MessageCodec
from relay.dicom.offer import CodecOffer
from relay.dicom.session import OpenStream
from relay.dicom.uids import is_conformant_uid
from relay.ops.control import Handler
from relay.workstation.cache.cli import MAX_PREFETCH
from relay.workstation.cache.fetch import StudyFetcher
from relay.workstation.cache.keys import KeyMode, forget_master_key, load_master_key
from relay.workstation.cache.metrics import CacheMetrics
from relay.workstation.cache.prefetch import Prefetcher
from relay.workstation.cache.sealing import Sealer
from relay.workstation.cache.serve import CacheServer
from relay.workstation.cache.settings import CacheConfig, PrefetchConfig
from relay.workstation.cache.store import CacheStore

log = logging.getLogger(__name__)

SWEEP = 60.0


class WorkstationCache:
    def __init__(
        self,
        config: CacheConfig,
        prefetch: PrefetchConfig,
        open_stream: OpenStream,
        link_up: Callable[[], asyncio.Event],
        *,
        account: str,
        legacy_account: str | None = None,
        offer: CodecOffer | None = None,
    ) -> None:
        """`offer`: the pixel codecs the prefetcher announces (the workstation's);
        `legacy_account`: where an older version kept the keyring key (moved to `account`)."""
        self.config = config
        self.account = account
        self.key_mode: KeyMode = "keyring" if config.key == "keyring" else "memory"
        key, fresh = load_master_key(self.key_mode, account, legacy_account)
        self.metrics = CacheMetrics(self)
        self.store = CacheStore(
            config.dir, Sealer(key), max_size=config.max_size, max_age=config.max_age,
            persist_index=self.key_mode == "keyring", on_drop=self.metrics.dropped,
        )  # fmt: skip
        self._fresh = fresh
        self.link_up = link_up
        self.fetcher = StudyFetcher(
            open_stream, self.store, MessageCodec(DicomLimits(), accept_pixels=True), offer=offer
        )
        self.prefetcher = Prefetcher(self.fetcher, self.store, prefetch, link_up)
        self.server = CacheServer(self.store, self.offline, self.prefetcher.refetch,
                                  serve_buffer=config.serve_buffer)  # fmt: skip
        self._sweeper: asyncio.Task[None] | None = None
        # called on the loop after `relay cache wipe`: copies held elsewhere in memory go too
        self.on_wiped: list[Callable[[], None]] = []

    def offline(self) -> bool:
        return not self.link_up().is_set()

    async def start(self) -> None:
        await asyncio.to_thread(self.store.open, fresh_key=self._fresh)
        self.prefetcher.start()
        self._sweeper = asyncio.create_task(self._sweep(), name="cache expiry")
        log.info("cache ready", extra={"dir": str(self.config.dir), "key": self.key_mode})

    async def stop(self) -> None:
        """Stop fetching; with the key in memory also erase the files (useless once the
        process ends, and less ciphertext left on the disk); a crash leaves them to the
        next start's wipe."""
        await self.prefetcher.stop()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self.key_mode == "memory":
            await asyncio.to_thread(self.store.close_temporary)

    async def _sweep(self) -> None:
        pause = max(1.0, min(SWEEP, self.config.max_age / 10))
        while True:
            await asyncio.sleep(pause)
            await asyncio.to_thread(self.store.purge_expired)

    async def wipe_revoked(self) -> int:
        """The wipe of a revocation, off the event loop (it takes ~0.3 s of disk work).

        The prefetcher stops first, so no fetch begins a study meanwhile; a write already
        under way (a fetch or a viewer's retrieval written through, on their threads)
        meets the store's lock: the wipe holds it from emptying the index to the last
        file, and a write that lands after finds its study gone and removes its file.
        """
        await self.prefetcher.stop()
        return await asyncio.to_thread(self.wipe, "revoked")

    def wipe(self, reason: str) -> int:
        """Erase the cache; for a revocation also forget the key, whatever the wipe meets:
        the keyring's, and this process's (a file left on disk opens no more)."""
        try:
            return self.store.wipe(reason)
        finally:
            if reason == "revoked":
                self.store.sealer = Sealer(Sealer.new_key())
                forget_master_key(self.key_mode, self.account)

    # -- what `relay prefetch` and `relay cache` ask (control handlers) --------------

    async def cmd_prefetch(self, args: dict[str, Any]) -> dict[str, Any]:
        """Queue the named studies, each once; counted truthfully: `queued` (new in the
        queue), `already` (queued, being fetched, or complete in the cache), `refused`
        (not a UID, beyond MAX_PREFETCH distinct ones, or the queue full; those last named
        in `queue_full`), `duplicates` (named again, not counted otherwise)."""
        studies = args.get("studies", [])
        if not isinstance(studies, list):
            return {"ok": False, "error": "studies: not a list of study UIDs"}
        unique: dict[str, None] = {}
        invalid = duplicates = 0
        for uid in studies:
            if not is_conformant_uid(uid):
                invalid += 1
            elif uid in unique:
                duplicates += 1
            else:
                unique[uid] = None
        chosen = list(unique)[:MAX_PREFETCH]
        over_limit = len(unique) - len(chosen)
        queued = already = 0
        full: list[str] = []
        p = self.prefetcher
        for uid in chosen:
            if uid in p.pending or uid == p.current:
                already += 1
                continue
            study = self.store.study(uid)
            cached = study is not None and study.complete
            added = p.add(uid, "command")  # a cached one too: its touch, its priors
            if cached:  # held whether or not that fitted the queue
                already += 1
            elif added:
                queued += 1
            else:
                full.append(uid)
        refused = invalid + over_limit + len(full)
        if refused:
            log.warning("relay prefetch: %d of %d studies refused (%d not a UID, %d over %d "
                        "at once, %d with the queue full)", refused, len(studies), invalid,
                        over_limit, MAX_PREFETCH, len(full))  # fmt: skip
        log.info("relay prefetch: %d studies queued, %d already queued or cached", queued,
                 already)  # fmt: skip
        return {
            "ok": True, "queued": queued, "already": already, "refused": refused,
            "queue_full": full, "invalid": invalid, "over_limit": over_limit,
            "duplicates": duplicates,
        }  # fmt: skip

    async def cmd_status(self, args: dict[str, Any]) -> dict[str, Any]:
        names = bool(args.get("names"))
        now = time.time()
        studies = []
        for s in sorted(self.store.snapshot(), key=lambda s: s.seq):
            entry: dict[str, Any] = {
                "label": s.label,
                "state": "complete" if s.complete else "filling" if s.filling else "incomplete",
                "instances": len(s.instances),
                "expected": s.expected,
                "bytes": s.size,
                "age_s": round(now - s.created, 1),
                "source": s.source,
                "modalities": s.attrs.get("ModalitiesInStudy", ""),
            }
            if names:
                entry["patient"] = s.attrs.get("PatientName", "")
                entry["description"] = s.attrs.get("StudyDescription", "")
                entry["study_uid"] = s.uid
            studies.append(entry)
        return {
            "ok": True,
            "bytes": self.store.total,
            "max_bytes": self.store.max_size,
            "queued": self.prefetcher.queue.qsize(),
            "studies": studies,
        }

    async def cmd_wipe(self, args: dict[str, Any]) -> dict[str, Any]:
        try:
            wiped = await asyncio.to_thread(self.wipe, "wiped")
        finally:
            for forget in self.on_wiped:
                forget()
        return {"ok": True, "wiped": wiped}

    async def cmd_evict(self, args: dict[str, Any]) -> dict[str, Any]:
        labels = {str(x) for x in args.get("studies", [])}
        chosen = [s.uid for s in self.store.snapshot() if s.label in labels or s.uid in labels]
        evicted = await asyncio.to_thread(self.store.evict, chosen, "evicted")
        return {"ok": True, "evicted": evicted}

    def handlers(self) -> dict[str, Handler]:
        """The commands this cache adds to the workstation's control endpoint."""
        return {
            "prefetch": self.cmd_prefetch,
            "cache-status": self.cmd_status,
            "cache-wipe": self.cmd_wipe,
            "cache-evict": self.cmd_evict,
        }
