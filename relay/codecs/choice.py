"""Which transport codec for the next instance: a pure function of measured rates.

Per raw byte, a pipeline of `w` encoder threads feeding a link costs
max(1 / (w x encode rate), 1 / (ratio x link rate), 1 / decode rate): the slowest of the
agent's CPU, the wire and the workstation's (single-threaded) decoding. `choose` takes the
option with the least cost; plain zstd wins ties, so a codec is only picked when it is
faster, and then the fewest workers that keep the CPU from being the bottleneck.
Encode rates include the agent's verification (a decode and a compare).

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
# raw bytes per CPU second, encode (with verification, for the image codecs) and decode.
PRIOR_RATIO: Final = {ZSTD: 2.5, "jpegls": 3.3, "htj2k": 2.9}
PRIOR_ENCODE: Final = {ZSTD: 150e6, "jpegls": 55e6, "htj2k": 100e6}
PRIOR_DECODE: Final = {ZSTD: 800e6, "jpegls": 120e6, "htj2k": 280e6}
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


def cost(rates: Rates, codec: str, workers: int) -> float:
    """Seconds per raw byte through encoder, link and decoder for `codec`."""
    encode = 1.0 / (workers * rates.encode.get(codec, PRIOR_ENCODE.get(codec, 1e6)))
    decode = 1.0 / rates.decode.get(codec, PRIOR_DECODE.get(codec, 1e6))
    link = 0.0
    if rates.link:
        link = 1.0 / (rates.ratio.get(codec, 1.0) * rates.link)
    return max(encode, link, decode)


def choose(rates: Rates, offered: tuple[str, ...], max_workers: int) -> Choice:
    """The codec (ZSTD or one of `offered`) and worker count with the least cost.

    Before the link has been measured, the image codec with the best ratio is taken if
    one is offered: a first instance on a slow link matters most, and on a fast link the
    measurement a few instances later moves to the cheaper option.
    """
    max_workers = max(1, max_workers)
    if offered and rates.link is None:
        best = max(offered, key=lambda c: rates.ratio.get(c, 1.0))
        return Choice(best, max_workers)
    candidates = [ZSTD, *offered]
    scored = [(cost(rates, c, max_workers), i, c) for i, c in enumerate(candidates)]
    best_cost, _, best = min(scored)
    if cost(rates, ZSTD, max_workers) <= best_cost * 1.02:  # zstd unless clearly beaten
        best, best_cost = ZSTD, cost(rates, ZSTD, max_workers)
    # The fewest workers that keep the CPU from being the bottleneck (zstd too: on a fast
    # link it is what the agent's CPU spends its time on).
    workers = next(w for w in range(1, max_workers + 1)
                   if cost(rates, best, w) <= best_cost * 1.02)  # fmt: skip
    return Choice(best, workers)


def trial(model: str, measured: Mapping[str, float], phase: int, recheck: int = 5) -> str:
    """The codec for the next phase of instances: the model's pick, checked against zstd.

    `measured`: raw bytes per second each codec delivered end to end in earlier phases
    (encoder, link and the workstation included: a workstation short of CPU slows the
    stream as a slow link would, and only a measurement tells them apart). An image codec
    the model picks is tried, then zstd, then the faster of the two is kept, with the
    other tried again every `recheck`-th phase (conditions change).
    """
    if model == ZSTD:
        return ZSTD
    if model not in measured:
        return model
    if ZSTD not in measured:
        return ZSTD
    best, other = (model, ZSTD) if measured[model] > measured[ZSTD] else (ZSTD, model)
    return other if phase % recheck == recheck - 1 else best


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
