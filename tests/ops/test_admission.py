"""relay.ops.admission on both event loops the roles run on (uvloop in production, the
stdlib's where uvloop is missing): vetting happens before a byte is read, and TLS keeps
its ClientHello (under uvloop a pause_reading() in connection_made holds nothing)."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from relay.ops.admission import Admission, ConnectionLimits
from tests.pki_helpers import HOST, LOOP_KINDS, LoopKind, make_pki, run

WAIT = 10.0  # an upper bound on every wait; never an assertion on time
LIMITS = ConnectionLimits(max_connections=4, head_timeout=30.0)


def _app(seen: list[str]) -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.Response(text="hello\n")

    app = web.Application()
    app.router.add_get("/", hello)
    return app


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="max_connections"):
        ConnectionLimits(max_connections=0, head_timeout=1.0)
    with pytest.raises(ValueError, match="head_timeout"):
        ConnectionLimits(max_connections=1, head_timeout=0)


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
