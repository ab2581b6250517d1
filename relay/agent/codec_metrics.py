"""`relay_pixel_codec_*`: what the agent sent in each transport codec (issue 14).

Read at scrape time from the DICOM agent's `RateBook` (relay.dicom never imports
prometheus_client). The codec label is one of a fixed few: zstd, jpegls, htj2k, jpegxl.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from relay.dicom.encoder import CodecTally

__all__ = ["PixelCodecMetrics"]


class PixelCodecMetrics(Collector):
    def __init__(self, tallies: Callable[[], Mapping[str, CodecTally]]) -> None:
        self.tallies = tallies

    def collect(self) -> Iterator[Metric]:
        instances = CounterMetricFamily(
            "relay_pixel_codec_instances", "Instances the agent sent, by transport codec",
            labels=["codec"],
        )  # fmt: skip
        raw = CounterMetricFamily(
            "relay_pixel_codec_raw_bytes", "Dataset bytes of those instances, by codec",
            labels=["codec"],
        )  # fmt: skip
        wire = CounterMetricFamily(
            "relay_pixel_codec_wire_bytes", "Bytes written to the stream for them, by codec",
            labels=["codec"],
        )  # fmt: skip
        fallbacks = CounterMetricFamily(
            "relay_pixel_codec_fallbacks",
            "Instances tried in a pixel codec that went as zstd: codestreams no smaller "
            "than the pixels, or the frame over a limit",
            labels=["codec"],
        )
        for codec, t in sorted(self.tallies().items()):
            instances.add_metric([codec], t.instances)
            raw.add_metric([codec], t.raw_bytes)
            wire.add_metric([codec], t.wire_bytes)
            if codec != "zstd":
                fallbacks.add_metric([codec], t.fallbacks)
        yield instances
        yield raw
        yield wire
        yield fallbacks
