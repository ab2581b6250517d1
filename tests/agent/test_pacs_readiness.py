"""The agent is ready only while its PACS answers C-ECHO (deploy/README's /readyz promise).

A real gateway and agent in-process over TLS on loopback, the embedded PACS as the PACS;
the C-ECHO is bounded and cached, and /readyz awaits an async readiness callback.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import ClientSession
from prometheus_client import CollectorRegistry

from relay.agent.pacs_check import PacsCheck
from relay.agent.service import Agent, run_agent
from relay.dicom.pacs_echo import echo_pacs
from relay.dicom.pacs_target import PacsTarget
from relay.ops.config import Address
from relay.ops.http import AdminServer
from relay_dev.pacs import EmbeddedPacs
from tests.ends_helpers import agent_config, running_gateway, wait_until
from tests.pki_helpers import HOST, SitePki, make_pki

WAIT = 20.0


@pytest.fixture
def pki(tmp_path: Path) -> SitePki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def pacs() -> Iterator[EmbeddedPacs]:
    server = EmbeddedPacs(ae_title="RELAYPACS", port=0, timeout=10.0)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def _ready(agent: Agent) -> tuple[bool, str]:
    return await agent.readiness()


async def test_readiness_follows_the_pacs(pki: SitePki, tmp_path: Path, pacs: EmbeddedPacs) -> None:
    async with running_gateway(pki, tmp_path) as gateway:
        config = agent_config(
            pki,
            tmp_path,
            [gateway.port],
            {},
            pacs=PacsTarget("RELAYPACS", HOST, pacs.port, timeout=10.0),
        )
        stop = asyncio.Event()
        started: asyncio.Future[Agent] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(
            run_agent(config, stop=stop, started=started.set_result, handle_signals=False)
        )
        try:
            agent = await asyncio.wait_for(started, WAIT)
            await wait_until(lambda: agent.gateways.up > 0, WAIT)
            ok, why = await _ready(agent)
            assert ok, why
            assert f"PACS RELAYPACS@{HOST}:{pacs.port} answers C-ECHO" in why
            echoes = pacs.events.echoes
            assert echoes >= 1
            for _ in range(5):  # cached: a busy prober costs the PACS nothing more
                assert (await _ready(agent))[0]
            assert pacs.events.echoes == echoes

            where = f"PACS RELAYPACS@{HOST}:{pacs.port}"
            pacs.stop()  # the PACS goes away: not ready once the cached answer expires
            async with asyncio.timeout(WAIT):
                while (answer := await _ready(agent))[0]:  # noqa: ASYNC110 - a condition
                    await asyncio.sleep(0.2)
            assert f"{where} is unreachable" in answer[1], answer
            assert agent.gateways.up > 0  # the links are fine; the PACS is what is missing
        finally:
            stop.set()
            await asyncio.wait_for(task, WAIT)


async def test_a_pacs_that_never_answers_is_not_ready_within_the_bound() -> None:
    """A PACS that accepts TCP and says nothing: the probe gives up, it does not hang."""
    with socket.socket() as silent:
        silent.bind((HOST, 0))
        silent.listen()  # connections wait in the backlog; nothing is ever read or sent
        target = PacsTarget("SILENT", HOST, silent.getsockname()[1], timeout=5.0)
        check = PacsCheck(lambda: echo_pacs(target, 0.5), wait=1.0)
        started = time.monotonic()
        ok, why = await check()
        assert not ok
        assert time.monotonic() - started < 2.0, why


async def test_one_echo_at_a_time_and_cached() -> None:
    calls = 0
    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    def echo() -> tuple[bool, str]:
        nonlocal calls
        calls += 1
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(WAIT)
        return True, "fine"

    check = PacsCheck(echo, ttl=60.0, wait=WAIT)
    waiting = [asyncio.create_task(check()) for _ in range(5)]
    await wait_until(lambda: calls == 1)
    release.set()
    assert await asyncio.gather(*waiting) == [(True, "fine")] * 5
    assert await check() == (True, "fine")
    assert calls == 1


async def test_readyz_awaits_an_async_readiness_callback() -> None:
    async def ready() -> tuple[bool, str]:
        await asyncio.sleep(0)
        return False, "PACS down"

    admin = AdminServer(Address(HOST, 0), CollectorRegistry(), ready)
    await admin.start()
    try:
        async with (
            ClientSession() as session,
            session.get(f"http://{HOST}:{admin.port}/readyz") as response,
        ):
            assert response.status == 503
            assert await response.text() == "PACS down\n"
    finally:
        await admin.stop()
