"""The pace of a STOW-RS upload (stowpace.py), over real HTTP on loopback: a client that
keeps every read under the stall but trickles is cut once it falls below the minimum
rate, and an honest upload whose parts are stored slowly upstream is not (the time spent
storing is not the client's). The minimum rate is lowered so that each takes about a
second."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from pydicom.dataset import Dataset

from relay.dicom import rawds
from relay.dicom.codec import FinalResponse
from relay.ops.config import Address
from relay.workstation.dicomweb import media, part10
from relay.workstation.dicomweb.server import DicomwebServer
from relay.workstation.dicomweb.settings import DicomwebConfig
from relay.workstation.dicomweb.stowpace import UploadPace, UploadStalled, UploadTooSlow
from tests.workstation.dicomweb import test_server
from tests.workstation.dicomweb.test_server import ScriptedSource

STALL = 0.5  # s: dicomweb.timeout, each read's limit and the pace's grace
MIN_RATE = 4096  # bytes a second (MIN_REQUEST_RATE, 16 KiB/s, in production)
DRIP = 16  # bytes a drip, one every DRIP_EVERY s: 160 B/s, far below MIN_RATE
DRIP_EVERY = 0.1  # s, far under the stall: no single read stalls
DRIPS = 40  # 4 s of drips; the pace cuts the upload after about one
STORE_SECONDS = 0.6  # the slow PACS's time to store one instance
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
HEADERS = 'multipart/related; type="application/dicom"; boundary=stowb'


def small_part(sop_instance: str) -> bytes:
    """A whole part: a few hundred bytes of a valid CT instance."""
    ds = Dataset()
    ds.SOPClassUID = CT_CLASS
    ds.SOPInstanceUID = sop_instance
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.PatientID = "PACE"
    dataset = rawds.encode_dataset(ds, EXPLICIT_LE)
    return media.part_head("stowb", "application/dicom") + part10.wrap(
        CT_CLASS, sop_instance, EXPLICIT_LE, dataset
    )


class SlowStore(ScriptedSource):
    """A PACS that takes STORE_SECONDS to store each instance."""

    async def store(self, sop_class: str, sop_instance: str, ts: str, data: bytes) -> FinalResponse:
        await asyncio.sleep(STORE_SECONDS)
        return await super().store(sop_class, sop_instance, ts, data)


@pytest.fixture
async def paced() -> AsyncIterator[tuple[DicomwebServer, ScriptedSource]]:
    config = DicomwebConfig(Address("127.0.0.1", 0), timeout=STALL)
    async with test_server.scripted(config) as (srv, source):
        srv.service.stow_min_rate = MIN_RATE
        yield srv, source


def _answer(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


async def _answer_read(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = re.search(rb"(?i)content-length: (\d+)", head)
    assert length is not None, head
    return head + await reader.readexactly(int(length[1]))


async def _trickle(port: int, sent_first: bytes) -> tuple[bytes, int, bytes]:
    """POST /studies: `sent_first` at once, then the next part's head and up to DRIPS
    drips of its bytes, each after DRIP_EVERY s unless the answer came. Then the rest of
    the body and a second request on the same connection. The server's answer, how many
    drips went before it, and what the server sent after it (before closing)."""
    head = media.part_head("stowb", "application/dicom")
    body_size = len(sent_first) + len(head) + DRIPS * DRIP + len(media.closing("stowb"))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: {HEADERS}\r\nContent-Length: {body_size}\r\n\r\n".encode()
            + sent_first
            + head
        )
        answer = asyncio.ensure_future(_answer_read(reader))
        drips = 0
        while drips < DRIPS and not answer.done():
            writer.write(b"\0" * DRIP)
            drips += 1
            await asyncio.wait([answer], timeout=DRIP_EVERY)
        async with asyncio.timeout(10):
            got = await answer
        # the rest of the body, then a request that must not be answered: the connection
        # ends once the body does
        writer.write(b"\0" * ((DRIPS - drips) * DRIP) + media.closing("stowb"))
        writer.write(f"GET /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        try:
            async with asyncio.timeout(10):
                after = await reader.read()
        except ConnectionResetError:
            after = b""  # closed with the request unread: a reset, nothing answered
        return got, drips, after
    finally:
        writer.close()


def _scraped(srv: DicomwebServer) -> str:
    registry = CollectorRegistry()
    registry.register(srv.metrics)
    return generate_latest(registry).decode()


async def test_a_trickle_under_the_stall_is_cut_at_the_pace_and_closed(
    paced: tuple[DicomwebServer, ScriptedSource],
) -> None:
    """Every read brings bytes within the stall, but the upload averages far below the
    minimum rate: 408 saying so, long before the client has sent what it meant to, and
    the connection closed (the rest of the body is not read as a request)."""
    srv, source = paced
    assert srv.address is not None
    raw, drips, after = await _trickle(srv.address.port, b"")
    status, headers, body = _answer(raw)
    assert status == 408, raw
    assert b"the upload came slower than 4 KiB/s" in body
    assert headers.get("connection") == "close" and after == b""
    assert drips < DRIPS  # cut while it still trickled (the stall alone never would)
    assert source.stored == []
    assert srv.metrics.uploads_cut == {"stalled": 0, "too_slow": 1}
    assert 'relay_dicomweb_uploads_cut_total{reason="too_slow"} 1.0' in _scraped(srv)
    assert srv.service.stow_uploads == 0


async def test_a_trickle_after_a_stored_part_is_202_with_the_pace_in_a_warning(
    paced: tuple[DicomwebServer, ScriptedSource],
) -> None:
    """The same trickle after a part was stored: 202 with that part, the rest refused,
    the reason in the Warning header; the connection closed."""
    srv, source = paced
    assert srv.address is not None
    raw, drips, after = await _trickle(srv.address.port, small_part("1.2.3.4.1"))
    status, headers, body = _answer(raw)
    assert status == 202, raw
    assert "the upload came slower than 4 KiB/s" in headers["warning"]
    assert headers.get("connection") == "close" and after == b""
    assert drips < DRIPS
    doc = Dataset.from_json(json.loads(body))
    assert [x.ReferencedSOPInstanceUID for x in doc.ReferencedSOPSequence] == ["1.2.3.4.1"]
    assert len(doc.FailedSOPSequence) == 1
    assert [uid for uid, _ in source.stored] == ["1.2.3.4.1"]
    assert srv.metrics.uploads_cut == {"stalled": 0, "too_slow": 1}


async def test_an_honest_upload_stored_slowly_upstream_is_not_cut(
    paced: tuple[DicomwebServer, ScriptedSource],
) -> None:
    """The client sends everything at once; the PACS takes STORE_SECONDS an instance, so
    the request lasts longer than stall + bytes / min_rate. Only the waits for the
    client's bytes count: all stored, 200."""
    srv, _ = paced
    source = SlowStore()
    srv.service.source = source  # type: ignore[assignment]
    parts = [small_part(f"1.2.3.4.{n}") for n in (1, 2, 3)]
    body = b"".join(parts) + media.closing("stowb")
    # the premise: a pace on the wall clock would have cut it before its end
    assert len(parts) * STORE_SECONDS > STALL + len(body) / MIN_RATE
    status, answer = await test_server.post(f"{srv.url}/studies", body)
    assert status == 200, answer
    assert [uid for uid, _ in source.stored] == ["1.2.3.4.1", "1.2.3.4.2", "1.2.3.4.3"]
    assert srv.metrics.uploads_cut == {"stalled": 0, "too_slow": 0}


async def test_the_pace_clock_counts_only_the_waits_for_the_client() -> None:
    """UploadPace alone: time between reads is not the client's; a read that does not
    come is stalled within the grace, too slow once the bytes' credit is spent."""
    sent = [0]
    pace = UploadPace(stall=0.2, min_rate=1024, arrived=lambda: sent[0])
    never = asyncio.Event()

    async def at_once() -> bytes:
        sent[0] += 102  # 0.1 s of credit
        return b"x" * 102

    await pace.read(at_once)
    await asyncio.sleep(0.5)  # the workstation's own time (storing): not counted
    assert pace.waited < 0.2
    with pytest.raises(UploadStalled):  # 0.2 s of stall before 0.3 s of pace
        await pace.read(never.wait)
    with pytest.raises(UploadTooSlow, match="slower than 1 KiB/s"):
        await pace.read(never.wait)  # what is left of the 0.3 s: under the stall
    with pytest.raises(UploadTooSlow):  # spent: refused before it waits at all
        await pace.read(at_once)
    with pytest.raises(ValueError):
        UploadPace(stall=0, min_rate=1, arrived=lambda: 0)
