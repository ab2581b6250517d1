"""The agent sends encoded pixels only to a workstation that announced the codec."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import cast

import pytest

from relay.dicom import rawds
from relay.dicom.agent import serve_dicom_stream
from relay.dicom.codec import (
    FLAG_PIXELS,
    Instance,
    Message,
    MessageCodec,
    Request,
    read_payload,
    write_message,
)
from relay.dicom.encoder import Encoded, StreamEncoder, offered_codecs
from relay.dicom.pacs_target import PacsTarget, PixelCodecs
from relay.dicom.rawds import encode_dataset
from relay.net.bytestream import pipe
from relay.wire import HEADER_DICOM_PIXELS
from relay_dev import samples
from relay_dev.pacs import EmbeddedPacs, MemoryStore

from .helpers import EXPLICIT, query

CT = samples.make_study(6, rows=128, cols=128, seed=11)  # 32 KiB each: worth encoding
STUDY = str(rawds.decode_dataset(CT[0].data, EXPLICIT).StudyInstanceUID)


@pytest.fixture
def pacs() -> Iterator[EmbeddedPacs]:
    with EmbeddedPacs(MemoryStore(CT)) as p:
        yield p


async def get_study(pacs: EmbeddedPacs, headers: dict[str, str], pixel_codecs: str) -> list[int]:
    """Retrieve the study over a pipe with `headers`; the flags of each instance frame."""
    base = PacsTarget(ae_title=pacs.ae_title, host="127.0.0.1", port=pacs.port, timeout=10)
    pacs_target = replace(base, pixel_codecs=cast(PixelCodecs, pixel_codecs))
    a, b = pipe(headers)
    server = asyncio.create_task(serve_dicom_stream(b, pacs_target))
    codec = MessageCodec(accept_pixels=True)  # the workstation end
    ident = encode_dataset(query("STUDY", StudyInstanceUID=STUDY), EXPLICIT)
    await write_message(a, codec, Request(op="retrieve", root="study", transfer_syntax=EXPLICIT,
                                          dataset=ident))  # fmt: skip
    flags, got = [], {}
    while (payload := await asyncio.wait_for(read_payload(a, codec), 20)) is not None:
        msg = codec.decode(payload)
        if isinstance(msg, Instance):
            flags.append(payload[2])
            got[msg.sop_instance] = msg.dataset
    await a.write_eof()
    await asyncio.wait_for(server, 20)
    assert got == {i.sop_instance: i.data for i in CT}  # the PACS's bytes, every time
    return flags


async def test_a_workstation_that_announces_no_codecs_gets_the_old_framing(
    pacs: EmbeddedPacs,
) -> None:
    flags = await get_study(pacs, {}, pixel_codecs="jpegls")
    assert len(flags) == len(CT)
    assert not any(f & FLAG_PIXELS for f in flags)


@pytest.mark.parametrize("codec", ["jpegls", "htj2k", "jpegxl"])
async def test_an_announced_codec_carries_every_instance(pacs: EmbeddedPacs, codec: str) -> None:
    flags = await get_study(pacs, {HEADER_DICOM_PIXELS: "jpegls,htj2k,jpegxl"}, pixel_codecs=codec)
    assert flags == [FLAG_PIXELS] * len(CT)


@pytest.mark.parametrize(
    ("announced", "config"),
    [("htj2k", "jpegls"), ("jxl, j2k", "auto"), ("jpegls,htj2k", "off")],
)
async def test_no_common_codec_means_the_old_framing(
    pacs: EmbeddedPacs, announced: str, config: str
) -> None:
    flags = await get_study(pacs, {HEADER_DICOM_PIXELS: announced}, pixel_codecs=config)
    assert not any(f & FLAG_PIXELS for f in flags)


@pytest.mark.parametrize(("announced", "off_loop"), [("jpegls,htj2k,jpegxl", True), ("", False)])
async def test_an_instance_that_may_get_a_pixel_codec_is_encoded_off_the_loop(
    pacs: EmbeddedPacs, monkeypatch: pytest.MonkeyPatch, announced: str, off_loop: bool
) -> None:
    """Instances of 16-64 KiB were encoded on the event loop: 3-5 ms of image codec each,
    every other stream held up meanwhile. Without an image codec in play they stay
    inline (zstd of 32 KiB costs less than a thread hop)."""
    loop_thread = threading.get_ident()
    threads: list[bool] = []  # per instance encoded: on the loop's thread
    real = StreamEncoder.encode

    def encode(self: StreamEncoder, msg: Message) -> Encoded:
        if isinstance(msg, Instance):
            threads.append(threading.get_ident() == loop_thread)
        return real(self, msg)

    monkeypatch.setattr(StreamEncoder, "encode", encode)
    headers = {HEADER_DICOM_PIXELS: announced} if announced else {}
    flags = await get_study(pacs, headers, pixel_codecs="jpegls")
    assert len(threads) == len(CT) and all(16 << 10 < len(i.data) < 64 << 10 for i in CT)
    assert threads == [not off_loop] * len(CT)
    assert all(bool(f & FLAG_PIXELS) == off_loop for f in flags)


def test_offered_codecs_are_what_both_ends_and_the_config_allow() -> None:
    assert offered_codecs(None, ("jpegls", "htj2k")) == ()
    assert offered_codecs("", ("jpegls", "htj2k")) == ()
    assert offered_codecs("jpegls,htj2k", ()) == ()
    assert offered_codecs(" htj2k , jpegls", ("jpegls", "htj2k")) == ("jpegls", "htj2k")
    assert offered_codecs("htj2k,zstd,../../x", ("jpegls", "htj2k")) == ("htj2k",)
