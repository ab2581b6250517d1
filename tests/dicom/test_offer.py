"""The pixel codecs a workstation announces: what this machine decodes, less what failed."""

from __future__ import annotations

import logging

import pytest

from relay import codecs
from relay.dicom.offer import CodecOffer
from relay.wire import HEADER_DICOM_PIXELS


def test_by_default_every_codec_this_machine_decodes() -> None:
    offer = CodecOffer()
    assert offer.names == codecs.available()
    assert offer.header() == {HEADER_DICOM_PIXELS: ",".join(codecs.available())}


def test_a_distrusted_codec_is_announced_no_more(caplog: pytest.LogCaptureFixture) -> None:
    offer = CodecOffer(["jpegls", "htj2k"])
    with caplog.at_level(logging.WARNING, logger="relay.dicom.offer"):
        offer.distrust("htj2k")
        offer.distrust("htj2k")  # once is enough: no second warning
        offer.distrust("jpegxl")  # never offered: nothing to do
    assert offer.header() == {HEADER_DICOM_PIXELS: "jpegls"}
    assert [r.getMessage() for r in caplog.records] == [
        "an instance's htj2k pixels did not decode exactly; asking for no more htj2k"
    ]
    offer.distrust("jpegls")
    assert offer.names == () and offer.header() == {}
