"""relay.codecs.choice: the codec and parallelism a stream deserves, from measured rates."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as s

from relay.codecs.choice import (
    MARGIN,
    PRIOR_ENCODE,
    PRIOR_LINK,
    PRIOR_RATIO,
    ZSTD,
    Choice,
    Rates,
    choose,
    contenders,
    cost,
    latency,
    observe_encode,
    observe_link,
    trial,
)

BOTH = ("jpegls", "htj2k")
ALL = ("jpegls", "htj2k", "jpegxl")
MBIT = 1e6 / 8


def test_nothing_offered_means_zstd() -> None:
    assert choose(Rates(link=1 * MBIT), (), 4) == Choice(ZSTD, 1)
    assert choose(Rates(), (), 4) == Choice(ZSTD, 4)  # link not measured: the whole pool
    # A fast link makes zstd the bottleneck: more threads compress alongside.
    assert choose(Rates(link=10_000 * MBIT), (), 4) == Choice(ZSTD, 4)


def test_before_the_link_is_measured_what_crosses_soonest_goes_first() -> None:
    """The first instance, which the viewer waits for: encode + wire + decode at
    100 Mbit/s. HTJ2K's cheap coding beats JPEG-LS's better ratio there; a JPEG-LS
    alone costs more CPU than its bytes save, so zstd goes."""
    assert choose(Rates(), BOTH, 2) == Choice("htj2k", 2)
    assert choose(Rates(), ("jpegls",), 3) == Choice(ZSTD, 3)
    assert latency(Rates(), "htj2k", PRIOR_LINK) < latency(Rates(), ZSTD, PRIOR_LINK)
    # An agent that has measured its JPEG-LS encoder at 200 MB/s sends the first with it.
    fast = replace(Rates(), encode={**PRIOR_ENCODE, "jpegls": 200e6})
    assert choose(fast, ("jpegls",), 2).codec == "jpegls"


def test_a_slow_link_takes_the_best_ratio_with_few_workers() -> None:
    got = choose(Rates(link=20 * MBIT), BOTH, 4)
    assert got.codec == "jpegls"
    assert got.workers == 1  # one thread encodes 55 MB/s; the link takes 8 MB/s of raw


def test_a_fast_link_stays_with_zstd() -> None:
    assert choose(Rates(link=1000 * MBIT), BOTH, 2).codec == ZSTD
    assert choose(Rates(link=10_000 * MBIT), BOTH, 16).codec == ZSTD


def test_a_middling_link_takes_the_faster_codec_and_more_workers() -> None:
    # 800 Mbit/s: JPEG-LS is decoder-bound (120 MB/s), HTJ2K keeps up with the wire
    # with two encoder threads (150 MB/s each).
    got = choose(Rates(link=800 * MBIT), BOTH, 4)
    assert got.codec == "htj2k"
    assert got.workers >= 2


def test_what_the_agent_measures_moves_the_choice() -> None:
    rates = Rates(link=100 * MBIT)
    assert choose(rates, BOTH, 2).codec == "jpegls"
    # This PACS's images barely compress with JPEG-LS: several instances say so.
    for _ in range(10):
        rates = observe_encode(rates, "jpegls", 1_000_000, 900_000, 0.02)
    assert rates.ratio["jpegls"] < 1.2
    assert choose(rates, BOTH, 2).codec == "htj2k"


def test_link_observations_need_enough_bytes_and_average() -> None:
    rates = Rates()
    assert observe_link(rates, 100, 1.0) is rates  # too small to say anything
    rates = observe_link(rates, 1_000_000, 1.0)
    assert rates.link == 1_000_000
    rates = observe_link(rates, 2_000_000, 1.0)
    assert rates.link is not None and 1_000_000 < rates.link < 2_000_000
    assert observe_link(Rates(), 10_000, 0.0).link == 10_000 / 1e-6  # never a division by 0


def test_writes_taken_at_once_do_not_hide_a_slow_link() -> None:
    """A window's worth of writes accepted at once, then the link's real pace: within a
    dozen writes the estimate is near the real rate (an average of speeds would not be)."""
    rates = Rates()
    for _ in range(5):
        rates = observe_link(rates, 200_000, 0.0)
    assert rates.link is not None and rates.link > 1e9  # looks fast: nothing blocked yet
    for _ in range(12):
        rates = observe_link(rates, 200_000, 0.016)  # 12.5 MB/s: 100 Mbit/s
    assert rates.link is not None and 12.5e6 <= rates.link < 14e6
    assert choose(rates, BOTH, 2).codec == "jpegls"


def test_encode_observations_ignore_empty_results() -> None:
    rates = Rates()
    assert observe_encode(rates, "htj2k", 0, 10, 1.0) is rates
    assert observe_encode(rates, "htj2k", 10, 0, 1.0) is rates
    same_speed = observe_encode(rates, "htj2k", 1000, 500, 0.0)
    assert same_speed.encode == rates.encode and same_speed.ratio["htj2k"] != rates.ratio["htj2k"]


rates_st = s.builds(
    Rates,
    link=s.floats(1e4, 1e10),
    ratio=s.fixed_dictionaries({c: s.floats(1.0, 8.0) for c in PRIOR_RATIO}),
    encode=s.fixed_dictionaries({c: s.floats(1e6, 1e9) for c in PRIOR_RATIO}),
    decode=s.fixed_dictionaries({c: s.floats(1e6, 1e9) for c in PRIOR_RATIO}),
)


@given(rates_st, s.sampled_from([(), ("jpegls",), ("htj2k",), BOTH, ALL]), s.integers(1, 16))
def test_never_slower_than_zstd_and_never_more_workers_than_allowed(
    rates: Rates, offered: tuple[str, ...], max_workers: int
) -> None:
    got = choose(rates, offered, max_workers)
    assert got.codec == ZSTD or got.codec in offered
    assert 1 <= got.workers <= max_workers
    assert cost(rates, got.codec, got.workers) <= cost(rates, ZSTD, max_workers) * 1.03
    # ... and no option is clearly better than what was chosen
    for codec in (ZSTD, *offered):
        assert cost(rates, got.codec, got.workers) <= cost(rates, codec, max_workers) * 1.03


def test_trial_checks_an_image_codec_against_zstd_then_keeps_the_faster() -> None:
    assert trial([ZSTD], {}, 0) == ZSTD  # the model says zstd: nothing to try
    assert trial(["jpegls", ZSTD], {}, 0) == "jpegls"  # first the model's pick
    assert trial(["jpegls", ZSTD], {"jpegls": 30e6}, 1) == ZSTD  # then zstd, to compare
    # A slow link: the codec delivers more raw bytes per second; kept, zstd rechecked.
    fast_codec = {"jpegls": 40e6, ZSTD: 30e6}
    assert [trial(["jpegls", ZSTD], fast_codec, p, recheck=5) for p in range(2, 7)] == [
        "jpegls", "jpegls", ZSTD, "jpegls", "jpegls"]  # fmt: skip
    # A busy workstation (or agent): the codec slows the stream; zstd is kept.
    slow_codec = {"jpegls": 20e6, ZSTD: 30e6}
    assert [trial(["jpegls", ZSTD], slow_codec, p, recheck=5) for p in range(2, 7)] == [
        ZSTD, ZSTD, "jpegls", ZSTD, ZSTD]  # fmt: skip


def test_trial_tries_each_contender_once_then_rechecks_the_others_in_turn() -> None:
    ranked = ["jpegls", "jpegxl", ZSTD]
    assert trial(ranked, {}, 0) == "jpegls"
    assert trial(ranked, {"jpegls": 30e6}, 1) == "jpegxl"
    assert trial(ranked, {"jpegls": 30e6, "jpegxl": 35e6}, 2) == ZSTD
    # The model's favourite was CPU-bound here (both ends share the CPU): the second wins.
    measured = {"jpegls": 30e6, "jpegxl": 35e6, ZSTD: 32e6}
    picks = [trial(ranked, measured, p, recheck=5) for p in range(3, 15)]
    assert picks.count("jpegxl") == 9
    # Phases 4, 9 and 14 recheck the others in turn, the faster of them first.
    assert (picks[1], picks[6], picks[11]) == (ZSTD, "jpegls", ZSTD)
    # By default one phase in 8 rechecks.
    assert [trial(ranked, measured, p) for p in range(3, 19)].count("jpegxl") == 14


def test_trial_keeps_a_measured_codec_the_model_has_since_dropped() -> None:
    # The model's link estimate moved (say, while the stream's windows filled) and it now
    # expects nothing to beat zstd; the measurements say JPEG XL delivers more: kept, and
    # only zstd (the model's one contender) is rechecked.
    measured = {"jpegls": 30e6, "jpegxl": 40e6, ZSTD: 32e6}
    picks = [trial([ZSTD], measured, p) for p in range(0, 16)]
    assert set(picks) == {"jpegxl", ZSTD} and picks.count(ZSTD) == 2
    assert trial([ZSTD], {ZSTD: 32e6}, 7) == ZSTD  # nothing else known: nothing to recheck
    assert trial([ZSTD], {}, 0) == ZSTD


def test_a_measured_lead_within_the_noise_does_not_overrule_the_model() -> None:
    """Phase rates vary by about 10% on a shared machine: the model's pick stays unless
    another codec measured more than MARGIN faster."""
    ranked = ["jpegls", "jpegxl", ZSTD]
    close = {"jpegls": 38e6, "jpegxl": 38e6 * (1 + MARGIN), ZSTD: 31e6}
    assert [trial(ranked, close, p) for p in range(3, 7)] == ["jpegls"] * 4
    clear = {**close, "jpegxl": 38e6 * (1 + 2 * MARGIN)}
    assert [trial(ranked, clear, p) for p in range(3, 7)] == ["jpegxl"] * 4
    assert trial([ZSTD], {ZSTD: 31e6, "jpegls": 33e6}, 3) == ZSTD


def test_contenders_are_the_codecs_expected_to_beat_zstd_cheapest_first() -> None:
    # 100 Mbit/s: every image codec beats zstd on the wire; the two cheapest contend.
    assert contenders(Rates(link=100 * MBIT), ALL, 2) == ["jpegls", "jpegxl", ZSTD]
    assert contenders(Rates(link=100 * MBIT), ALL, 2, limit=3) == [
        "jpegls", "jpegxl", "htj2k", ZSTD]  # fmt: skip
    # 1 Gbit/s: the image codecs cost more CPU than the wire time they save.
    assert contenders(Rates(link=1000 * MBIT), ALL, 2) == [ZSTD]
    assert contenders(Rates(link=100 * MBIT), (), 2) == [ZSTD]
