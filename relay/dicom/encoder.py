"""The agent's message encoder: zstd or a pixel codec per instance, on a bounded thread pool.

`StreamEncoder` belongs to one stream. Its `encode()` runs on a worker thread (the codecs
and zstd release the GIL): for an instance, and when the workstation decodes the codec
the current `Choice` names, it locates the native pixel data, encodes it, checks that it
decodes to the same bytes (for a codec `proven` exact on the format, only the first of
each kind and then one in SPOT_CHECK: `RateBook.needs_check`), and frames it with
FLAG_PIXELS; anything else is framed as before, and so is an instance the codec does not
pay for (codestreams no smaller than the pixels, or a frame over a limit: a fallback).
Each result carries what it cost, and the loop feeds that, and how long each write took,
into the rates `relay.codecs.choice` decides from.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Final

from relay import codecs
from relay.codecs import choice as ch
from relay.dicom.codec import DicomProtocolError, Instance, Message, MessageCodec, PixelPart

_POOL_LOCK = threading.Lock()
_POOLS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
log = logging.getLogger(__name__)

MIN_PIXELS_BYTES: Final = 16 * 1024  # smaller instances: zstd, not worth a codestream
SPOT_CHECK: Final = 16  # a proven codec's instances: every this many is still checked
# A phase: PHASE_SKIP instances written while the previous phase's bytes drain from the
# stream's window, then PHASE_MEASURE timed ones; only instances encoded in the phase
# count (the pump encodes up to workers + 1 ahead: those went in the previous choice).
PHASE_SKIP: Final = 4
PHASE_MEASURE: Final = 8
# Phases a stream starts with unmeasured, encoding what the model says: the PACS, the
# windows and the far end take a while to reach their pace, and what goes first would
# be flattered (one such phase was not enough: 48 MB/s measured for zstd where the link
# carries 31).
WARMUP_PHASES: Final = 2


def shared_pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    """One pool per size for the whole process: every stream shares the same CPUs."""
    with _POOL_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="dicom-enc")
            _POOLS[workers] = pool
        return pool


@dataclass
class CodecTally:
    """Instances sent in one codec since the agent started, and their bytes."""

    instances: int = 0
    raw_bytes: int = 0  # the datasets as the PACS sent them
    wire_bytes: int = 0  # the frames written to the stream
    fallbacks: int = 0  # instances tried in this codec that went as zstd: it did not pay


class RateBook:
    """What the agent learned about codec ratios and speeds, carried across streams, and
    what it sent in each codec (the `relay_pixel_codec_*` metrics read `tallies`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rates = ch.Rates()
        self._tallies: dict[str, CodecTally] = {}  # keys: ch.ZSTD and the pixel codecs
        # Proven codecs per (codec, bits, signed): instances seen, and those disproven.
        self._spot: dict[tuple[str, int, bool], int] = {}
        self._disproven: set[tuple[str, int, bool]] = set()

    def needs_check(self, codec: str, fmt: codecs.PixelFormat) -> bool:
        """Whether this instance's encoding must be decoded and compared before it goes:
        always for a codec not proven on the format, else the first of each kind and one
        in SPOT_CHECK after it (a library that broke its promise is caught within a few
        instances; the workstation's CRC catches each such instance in any case)."""
        if not codecs.proven(fmt, codec):
            return True
        key = (codec, fmt.bits, fmt.signed)  # at most 2 x 2 x 2 keys
        with self._lock:
            if key in self._disproven:
                return True
            seen = self._spot.get(key, 0)
            self._spot[key] = seen + 1
        return seen % SPOT_CHECK == 0

    def disprove(self, codec: str, fmt: codecs.PixelFormat) -> None:
        """A checked instance did not round-trip: check every one of this kind from now on."""
        key = (codec, fmt.bits, fmt.signed)
        with self._lock:
            if key in self._disproven or not codecs.proven(fmt, codec):
                return
            self._disproven.add(key)
        log.warning(
            "%s did not round-trip %d-bit %s pixels: checking every such instance from now on",
            codec, fmt.bits, "signed" if fmt.signed else "unsigned",
        )  # fmt: skip

    def tally(self, codec: str, raw: int, wire: int) -> None:
        with self._lock:
            t = self._tallies.setdefault(codec, CodecTally())
            t.instances += 1
            t.raw_bytes += raw
            t.wire_bytes += wire

    def fallback(self, codec: str) -> None:
        """An instance tried in `codec` went as zstd (no smaller, or over a limit)."""
        with self._lock:
            self._tallies.setdefault(codec, CodecTally()).fallbacks += 1

    def tallies(self) -> dict[str, CodecTally]:
        """A copy, for a scrape on another thread."""
        with self._lock:
            return {k: replace(v) for k, v in self._tallies.items()}

    def start(self) -> ch.Rates:
        """Rates for a new stream: learned codec rates, the link not measured yet."""
        with self._lock:
            return replace(self._rates, link=None, link_bytes=0.0, link_seconds=0.0)

    def keep(self, rates: ch.Rates) -> None:
        with self._lock:
            self._rates = replace(rates, link=None, link_bytes=0.0, link_seconds=0.0)


@dataclass(frozen=True)
class Encoded:
    """A frame to write, and what producing it cost (for the rates)."""

    frame: bytes
    codec: str  # what it went as: ch.ZSTD, or a pixel codec
    raw: int
    cpu: float
    epoch: int  # the encoder's phase when it was encoded: its write is timed in that one only
    fell_back: str = ""  # the pixel codec tried that did not pay (it went as zstd)


class StreamEncoder:
    """Encoding of one stream's messages; `encode` on any thread, the rest on the loop."""

    def __init__(
        self,
        codec: MessageCodec,
        offered: tuple[str, ...],
        workers: int,
        book: RateBook | None = None,
        *,
        adaptive: bool = True,
    ) -> None:
        self.codec = codec
        self.offered = offered
        self.workers = workers
        self.book = book or RateBook()
        self.rates = self.book.start()
        # Not adaptive (the config names one codec): that codec for every instance it
        # can take, whatever the link (fewest bytes, e.g. a metered link).
        self.adaptive = adaptive or not offered
        # Phases begun, warm-ups included: each Encoded carries the one it was encoded in.
        self.epoch = 0
        self.model = ch.choose(self.rates, offered, workers)
        self.choice = self.model
        if not self.adaptive:
            self.choice = ch.Choice(offered[0], workers)
        self.counts: dict[str, int] = {}  # instances per codec, for the logs and tests
        # End-to-end raw bytes/s per codec, measured in phases (choice.trial).
        self.measured: dict[str, float] = {}
        self.phase = 0
        self.phase_codec = self.choice.codec
        self._new_phase = True  # its codec not picked yet
        self._phase_writes = 0
        self._phase_raw = 0
        self._phase_start = 0.0
        self._warmups = WARMUP_PHASES  # phases left before measuring starts

    @property
    def choice(self) -> ch.Choice:
        """What the next instance is encoded as (and how many workers encode ahead)."""
        return self._under[1]

    @choice.setter
    def choice(self, value: ch.Choice) -> None:
        # One attribute with the epoch: a worker thread reads both at once, never a new
        # phase's epoch with the old phase's choice.
        self._under = (self.epoch, value)

    def encode(self, msg: Message) -> Encoded:
        epoch, choice = self._under
        chosen = choice.codec
        started = time.thread_time()
        fell_back = ""
        if chosen != ch.ZSTD and isinstance(msg, Instance) and len(msg.dataset) >= MIN_PIXELS_BYTES:
            frame, no_gain = self._with_pixels(msg, chosen)
            if frame is not None:
                cpu = time.thread_time() - started
                return Encoded(frame, chosen, len(msg.dataset), cpu, epoch)
            fell_back = chosen if no_gain else ""
        frame = self.codec.encode(msg)
        raw = len(msg.dataset) if isinstance(msg, Instance) else 0
        return Encoded(frame, ch.ZSTD, raw, time.thread_time() - started, epoch, fell_back)

    def _with_pixels(self, msg: Instance, codec: str) -> tuple[bytes | None, bool]:
        """`msg` framed with its pixels as `codec` codestreams, or None for zstd; True
        with None when the codec took the pixels but does not pay: codestreams no smaller
        than the pixels (noise), or a frame over a limit where the plain one may fit (a
        stream reset there would end the retrieve, and its resume would choose the same)."""
        layout = codecs.find_pixels(
            msg.dataset, msg.transfer_syntax, max_bytes=self.codec.limits.max_dataset
        )
        if layout is None:
            return None, False
        pixels = memoryview(msg.dataset)[layout.offset : layout.end]
        enc = codecs.encode(layout.fmt, pixels, codec, verify=False)
        if enc is None:
            return None, False
        if enc.nbytes >= len(pixels):
            return None, True  # before the check: no decode spent on what is not sent
        if self.book.needs_check(codec, layout.fmt) and not codecs.round_trips(enc, pixels):
            self.book.disprove(codec, layout.fmt)
            return None, False
        try:
            return self.codec.encode(msg, PixelPart(enc, layout.offset)), False
        except DicomProtocolError:
            return None, True

    def encoded(self, result: Encoded) -> None:
        """On the loop: learn from an encoded instance."""
        if result.raw:
            self.counts[result.codec] = self.counts.get(result.codec, 0) + 1
            self.book.tally(result.codec, result.raw, len(result.frame))
            if result.fell_back:
                self.book.fallback(result.fell_back)
            self.rates = ch.observe_encode(
                self.rates, result.codec, result.raw, len(result.frame), result.cpu
            )
            self._decide()

    def written(self, result: Encoded, seconds: float, now: float | None = None) -> None:
        """On the loop: the write of `result` took `seconds` to be accepted (ended `now`)."""
        self.rates = ch.observe_link(self.rates, len(result.frame), seconds)
        if result.raw and self.adaptive and self.offered:
            self._phase_step(result, time.monotonic() if now is None else now)
        self._decide()

    def _phase_step(self, result: Encoded, now: float) -> None:
        if result.epoch != self.epoch:
            return  # encoded ahead, in the previous phase's choice: not this one's to time
        raw = result.raw
        self._phase_writes += 1
        if self._phase_writes == PHASE_SKIP:
            self._phase_start, self._phase_raw = now, 0
        elif self._phase_writes > PHASE_SKIP:
            self._phase_raw += raw
        if self._phase_writes < PHASE_SKIP + PHASE_MEASURE:
            return
        self._phase_writes = 0
        self.epoch += 1  # _decide, right after, stamps the next phase's choice with it
        self._new_phase = True
        if self._warmups:
            self._warmups -= 1
            return
        rate = self._phase_raw / max(now - self._phase_start, 1e-6)
        old = self.measured.get(self.phase_codec)
        self.measured[self.phase_codec] = rate if old is None else 0.5 * (old + rate)
        self.phase += 1

    def finish(self) -> None:
        self.book.keep(self.rates)

    def _decide(self) -> None:
        if not self.adaptive:
            return
        self.model = ch.choose(self.rates, self.offered, self.workers)
        if self._new_phase:  # which codec it tries, once: all its instances go in it
            self._new_phase = False
            ranked = ch.contenders(self.rates, self.offered, self.workers)
            ranked = [self.model.codec, *(c for c in ranked if c != self.model.codec)]
            self.phase_codec = ch.trial(ranked, self.measured, self.phase)
        if self._warmups or self.phase_codec == self.model.codec:
            self.choice = self.model
        else:
            self.choice = ch.plan(self.rates, self.phase_codec, self.workers)


def offered_codecs(header: str | None, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """The codecs both ends can use: the workstation's `dicom-pixels` list, ours, config."""
    if not header or not allowed:
        return ()
    theirs = {name.strip() for name in header.split(",")}
    here = codecs.available()
    return tuple(c for c in allowed if c in theirs and c in here)
