"""Workstation port forwards through the real gateway to the agent, all in-process, real TLS."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.agent.config import AgentConfig
from relay.agent.service import Agent, run_agent
from relay.ops.config import Address
from relay.workstation.config import WorkstationConfig
from relay.workstation.service import Workstation, run_workstation
from tests.ends_helpers import (
    WAIT,
    GatewayHandle,
    TcpService,
    agent_config,
    device_identity_dir,
    forward_zero,
    forwarded,
    running_gateway,
    start_gateway,
    tcp_exchange,
    tcp_service,
    wait_until,
    workstation_config,
)
from tests.pki_helpers import HOST, SitePki, make_pki
from tests.ports import dead_port, reserve


@contextlib.asynccontextmanager
async def agent_up(config: AgentConfig) -> AsyncIterator[Agent]:
    stop = asyncio.Event()
    started: asyncio.Future[Agent] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        run_agent(config, stop=stop, handlers={}, started=started.set_result, handle_signals=False)
    )
    agent = await asyncio.wait_for(started, WAIT)
    try:
        yield agent
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT)


@contextlib.asynccontextmanager
async def workstation_up(
    config: WorkstationConfig,
) -> AsyncIterator[tuple[Workstation, asyncio.Event, asyncio.Task[int]]]:
    stop = asyncio.Event()
    started: asyncio.Future[Workstation] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        run_workstation(config, stop=stop, started=started.set_result, handle_signals=False)
    )
    ws = await asyncio.wait_for(started, WAIT)
    try:
        yield ws, stop, task
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT)


@dataclass
class Chain:
    pki: SitePki
    tmp: Path
    gateway: GatewayHandle
    echo: TcpService
    agent_config: AgentConfig
    ws: Workstation

    def port(self, service: str) -> Address:
        """Where the workstation forwards `service` (port 0 in its config)."""
        return forwarded(self.ws, service)


@pytest.fixture
async def chain(tmp_path: Path) -> AsyncIterator[Chain]:
    pki = make_pki(tmp_path / "pki")
    async with running_gateway(pki, tmp_path) as gw, tcp_service() as echo:
        services = {"echo": (echo.port, False), "zecho": (echo.port, True)}
        a_config = agent_config(pki, tmp_path, [gw.port], services)
        w_config = workstation_config(
            device_identity_dir(pki, tmp_path),
            tmp_path,
            gw.port,
            forward_zero("echo", "zecho", "secret"),
        )
        async with agent_up(a_config), workstation_up(w_config) as (ws, _, _):
            await asyncio.wait_for(ws.kept.up.wait(), WAIT)
            await wait_until(lambda: gw.server.router.sites() == ["main"])
            yield Chain(pki, tmp_path, gw, echo, a_config, ws)


async def test_forward_round_trip_with_half_close(chain: Chain) -> None:
    payload = os.urandom(3_000_000)
    async with asyncio.timeout(WAIT * 2):
        got = await tcp_exchange(chain.port("echo"), payload)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    assert chain.ws.forwarder.stats.connections["echo"] == 1
    assert chain.ws.forwarder.compresses == {"echo": False}


async def test_compression_is_learned_per_service(chain: Chain) -> None:
    stats = chain.ws.forwarder.stats.codec
    text = b"radiology report text, very compressible. " * 20_000
    async with asyncio.timeout(WAIT):
        assert await tcp_exchange(chain.port("zecho"), text) == text
    assert chain.ws.forwarder.compresses["zecho"] is True
    # First stream: downstream compressed by the agent; upstream still raw.
    assert stats.wire_in < stats.raw_in / 10
    assert stats.wire_out == stats.raw_out + 1
    before_raw, before_wire = stats.raw_out, stats.wire_out
    async with asyncio.timeout(WAIT):
        assert await tcp_exchange(chain.port("zecho"), text) == text
    # Second stream: we compress upstream too.
    assert stats.raw_out - before_raw == len(text)
    assert stats.wire_out - before_wire < len(text) / 10
    assert chain.ws.forwarder.compresses["zecho"] is True


async def test_twenty_concurrent_forwarded_connections(chain: Chain) -> None:
    payloads = [os.urandom(200_000 + i) for i in range(20)]
    async with asyncio.timeout(WAIT * 3):
        results = await asyncio.gather(
            *(
                tcp_exchange(chain.port("echo" if i % 2 else "zecho"), p)
                for i, p in enumerate(payloads)
            )
        )
    assert results == payloads


async def test_a_service_the_agent_does_not_allow_is_reset(chain: Chain) -> None:
    with pytest.raises(ConnectionResetError):
        async with asyncio.timeout(WAIT):
            await tcp_exchange(chain.port("secret"), b"let me in")
    assert chain.ws.forwarder.stats.outcomes["stream_reset"] == 1


async def test_gateway_restart_then_forwarding_works_again(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    async with tcp_service() as echo:
        kept = reserve()  # the gateway's port, the same after its restart
        port = kept.getsockname()[1]
        if sys.platform == "win32":
            # Windows refuses a bind without SO_REUSEADDR (the gateway's, by
            # socket.create_server) on a port a socket with it holds: given back, a race
            kept.close()
        gw = await start_gateway(pki, tmp_path, port)
        a_config = agent_config(pki, tmp_path, [port], {"echo": (echo.port, False)})
        w_config = workstation_config(
            device_identity_dir(pki, tmp_path), tmp_path, port, forward_zero("echo")
        )
        async with agent_up(a_config) as agent, workstation_up(w_config) as (ws, _, _):
            fwd = forwarded(ws, "echo")
            await wait_until(lambda: gw.server.router.sites() == ["main"])
            assert await asyncio.wait_for(tcp_exchange(fwd, b"one"), WAIT) == b"one"
            await gw.shutdown()
            await wait_until(lambda: not ws.kept.up.is_set() and agent.gateways.up == 0)
            gw = await start_gateway(pki, tmp_path, port)
            try:
                await asyncio.wait_for(ws.kept.up.wait(), WAIT)
                await wait_until(lambda: agent.gateways.up == 1)
                assert await asyncio.wait_for(tcp_exchange(fwd, b"two"), WAIT) == b"two"
                assert ws.kept.stats.reconnects == 1 and agent.gateways.reconnects == 1
            finally:
                await gw.shutdown()
                kept.close()


async def test_no_route_is_retried_until_the_agent_arrives(tmp_path: Path) -> None:
    """The workstation is linked before the agent: the request waits and then succeeds."""
    pki = make_pki(tmp_path / "pki")
    async with running_gateway(pki, tmp_path) as gw, tcp_service() as echo:
        w_config = workstation_config(
            device_identity_dir(pki, tmp_path), tmp_path, gw.port, forward_zero("echo")
        )
        a_config = agent_config(pki, tmp_path, [gw.port], {"echo": (echo.port, False)})
        async with workstation_up(w_config) as (ws, _, _):
            await asyncio.wait_for(ws.kept.up.wait(), WAIT)
            fwd = forwarded(ws, "echo")
            exchange = asyncio.create_task(tcp_exchange(fwd, b"early request"))
            await wait_until(lambda: ws.session.stats.failures >= 2)  # NO_ROUTE, retried
            assert not exchange.done()
            async with agent_up(a_config):
                assert await asyncio.wait_for(exchange, WAIT) == b"early request"
            assert echo.connections == 1  # replayed once the route existed, not duplicated


async def test_drain_lets_a_forwarded_connection_finish(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    release = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()
        await release.wait()
        writer.write(b"done:" + data)
        writer.write_eof()
        await writer.drain()
        writer.close()

    async with running_gateway(pki, tmp_path) as gw, tcp_service(slow) as svc:
        a_config = agent_config(pki, tmp_path, [gw.port], {"slow": (svc.port, False)})
        w_config = workstation_config(
            device_identity_dir(pki, tmp_path), tmp_path, gw.port, forward_zero("slow"),
            drain_grace=5,
        )  # fmt: skip
        async with agent_up(a_config), workstation_up(w_config) as (ws, stop, task):
            fwd = forwarded(ws, "slow")
            await wait_until(lambda: gw.server.router.sites() == ["main"])
            exchange = asyncio.create_task(tcp_exchange(fwd, b"work"))
            await wait_until(lambda: svc.connections == 1)
            stop.set()
            await wait_until(lambda: not ws.forwarder._servers)
            with pytest.raises(OSError):
                await asyncio.open_connection(fwd.host, fwd.port)  # no longer accepting
            assert not task.done()
            release.set()
            assert await asyncio.wait_for(exchange, WAIT) == b"done:work"
            await asyncio.wait_for(task, WAIT)


def test_nodelay_on_accepted_sockets() -> None:
    from relay.net.tcpsplice import tune_socket

    async def scenario() -> None:
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def on(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            tune_socket(writer)
            sock = writer.get_extra_info("socket")
            accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on, HOST, 0)
        port = server.sockets[0].getsockname()[1]
        _, w = await asyncio.open_connection(HOST, port)
        assert await asyncio.wait_for(accepted, WAIT) == 1
        w.close()
        server.close()

    asyncio.run(scenario())


async def test_a_taken_forward_port_names_the_key(tmp_path: Path) -> None:
    from relay.ops.config import ConfigError

    pki = make_pki(tmp_path / "pki")
    blocker = await asyncio.start_server(lambda r, w: None, HOST, 0)
    taken = blocker.sockets[0].getsockname()[1]
    try:
        with dead_port() as nowhere, pytest.raises(ConfigError) as info:
            config = workstation_config(
                device_identity_dir(pki, tmp_path),
                tmp_path,
                nowhere,
                {Address(HOST, taken): "echo"},
            )
            await run_workstation(config, handle_signals=False)
    finally:
        blocker.close()
    assert info.value.key == f'forward."{HOST}:{taken}"'
    assert "workstation.yaml" in str(info.value)
