"""relay.dicom.encoder: phases that check the model's codec against zstd, end to end."""

from __future__ import annotations

from collections import deque
from dataclasses import replace

import numpy as np
import pytest

from relay.agent.codec_metrics import PixelCodecMetrics
from relay.codecs import PixelFormat
from relay.codecs.choice import ZSTD
from relay.dicom.codec import DicomLimits, Instance, MessageCodec
from relay.dicom.encoder import (
    PHASE_MEASURE,
    PHASE_SKIP,
    SPOT_CHECK,
    WARMUP_PHASES,
    Encoded,
    RateBook,
    StreamEncoder,
)
from relay_dev import samples

PHASE = PHASE_SKIP + PHASE_MEASURE


def run_phase(enc: StreamEncoder, now: float, seconds_per_instance: float) -> float:
    """Write one phase of 500 kB instances, each taking `seconds_per_instance` of wall time."""
    for _ in range(PHASE):
        codec = enc.choice.codec
        wire = 200_000 if codec == ZSTD else 150_000  # ratios 2.5 and 3.3, as on CT
        result = Encoded(b"x" * wire, codec, 500_000, 0.001, enc.epoch)
        enc.encoded(result)
        now += seconds_per_instance
        enc.written(result, seconds_per_instance, now)
    return now


def warm_up(enc: StreamEncoder, now: float, seconds_per_instance: float) -> float:
    for _ in range(WARMUP_PHASES):
        now = run_phase(enc, now, seconds_per_instance)
    return now


def test_the_first_phases_warm_up_unmeasured_on_the_models_choice() -> None:
    """The first instance goes as what crosses soonest before anything is measured
    (zstd, against JPEG-LS alone); from its write on, the model's choice for the link
    it sees, without measuring phases yet (windows filling flatter whatever goes)."""
    slow = StreamEncoder(MessageCodec(), ("jpegls",), 2)
    assert slow.choice.codec == ZSTD
    warm_up(slow, 0.0, 0.05)  # writes block: a slow link
    assert slow.measured == {} and slow.phase == 0
    assert slow.counts == {ZSTD: 1, "jpegls": WARMUP_PHASES * PHASE - 1}
    fast = StreamEncoder(MessageCodec(), ("jpegls",), 2)
    warm_up(fast, 0.0, 0.0001)  # writes taken at once
    assert fast.measured == {} and fast.counts == {ZSTD: WARMUP_PHASES * PHASE}


def test_a_codec_that_slows_the_stream_gives_way_to_zstd() -> None:
    enc = StreamEncoder(MessageCodec(), ("jpegls",), 2)
    # The link looks slow (writes block long), so the model picks JPEG-LS ...
    now = warm_up(enc, 0.0, 0.05)
    assert enc.choice.codec == "jpegls"
    now = run_phase(enc, now, 0.05)  # JPEG-LS: 10 MB/s of raw bytes end to end
    assert enc.measured == {"jpegls": pytest.approx(500_000 / 0.05)}
    assert enc.choice.codec == ZSTD  # ... then zstd is tried
    now = run_phase(enc, now, 0.025)  # zstd: twice as fast (a busy workstation, say)
    assert enc.measured[ZSTD] == pytest.approx(500_000 / 0.025)
    assert enc.choice.codec == ZSTD  # and kept
    assert enc.counts == {"jpegls": (WARMUP_PHASES + 1) * PHASE - 1, ZSTD: PHASE + 1}


def test_a_codec_that_speeds_the_stream_up_is_kept() -> None:
    enc = StreamEncoder(MessageCodec(), ("jpegls",), 2)
    now = warm_up(enc, 0.0, 0.04)
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


GRAY16 = PixelFormat(rows=64, columns=64, samples=1, bits=16, signed=True, planar=0, frames=1)


def test_a_proven_codec_is_checked_first_then_one_instance_in_spot_check() -> None:
    book = RateBook()
    checks = [book.needs_check("jpegls", GRAY16) for _ in range(2 * SPOT_CHECK + 1)]
    assert [i for i, c in enumerate(checks) if c] == [0, SPOT_CHECK, 2 * SPOT_CHECK]
    eight = replace(GRAY16, bits=8)
    assert book.needs_check("jpegls", eight)  # another kind: its own first check
    assert book.needs_check("htj2k", GRAY16)
    assert all(book.needs_check("jpegxl", GRAY16) for _ in range(3))  # not proven
    rgb = replace(GRAY16, samples=3, bits=8, signed=False)
    assert all(book.needs_check("jpegls", rgb) for _ in range(3))


def test_a_codec_caught_inexact_is_checked_every_time_after(
    caplog: pytest.LogCaptureFixture,
) -> None:
    book = RateBook()
    book.needs_check("htj2k", GRAY16)
    book.disprove("htj2k", GRAY16)
    book.disprove("htj2k", GRAY16)
    assert all(book.needs_check("htj2k", GRAY16) for _ in range(2 * SPOT_CHECK))
    assert book.needs_check("jpegls", GRAY16)  # another kind: its own first check
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        "htj2k did not round-trip 16-bit signed pixels: checking every such instance from now on"
    ]
    book.disprove("jpegxl", GRAY16)  # never proven: nothing to take back, nothing logged
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1


def test_checked_or_not_every_instance_decodes_to_the_pacs_bytes() -> None:
    """The agent's encoder over more instances than one spot-check period: what the
    workstation's codec rebuilds is each dataset exactly."""
    codec = MessageCodec(accept_pixels=True)  # the agent's encoder, the workstation's decoder
    enc = StreamEncoder(codec, ("jpegls",), 1, adaptive=False)
    study = samples.make_study(SPOT_CHECK + 2, rows=128, cols=128)
    for inst in study:
        msg = Instance(inst.sop_class, inst.sop_instance, inst.transfer_syntax, inst.data)
        result = enc.encode(msg)
        assert result.codec == "jpegls"
        got = codec.decode_frame(result.frame)
        assert isinstance(got, Instance) and got.dataset == inst.data


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    tag = group.to_bytes(2, "little") + elem.to_bytes(2, "little")
    return tag + vr + len(value).to_bytes(2, "little") + value


def _noise(side: int = 256) -> Instance:
    """A 16-bit image of random values over the whole range: no lossless codec shrinks it
    (HTJ2K's codestream is about 7% larger than the pixels)."""
    pixels = np.random.default_rng(0).integers(0, 65536, (side, side), dtype="<u2").tobytes()

    def us(elem: int, value: int) -> bytes:
        return _element(0x28, elem, b"US", value.to_bytes(2, "little"))

    head = us(0x0002, 1) + _element(0x28, 0x0004, b"CS", b"MONOCHROME2 ")
    head += us(0x0010, side) + us(0x0011, side) + us(0x0100, 16) + us(0x0101, 16)
    head += us(0x0103, 0)
    data = head + b"\xe0\x7f\x10\x00OW\x00\x00" + len(pixels).to_bytes(4, "little") + pixels
    return Instance("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1", data)


def _fallbacks(book: RateBook) -> dict[str, float]:
    """The `relay_pixel_codec_fallbacks` counter's samples, by codec."""
    family = next(
        m for m in PixelCodecMetrics(book.tallies).collect()
        if m.name == "relay_pixel_codec_fallbacks"
    )  # fmt: skip
    return {s.labels["codec"]: s.value for s in family.samples if s.name.endswith("_total")}


def test_pixels_a_codec_does_not_shrink_go_as_zstd() -> None:
    """A codestream no smaller than the native pixels is dropped: the instance goes as
    zstd would send it, and the metrics count the codec's fallback."""
    codec = MessageCodec()
    msg = _noise()
    enc = StreamEncoder(codec, ("htj2k",), 1, adaptive=False)
    result = enc.encode(msg)
    assert result.codec == ZSTD
    assert result.frame == codec.encode(msg)
    enc.encoded(result)
    assert _fallbacks(enc.book) == {"htj2k": 1}
    assert enc.book.tallies()[ZSTD].instances == 1


def test_an_instance_too_big_in_its_codec_goes_as_zstd_if_that_fits() -> None:
    """Framing with encoded pixels that exceeds a limit (here the header, with the `px`
    keys) is not the stream's failure: the instance goes plainly, the retrieve goes on."""
    ct = samples.make_study(1, rows=128, cols=128)[0]
    msg = Instance(ct.sop_class, ct.sop_instance, ct.transfer_syntax, ct.data)
    codec = MessageCodec(DicomLimits(max_header=200))  # fits the plain header only
    enc = StreamEncoder(codec, ("jpegls",), 1, adaptive=False)
    result = enc.encode(msg)
    assert result.codec == ZSTD
    assert codec.decode_frame(result.frame) == msg
    enc.encoded(result)
    assert _fallbacks(enc.book) == {"jpegls": 1}


def test_a_phase_times_only_what_was_encoded_under_its_choice() -> None:
    """The pump encodes up to workers + 1 instances ahead of the writes (codec_workers
    may be up to 16): with 8 workers, the first writes of a phase went in the previous
    phase's codec, and timing them would credit this phase's codec with that one's rate.
    Here JPEG-LS writes take 50 ms, zstd ones 25 ms: each measures exactly its own."""
    ct = samples.make_study(1, rows=128, cols=128)[0]
    msg = Instance(ct.sop_class, ct.sop_instance, ct.transfer_syntax, ct.data)
    workers = 8
    enc = StreamEncoder(MessageCodec(), ("jpegls",), workers)
    ahead: deque[Encoded] = deque()
    now = 0.0
    for _ in range((WARMUP_PHASES + 6) * PHASE):
        while len(ahead) < workers + 1:  # a slot frees: encode with the current choice
            ahead.append(enc.encode(msg))
        result = ahead.popleft()
        enc.encoded(result)
        seconds = 0.05 if result.codec == "jpegls" else 0.025
        now += seconds
        enc.written(result, seconds, now)
    raw = len(msg.dataset)
    assert enc.measured == {"jpegls": pytest.approx(raw / 0.05), ZSTD: pytest.approx(raw / 0.025)}
