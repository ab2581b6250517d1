"""The agent reloads off its event loop (Agent.reloader, relay.ops.reloader): while a
SIGHUP's reload waits on a config that is a FIFO nobody has written yet, a device's
stream still crosses the agent; then the file arrives and applies. A burst of SIGHUPs
makes at most one more reload; a stop during a held reload ends the run at once.

The agent runs in this process with its real signal handlers and the signals are raised
here. On the old code the SIGHUP handler read the FIFO on the loop: nothing else ran
until its deadline, and the reload failed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.agent.config import load_agent_config
from relay.agent.service import Agent, run_agent
from tests.agent.test_dispatch import device_link, read_all
from tests.ends_helpers import WAIT, running_gateway, tcp_service, wait_until
from tests.pki_helpers import HOST, SitePki, make_pki
from tests.reload_helpers import HAS_FIFO, feed, held_reader_async, make_fifo
from tests.session_helpers import sealed

pytestmark = pytest.mark.skipif(
    not HAS_FIFO or not hasattr(signal, "SIGHUP"), reason="SIGHUP and FIFOs are POSIX"
)


@dataclass
class Running:
    agent: Agent
    stop: asyncio.Event
    task: asyncio.Task[None]
    config: Path
    text: str
    gateway_port: int
    pki: SitePki


@contextlib.asynccontextmanager
async def agent_with_signals(tmp_path: Path) -> AsyncIterator[Running]:
    """An agent with its SIGHUP handler, a gateway and an echo service it serves."""
    pki: SitePki = make_pki(tmp_path / "pki")
    async with running_gateway(pki, tmp_path) as gw, tcp_service() as echo:
        config = tmp_path / "agent.yaml"
        text = (
            f"site: main\ngateways: ['{HOST}:{gw.port}']\n"
            f"tls: {{cert: {pki.agent.cert}, key: {pki.agent.key}, ca: {pki.ca}}}\n"
            f"state_dir: {tmp_path / 'state'}\nservices: {{echo: '{HOST}:{echo.port}'}}\n"
            "reconnect: {initial: 0.05s, max: 0.5s}\ndrain_grace: 1s\n"
        )
        config.write_text(text)
        stop = asyncio.Event()
        started: asyncio.Future[Agent] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(
            run_agent(load_agent_config(config), stop=stop, handlers={}, started=started.set_result)
        )
        agent = await asyncio.wait_for(started, WAIT)
        try:
            await wait_until(lambda: gw.server.router.sites() == ["main"])
            yield Running(agent, stop, task, config, text, gw.port, pki)
        finally:
            stop.set()
            await asyncio.wait_for(task, WAIT)


async def echo_through(running: Running) -> None:
    """A device's sealed session to the agent, and a stream to the echo service."""
    pki = running.pki
    outer = await device_link(pki, running.gateway_port)
    device = await sealed(outer, pki, pki.device("ws1"))
    try:
        stream = device.open_stream({"target": "tcp:echo"})
        payload = os.urandom(100_000)
        await stream.write(payload)
        await stream.write_eof()
        assert await asyncio.wait_for(read_all(stream), WAIT) == payload
    finally:
        device.close()


async def test_a_stream_crosses_the_agent_while_a_reload_waits_for_its_config(
    tmp_path: Path,
) -> None:
    async with agent_with_signals(tmp_path) as running:
        make_fifo(running.config)
        signal.raise_signal(signal.SIGHUP)
        writer = await held_reader_async(running.config)  # the reload is reading
        await echo_through(running)  # served meanwhile
        assert (running.agent.reloads.ok, running.agent.reloads.error) == (0, 0)
        feed(writer, running.text.replace("drain_grace: 1s", "drain_grace: 3s"))
        await wait_until(lambda: running.agent.reloads.ok == 1)
        assert running.agent.config.drain_grace == 3.0 and running.agent.reloads.error == 0


async def test_a_burst_of_sighups_makes_at_most_two_reloads(tmp_path: Path) -> None:
    async with agent_with_signals(tmp_path) as running:
        make_fifo(running.config)
        signal.raise_signal(signal.SIGHUP)
        writer = await held_reader_async(running.config)
        for _ in range(20):
            signal.raise_signal(signal.SIGHUP)
        await wait_until(lambda: running.agent.reloader.waiting)  # the loop has them
        feed(writer, running.text)
        await wait_until(lambda: running.agent.reloads.ok == 1)  # and closed the FIFO
        feed(await held_reader_async(running.config), running.text.replace("1s", "2s"))
        await wait_until(lambda: not running.agent.reloader.running)
        assert running.agent.reloader.prepares == 2 and running.agent.reloads.ok == 2
        assert running.agent.config.drain_grace == 2.0  # the last file


async def test_a_stop_during_a_held_reload_ends_the_run(tmp_path: Path) -> None:
    async with agent_with_signals(tmp_path) as running:
        make_fifo(running.config)
        signal.raise_signal(signal.SIGHUP)
        writer = await held_reader_async(running.config)
        try:
            running.stop.set()
            await asyncio.wait_for(running.task, WAIT)  # while the FIFO still has no data
        finally:
            os.close(writer)  # the abandoned prepare ends
        assert (running.agent.reloads.ok, running.agent.reloads.error) == (0, 0)
