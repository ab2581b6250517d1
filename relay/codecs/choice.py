"""Which transport codec for the next instance: a pure function of measured rates.

Per raw byte, a pipeline of `w` encoder threads feeding a link costs
max(1 / (w x encode rate), 1 / (ratio x link rate), 1 / decode rate): the slowest of the
agent's CPU, the wire and the workstation's (single-threaded) decoding. `contenders`
ranks the options by that cost; plain zstd wins ties, so a codec is only a contender when
it is faster, and `plan` gives the fewest workers that keep the CPU from being the
bottleneck. The model cannot see CPU the two ends share or other load, so `trial` tries
the top contenders and zstd in turn and keeps what measured fastest end to end, unless
that is within the measurements' noise of the model's pick (MARGIN). Encode rates include
the agent's check (a decode and a compare) where it runs.

`Rates` holds the agent's estimates: exponentially weighted averages of what it measures
(`observe_*`), starting from priors measured on CT (docs/internals/codecs.md). The link
rate is bytes written per second of time spent blocked in `write` (the stream takes bytes
as the far end acknowledges them), so an idle link reads as fast and a saturated one at its
real speed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Final

ZSTD: Final = "zstd"

# Priors (one core of the development machine, synthetic 512x512 CT, 16-bit): ratio and
# raw bytes per CPU second, encode and decode. Encode includes the agent's check where it
# runs on every instance (JPEG XL); JPEG-LS and HTJ2K are proven exact on grayscale and
# checked on a sample (relay.dicom.encoder.SPOT_CHECK).
PRIOR_RATIO: Final = {ZSTD: 2.5, "jpegls": 3.3, "htj2k": 2.9, "jpegxl": 3.07}
PRIOR_ENCODE: Final = {ZSTD: 150e6, "jpegls": 75e6, "htj2k": 150e6, "jpegxl": 110e6}
PRIOR_DECODE: Final = {ZSTD: 800e6, "jpegls": 120e6, "htj2k": 280e6, "jpegxl": 215e6}
PRIOR_LINK: Final = 12.5e6  # bytes/s (100 Mbit/s) assumed for the first instance
MARGIN: Final = 0.1  # a measured rate must beat the model's pick by this much to replace it
MAX_CONTENDERS: Final = 2  # image codecs tried against zstd on one stream
_WEIGHT: Final = 0.3  # of a new measurement in the running average


@dataclass(frozen=True)
class Choice:
    codec: str  # ZSTD or an image codec name
    workers: int  # encoder threads worth using


@dataclass(frozen=True)
class Rates:
    """What the agent knows: per codec, ratio and rates; the link in wire bytes/s."""

    link: float | None = None  # None: nothing measured yet
    # The link estimate is a ratio of averages: (average bytes per write) / (average
    # seconds a write was blocked). Writes that the stream took at once (window credit
    # left) add bytes but no time; an average of per-write speeds would count each of
    # them as an absurdly fast link and take long to forget it.
    link_bytes: float = 0.0
    link_seconds: float = 0.0
    ratio: dict[str, float] = field(default_factory=lambda: dict(PRIOR_RATIO))
    encode: dict[str, float] = field(default_factory=lambda: dict(PRIOR_ENCODE))
    decode: dict[str, float] = field(default_factory=lambda: dict(PRIOR_DECODE))


def _stages(rates: Rates, codec: str, link: float | None) -> tuple[float, float, float]:
    """Seconds per raw byte of one encoder thread, of the link (0 if unknown), and of
    the decoder, for `codec`."""
    encode = 1.0 / rates.encode.get(codec, PRIOR_ENCODE.get(codec, 1e6))
    decode = 1.0 / rates.decode.get(codec, PRIOR_DECODE.get(codec, 1e6))
    wire = 1.0 / (rates.ratio.get(codec, 1.0) * link) if link else 0.0
    return encode, wire, decode


def cost(rates: Rates, codec: str, workers: int) -> float:
    """Seconds per raw byte through encoder, link and decoder for `codec` (a pipeline:
    the slowest stage)."""
    encode, wire, decode = _stages(rates, codec, rates.link)
    return max(encode / workers, wire, decode)


def latency(rates: Rates, codec: str, link: float) -> float:
    """Seconds per raw byte for one instance alone: encoded, sent, then decoded."""
    return sum(_stages(rates, codec, link))


def choose(rates: Rates, offered: tuple[str, ...], max_workers: int) -> Choice:
    """The codec (ZSTD or one of `offered`) and worker count with the least cost.

    Before the link has been measured (the stream's first instance, which the viewer
    waits for), the option that gets one instance across soonest at PRIOR_LINK:
    encoding, wire and decoding add up for a lone instance. From the first write on, the
    link is measured.
    """
    max_workers = max(1, max_workers)
    if offered and rates.link is None:
        best = min((*offered, ZSTD), key=lambda c: latency(rates, c, PRIOR_LINK))
        return Choice(best, max_workers)
    ranked = contenders(rates, offered, max_workers, limit=len(offered))
    return plan(rates, ranked[0], max_workers)


def plan(rates: Rates, codec: str, max_workers: int) -> Choice:
    """`codec` with the fewest workers that keep the CPU from being its bottleneck (zstd
    too: on a fast link it is what the agent's CPU spends its time on)."""
    max_workers = max(1, max_workers)
    best = cost(rates, codec, max_workers)
    workers = next(w for w in range(1, max_workers + 1) if cost(rates, codec, w) <= best * 1.02)
    return Choice(codec, workers)


def contenders(
    rates: Rates, offered: tuple[str, ...], max_workers: int, limit: int = MAX_CONTENDERS
) -> list[str]:
    """The image codecs the model expects to beat zstd, cheapest first (at most `limit`),
    then ZSTD; only ZSTD when none is clearly (2%) cheaper."""
    zstd = cost(rates, ZSTD, max(1, max_workers))
    scored = sorted((cost(rates, c, max(1, max_workers)), i, c) for i, c in enumerate(offered))
    better = [c for score, _, c in scored if score * 1.02 < zstd]
    return [*better[:limit], ZSTD]


def trial(ranked: list[str], measured: Mapping[str, float], phase: int, recheck: int = 8) -> str:
    """The codec for the next phase of instances: the model's contenders, checked in use.

    `ranked`: `contenders()`, the model's order, ZSTD last. `measured`: raw bytes per
    second each codec delivered end to end in earlier phases (encoder, link and the
    workstation included: a workstation short of CPU slows the stream as a slow link
    would, and only a measurement tells them apart; so does a machine whose CPU the two
    ends share). Each contender is tried once in order, then the fastest measured is
    kept (the model's pick if none beats it by MARGIN: phase rates vary by about 10% on
    a shared machine, and the model knows ratios that a phase cannot see), with every
    `recheck`-th phase given to the other contenders in turn (conditions change). A
    codec measured earlier stays eligible when the model drops it (its link estimate
    swings: docs/internals/codecs.md), but is not tried again.
    """
    for codec in ranked:
        if codec not in measured:
            return codec
    known = [*ranked, *(c for c in measured if c not in ranked)]
    best = max(known, key=lambda c: measured[c])
    lead = ranked[0]
    if lead in measured and measured[best] <= measured[lead] * (1 + MARGIN):
        best = lead  # within the measurements' noise: the model's reasoning decides
    others = sorted((c for c in ranked if c != best), key=lambda c: -measured[c])
    if others and phase % recheck == recheck - 1:
        return others[(phase // recheck) % len(others)]
    return best


def observe_link(rates: Rates, wire_bytes: int, seconds: float) -> Rates:
    """A write of `wire_bytes` that took `seconds` to be accepted by the stream."""
    if wire_bytes < 4096:
        return rates  # too small to say anything about the link
    if rates.link is None:
        nbytes, secs = float(wire_bytes), max(seconds, 0.0)
    else:
        nbytes = _avg(rates.link_bytes, wire_bytes)
        secs = _avg(rates.link_seconds, max(seconds, 0.0))
    return replace(rates, link=nbytes / max(secs, 1e-6), link_bytes=nbytes, link_seconds=secs)


def observe_encode(rates: Rates, codec: str, raw: int, wire: int, cpu_seconds: float) -> Rates:
    """One instance encoded: `raw` bytes in, `wire` bytes out, `cpu_seconds` of CPU."""
    if raw <= 0 or wire <= 0:
        return rates
    ratio = dict(rates.ratio)
    ratio[codec] = _avg(ratio.get(codec, raw / wire), raw / wire)
    encode = dict(rates.encode)
    if cpu_seconds > 0:
        encode[codec] = _avg(encode.get(codec, raw / cpu_seconds), raw / cpu_seconds)
    return replace(rates, ratio=ratio, encode=encode)


def _avg(old: float, new: float) -> float:
    return (1 - _WEIGHT) * old + _WEIGHT * new
