"""Bounds on what a local client can open at once, over real HTTP: requests in progress
(503 + Retry-After beyond MAX_REQUESTS), open connections (MAX_CONNECTIONS), and
operations towards the agent (MAX_AGENT_FINDS, queued briefly, then 503)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from pydicom.dataset import Dataset

from relay.dicom.codec import DicomLimits, MessageCodec
from relay.workstation.dicomweb.app import MAX_REQUESTS
from relay.workstation.dicomweb.server import MAX_CONNECTIONS
from relay.workstation.dicomweb.source import (
    MAX_AGENT_FINDS,
    DicomSource,
    FindResult,
    UpstreamError,
)
from tests.workstation.dicomweb.test_server import scripted
from tests.workstation.test_localpeer import NOBODY, _needs_other_account, client, received


async def _until(check: Any) -> None:
    for _ in range(500):  # 10 s
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


async def test_requests_beyond_max_requests_are_503_with_retry_after() -> None:
    async with scripted() as (srv, source):
        inside = 0
        peak = 0
        gate = asyncio.Event()

        async def find(identifier: Dataset, max_matches: int, *, skip: int = 0) -> FindResult:
            nonlocal inside, peak
            inside += 1
            peak = max(peak, inside)
            await gate.wait()
            inside -= 1
            return FindResult([])

        source.find = find  # type: ignore[method-assign]
        total = MAX_REQUESTS + 16
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

            async def one(i: int) -> tuple[int, str | None]:
                async with http.get(f"{srv.url}/studies?PatientID=P{i}") as r:
                    await r.read()
                    return r.status, r.headers.get("Retry-After")

            tasks = [asyncio.ensure_future(one(i)) for i in range(total)]
            await _until(lambda: sum(t.done() for t in tasks) == total - MAX_REQUESTS)
            assert peak == MAX_REQUESTS
            gate.set()
            answers = await asyncio.gather(*tasks)
        assert sorted(s for s, _ in answers).count(503) == total - MAX_REQUESTS
        assert {r for s, r in answers if s == 503} == {"1"}
        assert {s for s, _ in answers} == {204, 503}
        assert srv.service.in_progress == 0


async def test_connections_beyond_max_connections_are_refused_at_once() -> None:
    async with scripted() as (srv, _):
        assert srv.address is not None
        port = srv.address.port
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(MAX_CONNECTIONS)]
        await _until(lambda: len(srv._runner.server.connections) == MAX_CONNECTIONS)  # type: ignore[union-attr]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answer = await asyncio.wait_for(reader.read(), 5)  # closed after its 503
        assert answer.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in answer
        writer.close()
        for _, w in idle[:8]:
            w.close()
        await _until(lambda: len(srv._runner.server.connections) < MAX_CONNECTIONS)  # type: ignore[union-attr]
        async with aiohttp.ClientSession() as http, http.get(f"{srv.url}/studies") as r:
            assert r.status == 200
        for _, w in idle[8:]:
            w.close()


async def test_over_the_cap_another_account_is_refused_once_as_busy() -> None:
    """One admission step, the cap before the account: a connection over the cap from
    another account gets the 503 alone (no 403 after it, no account lookup spent on it),
    counted once as over the limit and not as another account's; under the cap, the
    same client gets the 403, counted once by the gate."""
    _needs_other_account()
    async with scripted() as (srv, _):
        assert srv.address is not None and srv._runner is not None
        port, server = srv.address.port, srv._runner.server
        assert server is not None
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(MAX_CONNECTIONS)]
        await _until(lambda: len(server.connections) == MAX_CONNECTIONS)
        srv.accounts.access = "same-user"  # for connections opened from now on
        looked_up = 0
        check = srv.accounts._check

        def counted(peer: tuple[str, int], local: tuple[str, int]) -> bool:
            nonlocal looked_up
            looked_up += 1
            return check(peer, local)

        srv.accounts._check = counted
        request = b"GET /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        with client(port, user=NOBODY, send=request) as other:
            answer = await asyncio.to_thread(received, other)
        assert answer.startswith(b"HTTP/1.1 503 ") and answer.count(b"HTTP/1.1") == 1
        assert (looked_up, srv.accounts.refused) == (0, {})
        assert srv.metrics.counters()["connections_over_limit"] == 1
        for _, w in idle:
            w.close()
        await _until(lambda: len(server.connections) == 0)
        with client(port, user=NOBODY, send=request) as other:
            answer = await asyncio.to_thread(received, other)
        assert answer.startswith(b"HTTP/1.1 403 ") and answer.count(b"HTTP/1.1") == 1
        assert (looked_up, srv.accounts.refused) == (1, {"dicomweb": 1})
        assert srv.metrics.counters()["connections_over_limit"] == 1


async def test_c_finds_towards_the_agent_are_bounded_then_503() -> None:
    opened = 0
    gate = asyncio.Event()

    async def open_stream(headers: Any) -> Any:
        nonlocal opened
        opened += 1
        await gate.wait()
        raise OSError("no link")

    source = DicomSource(open_stream, MessageCodec(DicomLimits()), timeout=30.0)
    source.queue_wait = 0.3
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    finds = [asyncio.ensure_future(source.find(ident, 10)) for _ in range(MAX_AGENT_FINDS + 4)]
    await _until(lambda: sum(f.done() for f in finds) == 4)
    assert opened == MAX_AGENT_FINDS
    refused = [f.exception() for f in finds if f.done()]
    assert all(isinstance(e, UpstreamError) and e.http_status == 503 for e in refused)
    gate.set()
    await asyncio.gather(*finds, return_exceptions=True)
    later = asyncio.ensure_future(source.find(ident, 10))  # the slots are free again
    await asyncio.sleep(0.05)
    assert opened == MAX_AGENT_FINDS + 1
    await asyncio.gather(later, return_exceptions=True)
