"""The PACS's ErrorComment reaches the workstation verbatim (the agent forwards it) and may
quote a patient: the DICOMweb server answers it to the viewer but never logs it."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest

from relay.dicom import status as st
from relay.dicom.codec import FinalResponse
from relay.ops.config import Address
from relay.workstation.dicomweb.settings import DicomwebConfig
from relay.workstation.dicomweb.source import UpstreamError
from tests.workstation.dicomweb.test_server import SERIES, STUDY, scripted

SECRET = "DOE^JANE PID-0042"


async def test_a_pacs_error_comment_reaches_the_client_but_no_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = DicomwebConfig(Address("127.0.0.1", 0), headers_first=True)
    async with scripted(config) as (srv, source):
        comment = f"no such images for patient {SECRET}"
        source.final = FinalResponse(st.SUBOPS_FAILED, comment, completed=1, failed=2)
        source.header_error = UpstreamError(502, comment)  # headers-only: fails at once
        url = f"{srv.url}/studies/{STUDY}/series/{SERIES}"
        caplog.set_level(logging.DEBUG, logger="relay")
        async with aiohttp.ClientSession() as http:
            source.release.clear()  # the series waits: metadata tries the headers first

            async def release_soon() -> None:
                for _ in range(500):
                    if source.header_retrieves:
                        break
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.1)  # the headers-only retrieval fails meanwhile
                source.release.set()

            releasing = asyncio.ensure_future(release_soon())
            for what in (f"{url}/metadata", url):  # each cut mid-answer after 1 instance
                async with http.get(what) as r:
                    with pytest.raises(aiohttp.ClientPayloadError):
                        await r.read()
            await releasing
            source.missing.add(SERIES)
            source.final = FinalResponse(st.PACS_UNREACHABLE, comment)  # before any instance
            async with http.get(url) as r:
                assert r.status == 502 and SECRET in await r.text()  # the viewer sees why
    logged = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.INFO]
    assert any("mid-answer" in m for m in logged)
    assert any("series headers not used" in m for m in logged)
    assert not [m for m in logged if "PID-0042" in m]
