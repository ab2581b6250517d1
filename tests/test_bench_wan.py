"""The wan benchmark reads the agent's per-codec counters from its metrics text."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from relay.agent.codec_metrics import PixelCodecMetrics
from relay.dicom.encoder import CodecTally
from tests.bench.procs import samples_of
from tests.bench.wan_chain import Tally, codec_tallies


def _scrape(tallies: dict[str, CodecTally]) -> dict[str, float]:
    """What tests.bench.procs.scrape makes of the agent's exposition of `tallies`."""
    registry = CollectorRegistry()
    registry.register(PixelCodecMetrics(lambda: tallies))
    return samples_of(generate_latest(registry).decode())


def test_codec_tallies_are_the_differences_over_the_retrieval() -> None:
    before = _scrape({"zstd": CodecTally(10, 1000, 400), "htj2k": CodecTally(5, 500, 170)})
    after = _scrape(
        {
            "zstd": CodecTally(22, 2200, 880),
            "htj2k": CodecTally(5, 500, 170),  # none during the retrieval: left out
            "jpegxl": CodecTally(150, 15000, 4900),
        }
    )
    assert codec_tallies(before, after) == {
        "jpegxl": Tally(150, 15000.0, 4900.0),
        "zstd": Tally(12, 1200.0, 480.0),
    }
    assert codec_tallies({}, {}) == {}
