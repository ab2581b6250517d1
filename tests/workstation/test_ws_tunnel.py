"""The workstation's Tunnel: bounded waits for the link, NO_ROUTE retries and their limits."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.net.aio import Link, Stream
from relay.net.bytestream import StreamResetError, read_exactly
from relay.ops.config import Address
from relay.proto import ErrorCode, LinkSettings
from relay.proto.frames import DEFAULT_STREAM_WINDOW
from relay.workstation.config import WorkstationConfig
from relay.workstation.service import Workstation
from relay.workstation.tunnel import (
    REPLAY_CHUNK_COST,
    REPLAY_LIMIT,
    RoutedStream,
    Tunnel,
    TunnelUnavailable,
)
from tests.ends_helpers import (
    WAIT,
    agent_config,
    device_identity_dir,
    running_gateway,
    tcp_service,
    wait_until,
    workstation_config,
)
from tests.pki_helpers import HOST, make_pki
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


# -- Replays against writes, EOF and resets that land meanwhile. Two real Links over
# loopback, no gateway: the test plays the far end, refusing and accepting each attempt.

WINDOW = DEFAULT_STREAM_WINDOW  # the far end's stream window: what a replay sends unread
FIRST = bytes(range(256)) * (100 * 1024 // 256)  # more than WINDOW: its replay waits for credit
LATE = b"written while the copy was being replayed"
NARROW = LinkSettings(stream_window=WINDOW)  # the far end's


@dataclass
class _Stats:
    last_error: str = ""


class _OneLink:
    """The Tunnel's LinkSource over one Link that stays up (the session, in the service)."""

    def __init__(self, link: Link) -> None:
        self.up = asyncio.Event()
        self.up.set()
        self._link = link
        self._stats = _Stats()

    @property
    def link(self) -> Link | None:
        return self._link

    @property
    def address(self) -> Address:
        return Address(HOST, 0)

    @property
    def stats(self) -> _Stats:
        return self._stats


@dataclass
class FarEnd:
    tunnel: Tunnel
    attempts: asyncio.Queue[Stream]  # each stream the tunnel opens, as the far end sees it


@contextlib.asynccontextmanager
async def far_end() -> AsyncIterator[FarEnd]:
    loop = asyncio.get_running_loop()
    attempts: asyncio.Queue[Stream] = asyncio.Queue()
    accepted: asyncio.Future[Link] = loop.create_future()

    def server_link() -> Link:
        link = Link(client=False, settings=NARROW, on_stream=attempts.put_nowait)
        accepted.set_result(link)
        return link

    server = await loop.create_server(server_link, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    _, client = await loop.create_connection(
        lambda: Link(client=True, settings=LinkSettings()), HOST, port
    )
    peer = await asyncio.wait_for(accepted, WAIT)
    try:
        yield FarEnd(Tunnel(_OneLink(client), open_timeout=WAIT), attempts)
    finally:
        client.abort()
        peer.abort()
        server.close()


async def read_to_eof(stream: Stream) -> bytes:
    parts = []
    while chunk := await stream.read():
        parts.append(chunk)
    return b"".join(parts)


@dataclass
class Replaying:
    stream: RoutedStream
    reader: asyncio.Task[bytes]  # reading it, as the forwarder does: it met the refusal
    second: Stream  # the second attempt, as the far end sees it


async def replay_waiting_for_credit(far: FarEnd) -> Replaying:
    """A stream whose first attempt was refused after FIRST, and whose replay of FIRST on
    the second attempt has taken its copy and waits for credit (the far end reads none)."""
    stream = await far.tunnel.open_stream({"target": "tcp:echo"})
    first = asyncio.create_task(stream.write(FIRST))  # beyond the window: the far end reads
    refused = await asyncio.wait_for(far.attempts.get(), WAIT)
    assert await asyncio.wait_for(read_exactly(refused, len(FIRST)), WAIT) == FIRST
    await first
    reader = asyncio.create_task(read_all(stream))
    refused.reset(ErrorCode.NO_ROUTE)
    second = await asyncio.wait_for(far.attempts.get(), WAIT)
    await wait_until(lambda: second.buffered == WINDOW)  # the rest of FIRST waits for credit
    assert stream.attempts == 2 and not reader.done()
    return Replaying(stream, reader, second)


async def write_then_eof(stream: RoutedStream, data: bytes) -> None:
    await stream.write(data)
    await stream.write_eof()


async def test_a_write_and_eof_during_a_replay_follow_it_on_the_new_stream() -> None:
    """The copy was taken; a write and the EOF land before the new stream is confirmed.
    They reached no stream, yet the write returned as if replayed (its bytes lost)."""
    async with far_end() as far:
        r = await replay_waiting_for_credit(far)
        late = asyncio.create_task(write_then_eof(r.stream, LATE))
        await asyncio.sleep(0)  # the write and the EOF are under way
        async with asyncio.timeout(WAIT):
            received = await read_to_eof(r.second)  # in order, once, then EOF
            assert (len(received), received[len(FIRST) :]) == (len(FIRST + LATE), LATE)
            assert received == FIRST + LATE
            await r.second.write(b"answer")
            await r.second.write_eof()
            await late
            assert await r.reader == b"answer"
        assert r.stream.attempts == 2 and r.stream.confirmed


async def test_a_second_no_route_during_a_replay_carries_the_late_write_too() -> None:
    async with far_end() as far:
        r = await replay_waiting_for_credit(far)
        late = asyncio.create_task(write_then_eof(r.stream, LATE))
        await asyncio.sleep(0)
        r.second.reset(ErrorCode.NO_ROUTE)  # refused again: a third attempt replays
        async with asyncio.timeout(WAIT):
            third = await far.attempts.get()
            received = await read_to_eof(third)
            assert (len(received), received[len(FIRST) :]) == (len(FIRST + LATE), LATE)
            assert received == FIRST + LATE
            await third.write_eof()
            await late
            assert await r.reader == b""
        assert r.stream.attempts == 3


async def test_another_reset_during_a_replay_reaches_a_late_write() -> None:
    """The new stream is reset with a code not retried while the replay waits: the write
    that waited for the replay was reported as sent on a stream that never carried it."""
    async with far_end() as far:
        r = await replay_waiting_for_credit(far)
        late = asyncio.create_task(r.stream.write(LATE))
        await asyncio.sleep(0)
        r.second.reset(ErrorCode.FORBIDDEN)
        async with asyncio.timeout(WAIT):
            with pytest.raises(StreamResetError) as wrote:
                await late
            with pytest.raises(StreamResetError) as read:
                await r.reader
        assert wrote.value.code == read.value.code == ErrorCode.FORBIDDEN
        with pytest.raises(StreamResetError):  # and every later call
            await r.stream.write(b"more")


async def test_the_callers_reset_during_a_replay_stops_it() -> None:
    """The caller gives up while the replay waits: the new stream is reset too (it went on
    to carry the request to the agent), and the write waiting behind the replay fails."""
    async with far_end() as far:
        r = await replay_waiting_for_credit(far)
        late = asyncio.create_task(r.stream.write(LATE))
        await asyncio.sleep(0)
        r.stream.reset(ErrorCode.CANCEL)
        async with asyncio.timeout(WAIT):
            with pytest.raises(StreamResetError) as seen:
                await read_to_eof(r.second)
            assert seen.value.code == ErrorCode.CANCEL
            with pytest.raises(StreamResetError):
                await late
            with pytest.raises(StreamResetError):
                await r.reader
        assert r.stream.attempts == 2


async def test_a_write_beyond_the_replay_limit_during_a_replay_follows_it() -> None:
    """A write too large to keep, landing during the replay: it failed with the NO_ROUTE
    the replay was riding out, while the stream lived on and took the next write."""
    big = bytes(REPLAY_LIMIT)
    async with far_end() as far:
        r = await replay_waiting_for_credit(far)
        late = asyncio.create_task(write_then_eof(r.stream, big))
        await asyncio.sleep(0)
        async with asyncio.timeout(WAIT):
            received = await read_to_eof(r.second)
            await late
        assert (len(received), received[len(FIRST) :] == big) == (len(FIRST + big), True)
        assert received[: len(FIRST)] == FIRST
