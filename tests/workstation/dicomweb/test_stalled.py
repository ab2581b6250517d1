"""A viewer that stops reading a series answer: its memory counts against hold_size while
its handler waits, and the write timeout (dicomweb.timeout) ends it; over real HTTP."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from pydicom.dataset import Dataset

from relay.dicom import status as st
from relay.dicom.codec import FinalResponse, Instance
from relay.ops.config import Address
from relay.workstation.dicomweb.server import DicomwebServer
from relay.workstation.dicomweb.settings import DicomwebConfig
from relay.workstation.dicomweb.source import FindResult
from tests.workstation.dicomweb.test_server import CT

MiB = 1024 * 1024
STUDY = "1.2.3"
PER_SERIES = 20  # instances of ~0.5 MB: ~10 MB a series, more than the socket buffers


class ManySeries:
    """Any series UID under STUDY has PER_SERIES instances (the CT slices' bytes)."""

    async def find(self, identifier: Dataset, max_matches: int, *, skip: int = 0) -> FindResult:
        return FindResult([])

    async def retrieve(self, identifier: Dataset, outcome: Any = None, *,
                       headers_only: bool = False, priority: Any = None,
                       ) -> AsyncIterator[Instance]:  # fmt: skip
        series = str(identifier.SeriesInstanceUID)
        for i in range(PER_SERIES):
            src = CT[i % len(CT)]
            yield Instance(src.sop_class, f"{series}.{i}", src.transfer_syntax, src.data)
        if outcome is not None:
            outcome.append(FinalResponse(st.SUCCESS, completed=PER_SERIES, failed=0))


def stalled_get(port: int, path: str) -> socket.socket:
    """A GET whose client never reads its answer."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    return s


def closed_by_server(s: socket.socket) -> bool:
    """Whether the server closed `s` (what it had sent read first)."""
    s.setblocking(False)
    try:
        while s.recv(1 << 16):
            pass
    except BlockingIOError:
        return False  # open, nothing more to read
    except ConnectionResetError:
        return True
    return True  # end of stream


async def whole(http: aiohttp.ClientSession, url: str) -> bool:
    """Whether the answer came whole (200 and its closing delimiter)."""
    try:
        async with http.get(url) as r:
            await r.read()
            return r.status == 200
    except aiohttp.ClientPayloadError:
        return False


async def test_a_stalled_reader_counts_against_hold_size_until_the_write_timeout() -> None:
    async def no_link(headers: Any) -> Any:
        raise OSError("no link")

    timeout = 1.5
    config = DicomwebConfig(Address("127.0.0.1", 0), hold_size=16 * MiB, timeout=timeout)
    srv = DicomwebServer(config, no_link)
    srv.service.source = srv.service.retriever.source = ManySeries()  # type: ignore[assignment]
    await srv.start()
    assert srv.address is not None
    retriever = srv.service.retriever
    stalled = stalled_get(srv.address.port, f"/dicom-web/studies/{STUDY}/series/{STUDY}.0")
    try:
        for _ in range(200):
            flight = retriever.flights.get((STUDY, f"{STUDY}.0"))
            if flight is not None and flight.done:
                break
            await asyncio.sleep(0.01)
        assert flight is not None and flight.done
        url = f"{srv.url}/studies/{STUDY}/series/{STUDY}.1"
        async with aiohttp.ClientSession() as http:
            # the stalled answer's 10 MB stay taken: another 10 MB series does not fit
            assert not await whole(http, url)
            assert retriever.held <= config.hold_size + len(CT[0].data)
            # the write timeout ends the stalled answer, and its memory is free again
            for _ in range(int((timeout + 3) / 0.05)):
                if flight.readers == 0:
                    break
                await asyncio.sleep(0.05)
            assert flight.readers == 0
            assert await whole(http, url)
        for _ in range(100):  # what the server had sent still comes, then its end
            if closed_by_server(stalled):
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the stalled connection is still open")
    finally:
        stalled.close()
        await srv.stop()
