"""Clients that do not behave, over real HTTP on loopback: one that asks with HEAD, one
that stops reading a whole (not streamed) answer, one that goes away while its request
waits for the PACS. Each must end without a body where none belongs, without holding its
connection, memory or request slot for ever, and its own upstream operation stops."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import aiohttp
import numpy as np
import pytest
from pydicom.dataset import Dataset

from relay.dicom import rawds
from relay.workstation.dicomweb import app, media, part10
from relay.workstation.dicomweb.server import DicomwebServer
from relay.workstation.dicomweb.source import FindResult
from relay_dev.samples import EncodedInstance
from tests.workstation.dicomweb import test_server
from tests.workstation.dicomweb.test_server import CT, SERIES, STUDY, ScriptedSource
from tests.workstation.dicomweb.test_stalled import closed_by_server, stalled_get

CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
BIG_SOP = "1.2.9.77"
BIG_FRAMES = 8  # of 1024 x 1024 x 16 bits: 16 MiB, far more than loopback socket buffers


def big_multiframe() -> EncodedInstance:
    ds = Dataset()
    ds.SOPClassUID = CT_CLASS
    ds.SOPInstanceUID = BIG_SOP
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = SERIES
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = BIG_FRAMES
    ds.Rows = ds.Columns = 1024
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.arange(BIG_FRAMES * 1024 * 1024, dtype="<u2").tobytes()
    ds["PixelData"].VR = "OW"
    ts = "1.2.840.10008.1.2.1"
    return EncodedInstance(CT_CLASS, BIG_SOP, ts, rawds.encode_dataset(ds, ts))


@pytest.fixture
async def served() -> AsyncIterator[tuple[DicomwebServer, ScriptedSource]]:
    async with test_server.scripted() as both:
        yield both


async def _until(check: Any, seconds: float = 5.0) -> bool:
    for _ in range(int(seconds / 0.02)):
        if check():
            return True
        await asyncio.sleep(0.02)
    return bool(check())


async def test_head_answers_headers_only_and_the_connection_stays_usable(
    served: tuple[DicomwebServer, ScriptedSource],
) -> None:
    """HEAD of a streamed answer (a series, its metadata) is its GET's status and
    Content-Type, nothing after them: a keep-alive client's next answer is read right."""
    srv, _ = served
    assert srv.address is not None
    port = srv.address.port
    host = f"Host: 127.0.0.1:{port}\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        series = f"/dicom-web/studies/{STUDY}/series/{SERIES}"
        for path, ctype in ((series, b"multipart/related"),
                            (f"{series}/metadata", b"application/dicom+json")):  # fmt: skip
            writer.write(f"HEAD {path} HTTP/1.1\r\n{host}\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200 "), head[:200]
            assert ctype in head
        writer.write(f"GET /dicom-web/studies HTTP/1.1\r\n{host}\r\n".encode())
        after = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert after.startswith(b"HTTP/1.1 200 "), after[:200]  # not a part's bytes
    finally:
        writer.close()


async def test_a_whole_answer_the_client_does_not_read_is_cut_after_the_write_timeout() -> None:
    """A frames answer of 16 MiB, written whole after its handler: a client that reads
    none of it loses the connection after the write timeout, and the request slot is
    given back (it counted until then)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(test_server, "CT", [big_multiframe()])
        async with test_server.scripted() as (srv, _):
            assert srv.address is not None
            srv.service.write_timeout = 0.5
            numbers = ",".join(str(n) for n in range(1, BIG_FRAMES + 1))
            path = (f"/dicom-web/studies/{STUDY}/series/{SERIES}/instances/{BIG_SOP}"
                    f"/frames/{numbers}")  # fmt: skip
            stalled = stalled_get(srv.address.port, path)
            try:  # read nothing until the request is over (the metrics count it then)
                assert await _until(lambda: sum(srv.metrics.requests.values()) == 1, 8.0)
                assert srv.service.in_progress == 0
                assert await _until(lambda: closed_by_server(stalled), 2.0), "still open"
            finally:
                stalled.close()


async def test_a_client_gone_cancels_its_request_and_its_c_find(
    served: tuple[DicomwebServer, ScriptedSource],
) -> None:
    """The browser goes away while its query waits for the PACS: the handler is
    cancelled, so the C-FIND (its relay stream) ends and the request slot is free,
    rather than both waiting for the PACS's answer that nobody will read."""
    srv, source = served
    assert srv.address is not None
    entered = asyncio.Event()
    ended: list[str] = []

    async def find(identifier: Dataset, max_matches: int, *, skip: int = 0) -> FindResult:
        entered.set()
        try:
            await asyncio.sleep(30)  # the PACS is slow
        except asyncio.CancelledError:
            ended.append("cancelled")
            raise
        ended.append("answered")
        return FindResult([])

    source.find = find  # type: ignore[method-assign]
    _, writer = await asyncio.open_connection("127.0.0.1", srv.address.port)
    writer.write(f"GET /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1:{srv.address.port}"
                 "\r\n\r\n".encode())  # fmt: skip
    await asyncio.wait_for(entered.wait(), 5)
    assert srv.service.in_progress == 1
    writer.close()
    assert await _until(lambda: bool(ended), 3.0)
    assert ended == ["cancelled"]
    assert await _until(lambda: srv.service.in_progress == 0)


async def test_a_stow_check_keeps_its_slot_while_its_thread_runs_after_a_cancel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A STOW check runs in a thread that a cancel cannot stop: its slot stays taken
    until the thread ends, so no more than STOW_CHECKS inflate a dataset at once."""
    release = threading.Event()
    started = threading.Event()

    def check(*args: Any, **kwargs: Any) -> int | None:
        started.set()
        release.wait(10)
        return None

    monkeypatch.setattr(app, "_check_stow_part", check)
    service = SimpleNamespace(stow_checks=asyncio.Semaphore(1), max_upload=1 << 20)
    task = asyncio.ensure_future(app._check_part(service, b"", "1.2", "1.2", "1.2",  # type: ignore[arg-type]
                                                 study=None))  # fmt: skip
    assert await asyncio.to_thread(started.wait, 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert service.stow_checks.locked()  # the thread still runs
    release.set()
    assert await _until(lambda: not service.stow_checks.locked())


def _stow_headers() -> dict[str, str]:
    return {"Content-Type": 'multipart/related; type="application/dicom"; boundary=stowb'}


async def test_uploads_at_once_are_bounded_then_503(
    served: tuple[DicomwebServer, ScriptedSource],
) -> None:
    """Each STOW-RS request may hold max_upload bytes: past STOW_UPLOADS at once, 503
    with Retry-After (nothing read, nothing stored); the ones under way complete."""
    srv, source = served
    gate = asyncio.Event()
    good = media.part_head("stowb", "application/dicom") + part10.wrap(
        CT[0].sop_class, CT[0].sop_instance, CT[0].transfer_syntax, CT[0].data
    )

    async def held_body() -> AsyncIterator[bytes]:
        yield good
        await gate.wait()
        yield media.closing("stowb")

    async with aiohttp.ClientSession() as http:

        async def upload() -> tuple[int, str | None]:
            async with http.post(f"{srv.url}/studies", data=held_body(),
                                 headers=_stow_headers()) as r:  # fmt: skip
                await r.read()
                return r.status, r.headers.get("Retry-After")

        held = [asyncio.ensure_future(upload()) for _ in range(app.STOW_UPLOADS)]
        assert await _until(lambda: srv.service.stow_uploads == app.STOW_UPLOADS)
        assert await upload() == (503, "1")
        gate.set()
        assert [status for status, _ in await asyncio.gather(*held)] == [200] * app.STOW_UPLOADS
    assert len(source.stored) == app.STOW_UPLOADS


async def test_an_upload_that_stops_sending_is_408_after_the_timeout(
    served: tuple[DicomwebServer, ScriptedSource],
) -> None:
    """A STOW-RS body that stops coming part way ends with 408 once nothing came for the
    timeout, rather than holding its request and upload slot for ever."""
    srv, source = served
    srv.service.write_timeout = 0.5
    never = asyncio.Event()

    async def stalled_body() -> AsyncIterator[bytes]:
        yield media.part_head("stowb", "application/dicom") + b"\0" * 1000
        await never.wait()
        yield b""

    async with aiohttp.ClientSession() as http:
        post = http.post(f"{srv.url}/studies", data=stalled_body(), headers=_stow_headers())
        async with asyncio.timeout(5):
            async with post as r:
                assert r.status == 408
                assert "stalled" in await r.text()
    assert srv.service.stow_uploads == 0
    assert source.stored == []
    assert srv.metrics.uploads_cut == {"stalled": 1, "too_slow": 0}
