"""relay.dicom.encoder: phases that check the model's codec against zstd, end to end."""

from __future__ import annotations

import pytest

from relay.codecs.choice import ZSTD
from relay.dicom.codec import MessageCodec
from relay.dicom.encoder import PHASE_MEASURE, PHASE_SKIP, Encoded, StreamEncoder

PHASE = PHASE_SKIP + PHASE_MEASURE


def run_phase(enc: StreamEncoder, now: float, seconds_per_instance: float) -> float:
    """Write one phase of 500 kB instances, each taking `seconds_per_instance` of wall time."""
    for _ in range(PHASE):
        codec = enc.choice.codec
        wire = 200_000 if codec == ZSTD else 150_000  # ratios 2.5 and 3.3, as on CT
        result = Encoded(b"x" * wire, codec, 500_000, 0.001)
        enc.encoded(result)
        now += seconds_per_instance
        enc.written(result, seconds_per_instance, now)
    return now


def test_the_first_phase_warms_up_unmeasured() -> None:
    enc = StreamEncoder(MessageCodec(), ("jpegls",), 2)
    run_phase(enc, 0.0, 0.001)  # empty windows take the first writes at once
    assert enc.measured == {} and enc.phase == 0
    assert enc.counts == {"jpegls": PHASE}


def test_a_codec_that_slows_the_stream_gives_way_to_zstd() -> None:
    enc = StreamEncoder(MessageCodec(), ("jpegls",), 2)
    # The link looks slow (writes block long), so the model picks JPEG-LS ...
    assert enc.choice.codec == "jpegls"
    now = run_phase(enc, 0.0, 0.05)  # warming up
    now = run_phase(enc, now, 0.05)  # JPEG-LS: 10 MB/s of raw bytes end to end
    assert enc.measured == {"jpegls": pytest.approx(500_000 / 0.05)}
    assert enc.choice.codec == ZSTD  # ... then zstd is tried
    now = run_phase(enc, now, 0.025)  # zstd: twice as fast (a busy workstation, say)
    assert enc.measured[ZSTD] == pytest.approx(500_000 / 0.025)
    assert enc.choice.codec == ZSTD  # and kept
    assert enc.counts == {"jpegls": 2 * PHASE, ZSTD: PHASE}


def test_a_codec_that_speeds_the_stream_up_is_kept() -> None:
    enc = StreamEncoder(MessageCodec(), ("jpegls",), 2)
    now = run_phase(enc, 0.0, 0.04)  # warming up
    now = run_phase(enc, now, 0.04)
    now = run_phase(enc, now, 0.05)  # zstd slower: a slow link
    assert enc.choice.codec == "jpegls"
    run_phase(enc, now, 0.04)
    assert enc.choice.codec == "jpegls"


def test_a_named_codec_is_never_traded_for_zstd() -> None:
    enc = StreamEncoder(MessageCodec(), ("htj2k",), 2, adaptive=False)
    now = run_phase(enc, 0.0, 0.05)
    run_phase(enc, now, 0.05)
    assert enc.choice.codec == "htj2k" and enc.measured == {}
