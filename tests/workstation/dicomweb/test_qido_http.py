"""QIDO-RS over real HTTP: a malformed matching value is the client's 400 with the
parameter named, never a 500 from the identifier failing to encode on its way out."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from relay.ops.config import Address
from relay.workstation.dicomweb.server import DicomwebServer
from relay.workstation.dicomweb.settings import DicomwebConfig


@pytest.mark.parametrize(
    "query",
    ["Rows=abc", "NumberOfFrames=x", "ReferencedSeriesSequence=x", "PixelData=abc",
     "00280010=abc", "includefield=PixelData", "SeriesNumber=zz"],
)  # fmt: skip
async def test_a_malformed_value_is_400_naming_the_parameter(query: str) -> None:
    async def no_link(headers: Any) -> Any:
        raise OSError("no link")  # the real DicomSource: it encodes the identifier

    srv = DicomwebServer(DicomwebConfig(Address("127.0.0.1", 0)), no_link)
    await srv.start()
    try:
        async with aiohttp.ClientSession() as s, s.get(f"{srv.url}/studies?{query}") as r:
            text = await r.text()
            assert r.status == 400, text
            name, _, value = query.partition("=")
            assert text.startswith(value if name == "includefield" else name)
        async with aiohttp.ClientSession() as s, s.get(f"{srv.url}/studies?Rows=512") as r:
            assert r.status == 502  # well formed: on to the (absent) link
    finally:
        await srv.stop()
