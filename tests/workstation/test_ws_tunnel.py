"""The workstation's Tunnel: bounded waits for the link, NO_ROUTE retries and their limits."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.net.bytestream import StreamResetError
from relay.proto import ErrorCode
from relay.workstation.config import WorkstationConfig
from relay.workstation.service import Workstation
from relay.workstation.tunnel import REPLAY_CHUNK_COST, RoutedStream, Tunnel, TunnelUnavailable
from tests.ends_helpers import (
    WAIT,
    agent_config,
    device_identity_dir,
    running_gateway,
    tcp_service,
    wait_until,
    workstation_config,
)
from tests.pki_helpers import make_pki
from tests.ports import dead_port
from tests.workstation.test_ws_forward import agent_up


@contextlib.asynccontextmanager
async def linked(config: WorkstationConfig) -> AsyncIterator[Workstation]:
    ws = Workstation(config)
    await ws.start()
    try:
        yield ws
    finally:
        await ws.shutdown(0.5)


async def read_all(stream: RoutedStream) -> bytes:
    parts = []
    while chunk := await stream.read():
        parts.append(chunk)
    return b"".join(parts)


async def test_no_link_means_tunnel_unavailable_within_the_timeout(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    with dead_port() as nowhere:  # no gateway there, nor can one start listening
        config = workstation_config(device_identity_dir(pki, tmp_path), tmp_path, nowhere)
        await _unavailable_within_the_timeout(config)


async def _unavailable_within_the_timeout(config: WorkstationConfig) -> None:
    async with linked(config) as ws:
        with pytest.raises(TunnelUnavailable):
            await asyncio.wait_for(ws.tunnel.open_stream({"target": "tcp:x"}, timeout=0.3), WAIT)
        assert ws.tunnel.stats.unavailable == 1
        assert ws.kept.stats.last_error == "connect"


async def test_no_route_after_the_deadline_reaches_the_caller(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    async with running_gateway(pki, tmp_path) as gw:
        config = workstation_config(device_identity_dir(pki, tmp_path), tmp_path, gw.port)
        async with linked(config) as ws:
            await asyncio.wait_for(ws.kept.up.wait(), WAIT)
            # The Tunnel's NO_ROUTE retries, on the raw gateway link: the gateway refuses a
            # session with NO_ROUTE while the site has no agent.
            tunnel = Tunnel(ws.kept)
            stream = await tunnel.open_stream({"target": "session"}, timeout=0.5)
            await stream.write(b"request")
            with pytest.raises(StreamResetError) as info:
                await asyncio.wait_for(stream.read(), WAIT)
            assert info.value.code == ErrorCode.NO_ROUTE
            assert stream.attempts >= 2  # it did retry, within the deadline


async def test_beyond_the_replay_limit_no_route_is_not_retried(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    async with running_gateway(pki, tmp_path) as gw:
        config = workstation_config(device_identity_dir(pki, tmp_path), tmp_path, gw.port)
        async with linked(config) as ws:
            await asyncio.wait_for(ws.kept.up.wait(), WAIT)
            tunnel = Tunnel(ws.kept, replay_limit=10)
            stream = await tunnel.open_stream({"target": "session"}, timeout=WAIT)
            with contextlib.suppress(StreamResetError):
                await stream.write(b"more than ten bytes")  # the copy is dropped
            with pytest.raises(StreamResetError) as info:
                await asyncio.wait_for(stream.read(), WAIT)
            assert info.value.code == ErrorCode.NO_ROUTE
            assert tunnel.stats.rerouted == 0 and stream.attempts == 1


async def test_other_resets_are_not_retried(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    async with running_gateway(pki, tmp_path) as gw:
        config = workstation_config(device_identity_dir(pki, tmp_path), tmp_path, gw.port)
        async with agent_up(agent_config(pki, tmp_path, [gw.port], {})), linked(config) as ws:
            await wait_until(lambda: gw.server.router.sites() == ["main"])
            await asyncio.wait_for(ws.kept.up.wait(), WAIT)
            stream = await ws.tunnel.open_stream({"target": "tcp:unknown"})
            await stream.write(b"x")
            with pytest.raises(StreamResetError) as info:
                await asyncio.wait_for(stream.read(), WAIT)
            assert info.value.code == ErrorCode.FORBIDDEN
            assert ws.tunnel.stats.rerouted == 0


async def test_a_request_before_the_agent_waits_for_the_session(tmp_path: Path) -> None:
    """Request and EOF written before any agent is linked; they go through, once, when
    the session comes up (the gateway refused the session attempts with NO_ROUTE)."""
    pki = make_pki(tmp_path / "pki")
    async with running_gateway(pki, tmp_path) as gw, tcp_service() as echo:
        config = workstation_config(device_identity_dir(pki, tmp_path), tmp_path, gw.port)
        async with linked(config) as ws:
            await asyncio.wait_for(ws.kept.up.wait(), WAIT)

            async def request() -> bytes:
                stream = await ws.tunnel.open_stream({"target": "tcp:echo"}, timeout=WAIT)
                await stream.write(b"part one, ")
                await stream.write(b"part two")
                await stream.write_eof()
                return await read_all(stream)

            task = asyncio.create_task(request())
            await wait_until(lambda: ws.session.stats.failures >= 1)
            assert "no_route" in ws.session.stats.last_error
            assert not task.done()
            a_config = agent_config(pki, tmp_path, [gw.port], {"echo": (echo.port, False)})
            async with agent_up(a_config):
                assert await asyncio.wait_for(task, WAIT) == b"part one, part two"
            assert echo.connections == 1


async def test_the_replay_copy_is_dropped_at_the_open_deadline(tmp_path: Path) -> None:
    """A stream the agent never answers (nothing read: nothing confirms it) keeps its
    copy only while a replay can still happen."""
    pki = make_pki(tmp_path / "pki")
    async with running_gateway(pki, tmp_path) as gw:
        config = workstation_config(device_identity_dir(pki, tmp_path), tmp_path, gw.port)
        async with linked(config) as ws:
            await asyncio.wait_for(ws.kept.up.wait(), WAIT)
            tunnel = Tunnel(ws.kept)  # the raw gateway link: NO_ROUTE, as above
            stream = await tunnel.open_stream({"target": "session"}, timeout=0.2)
            await stream.write(b"request")
            assert stream.replay_held == len(b"request") + REPLAY_CHUNK_COST
            await wait_until(lambda: stream.replay_held == 0)
            with pytest.raises(StreamResetError):  # the NO_ROUTE, not retried past the deadline
                await asyncio.wait_for(stream.read(), WAIT)
            assert stream.attempts == 1


async def test_each_kept_write_costs_its_chunk_too(tmp_path: Path) -> None:
    """Bytes written one at a time count their per-chunk cost against the replay limit."""
    pki = make_pki(tmp_path / "pki")
    async with running_gateway(pki, tmp_path) as gw:
        config = workstation_config(device_identity_dir(pki, tmp_path), tmp_path, gw.port)
        async with linked(config) as ws:
            await asyncio.wait_for(ws.kept.up.wait(), WAIT)
            tunnel = Tunnel(ws.kept, replay_limit=10 * REPLAY_CHUNK_COST)
            stream = await tunnel.open_stream({"target": "session"}, timeout=WAIT)
            for _ in range(20):  # 20 bytes, twice the chunks the limit holds
                with contextlib.suppress(StreamResetError):
                    await stream.write(b"x")
            assert stream.replay_held == 0
            with pytest.raises(StreamResetError) as info:
                await asyncio.wait_for(stream.read(), WAIT)
            assert info.value.code == ErrorCode.NO_ROUTE
            assert tunnel.stats.rerouted == 0 and stream.attempts == 1
