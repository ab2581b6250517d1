"""relay.ops.admission on both event loops the roles run on (uvloop in production, the
stdlib's where uvloop is missing): vetting happens before a byte is read, TLS keeps its
ClientHello (under uvloop a pause_reading() in connection_made holds nothing), and a body
that does not arrive in time ends its connection."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from relay.ops.admission import Admission, ConnectionLimits
from tests.ops.test_http import closed
from tests.pki_helpers import HOST, LOOP_KINDS, LoopKind, make_pki, run

WAIT = 10.0  # an upper bound on every wait; never an assertion on time
LIMITS = ConnectionLimits(max_connections=4, head_timeout=30.0)


def _app(seen: list[str]) -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.Response(text="hello\n")

    async def form(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append(f"POST {len(body)}")
        return web.Response(text="got it\n")

    app = web.Application()
    app.router.add_get("/", hello)
    app.router.add_post("/", form)
    return app


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="max_connections"):
        ConnectionLimits(max_connections=0, head_timeout=1.0)
    with pytest.raises(ValueError, match="head_timeout"):
        ConnectionLimits(max_connections=1, head_timeout=0)
    with pytest.raises(ValueError, match="body_timeout"):
        ConnectionLimits(max_connections=1, head_timeout=1.0, body_timeout=0)


@pytest.mark.parametrize("kind", LOOP_KINDS)
def test_a_body_dripped_past_its_deadline_ends_the_connection(kind: LoopKind) -> None:
    """A complete head, then part of the body and silence: the connection is aborted once
    `body_timeout` has passed since the head, the handler never answers, and it counts;
    a whole body on a kept-alive connection is served, and that connection outlives the
    deadline."""
    limits = ConnectionLimits(max_connections=4, head_timeout=30.0, body_timeout=0.5)
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"

    async def main() -> None:
        seen: list[str] = []
        admission = Admission(_app(seen), limits)
        [bound] = await admission.start(HOST, 0)
        try:
            kept = await asyncio.open_connection(HOST, bound.port)
            kept[1].write(head + bytes(100))
            async with asyncio.timeout(WAIT):
                assert (await kept[0].readuntil(b"got it\n")).startswith(b"HTTP/1.1 200 ")
            reader, writer = await asyncio.open_connection(HOST, bound.port)
            writer.write(head + bytes(10))
            assert await closed(reader) == b""  # nothing answered
            writer.close()
            assert admission.timed_out == 1 and seen == ["POST 100"]
            kept[1].write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # past the first deadline
            async with asyncio.timeout(WAIT):
                assert (await kept[0].readuntil(b"hello\n")).startswith(b"HTTP/1.1 200 ")
            kept[1].close()
            assert admission.timed_out == 1 and seen == ["POST 100", "/"]
        finally:
            await admission.stop()

    run(kind, main())


@pytest.mark.parametrize("kind", LOOP_KINDS)
def test_nothing_is_read_before_the_vetting_says_yes(kind: LoopKind) -> None:
    """A request sent at once waits, unread, for the vetting; answered once it admits."""

    async def main() -> None:
        seen: list[str] = []
        asked = asyncio.Event()
        verdict = asyncio.Event()

        async def vet(peer: tuple[str, int], local: tuple[str, int]) -> bytes | None:
            asked.set()
            await verdict.wait()
            return None

        admission = Admission(_app(seen), LIMITS, vet=vet)
        [bound] = await admission.start(HOST, 0)
        try:
            reader, writer = await asyncio.open_connection(HOST, bound.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(asyncio.shield(asked.wait()), WAIT)
            for _ in range(20):  # let the loop run: reads, parses, handlers if it could
                await asyncio.sleep(0.005)
            server = admission.runner.server
            assert seen == [] and server is not None and server.connections == []
            verdict.set()
            async with asyncio.timeout(WAIT):
                assert (await reader.readuntil(b"hello\n")).startswith(b"HTTP/1.1 200 ")
            assert seen == ["/"]
            writer.close()
        finally:
            await admission.stop()

    run(kind, main())


@pytest.mark.parametrize("kind", LOOP_KINDS)
def test_a_refusal_from_the_vetting_is_answered_and_the_request_never_read(
    kind: LoopKind,
) -> None:
    async def main() -> None:
        seen: list[str] = []

        async def vet(peer: tuple[str, int], local: tuple[str, int]) -> bytes | None:
            return b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

        admission = Admission(_app(seen), LIMITS, vet=vet)
        [bound] = await admission.start(HOST, 0)
        try:
            reader, writer = await asyncio.open_connection(HOST, bound.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(WAIT):
                assert (await reader.read()).startswith(b"HTTP/1.1 403 ")
            writer.close()
            assert seen == [] and admission.open == 0
        finally:
            await admission.stop()

    run(kind, main())


@pytest.mark.parametrize("kind", LOOP_KINDS)
def test_https_is_served_on_both_loops(kind: LoopKind, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki.gateway.cert, pki.gateway.key)

    async def main() -> None:
        seen: list[str] = []
        admission = Admission(_app(seen), LIMITS, ssl_context=ctx)
        [bound] = await admission.start(HOST, 0)
        try:
            async with aiohttp.ClientSession() as http:
                for _ in range(2):
                    async with http.get(f"https://{HOST}:{bound.port}/", ssl=False) as r:
                        assert (r.status, await r.text()) == (200, "hello\n")
            assert seen == ["/", "/"]
        finally:
            await admission.stop()
        assert admission.open == 0

    run(kind, main())
