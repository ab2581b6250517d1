"""Stream priorities through a real sealed session: the agent's inner Link sends a
viewer's (u=3) data before a prefetch's (u=6) when both have data queued.

Real gateway, real agent, TLS on loopback, and a `tcp:source` service at the agent that
answers a request of N bytes with N bytes. The workstation stops reading its session
(its SealTransport pauses reading), so credit stops hop by hop and the prefetch stream's
answer piles up in the agent's inner core. Then a viewer stream's answer is queued there
too. Once the workstation reads again, the viewer's bytes must all arrive before any
prefetch byte that was still in the agent's inner core: only what the agent's inner
Link had already handed below (its `bytes_out`) may come first. Nothing here is timed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

from relay.agent.config import PkiFiles
from relay.net.aio import Link, Stream
from relay.proto import LinkSettings
from relay.seal.transport import SealTransport
from relay.workstation import priorities
from tests.agent.test_dispatch import device_link, running_agent
from tests.ends_helpers import (
    agent_config,
    device_identity_dir,
    running_gateway,
    tcp_service,
    wait_until,
)
from tests.pki_helpers import Pair, make_pki
from tests.session_helpers import sealed

PREFETCH_BYTES = 8 * 1024 * 1024  # more than everything below the agent's inner core
VIEWER_BYTES = 100 * 1024
# Inner windows wider than everything below the agent's inner core (its seal queue, the
# outer windows at each hop), so that the prefetch's data piles up in that core, where
# the order is decided, rather than waiting on the workstation's credit.
WIDE = LinkSettings(stream_window=16 * 1024 * 1024, link_window=64 * 1024 * 1024)


async def _source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read an 8-byte count, send that many bytes, half-close."""
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        left = int.from_bytes(await reader.readexactly(8), "big")
        block = bytes(64 * 1024)
        while left > 0:
            writer.write(block[:left])
            left -= len(block)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    writer.close()


@dataclasses.dataclass
class _World:
    session: Link
    agent_inner: Link


@contextlib.asynccontextmanager
async def _world(tmp_path: Path) -> AsyncIterator[_World]:
    site = make_pki(tmp_path / "pki")
    async with running_gateway(site, tmp_path) as gw, tcp_service(_source) as source:
        config = agent_config(site, tmp_path, [gw.port], {"source": (source.port, False)})
        config = dataclasses.replace(config, pki=PkiFiles(site.ca, site.directory / "ca.key"))
        async with running_agent(config, {}) as agent:
            await wait_until(lambda: gw.server.router.sites() == ["main"])
            d = device_identity_dir(site, tmp_path)
            outer = await device_link(site, gw.port)
            try:
                session = await sealed(
                    outer, site, Pair(d / "device.crt", d / "device.key"), settings=WIDE
                )
                (agent_inner,) = agent.sessions.sessions
                yield _World(session, agent_inner)
            finally:
                outer.close()


class _Recorder:
    """Records (stream id, size) of every chunk the workstation receives, in order."""

    def __init__(self) -> None:
        self.order: list[tuple[int, int]] = []

    def attach(self, stream: Stream) -> None:
        recorder = self

        class _Listener:
            def on_data(self, s: Stream, data: bytes) -> None:
                recorder.order.append((s.stream_id, len(data)))
                s.acknowledge(len(data))

            def on_end(self, s: Stream) -> None:
                pass

            def on_credit(self, s: Stream) -> None:
                pass

            def on_reset(self, s: Stream, code: int) -> None:
                pass

        stream.listener = _Listener()

    def received(self, stream_id: int) -> int:
        return sum(n for sid, n in self.order if sid == stream_id)


async def _ask(stream: Stream, size: int) -> None:
    await stream.write(size.to_bytes(8, "big"))  # no `codec` header: raw both ways


async def test_the_agent_sends_the_viewers_data_before_the_prefetchs(tmp_path: Path) -> None:
    async with _world(tmp_path) as w:
        session, agent_inner = w.session, w.agent_inner
        seal = session.transport
        assert isinstance(seal, SealTransport)
        agent_conn = agent_inner.conn
        recorder = _Recorder()

        seal.pause_reading()  # the workstation stops reading: credit stops hop by hop
        prefetch = session.open_stream({"target": "tcp:source"}, priorities.PREFETCH)
        recorder.attach(prefetch)
        await _ask(prefetch, PREFETCH_BYTES)
        await wait_until(lambda: not agent_inner.writable and agent_conn.queued_data > 0)
        assert agent_inner.streams[prefetch.stream_id].priority == priorities.PREFETCH

        viewer = session.open_stream({"target": "tcp:source"})  # the default, u=3
        recorder.attach(viewer)
        await _ask(viewer, VIEWER_BYTES)
        await wait_until(lambda: agent_conn.queued_on(viewer.stream_id) == VIEWER_BYTES)
        assert agent_inner.streams[viewer.stream_id].priority == priorities.VIEWER
        below = agent_inner.bytes_out  # prefetch bytes that may still arrive first
        assert agent_conn.queued_on(prefetch.stream_id) > 0  # and some are still above

        seal.resume_reading()
        await wait_until(lambda: recorder.received(viewer.stream_id) == VIEWER_BYTES)
        last = max(i for i, (sid, _) in enumerate(recorder.order) if sid == viewer.stream_id)
        ahead = sum(n for sid, n in recorder.order[:last] if sid == prefetch.stream_id)
        assert ahead <= below
        # The prefetch was only held back: all of it arrives afterwards.
        await wait_until(lambda: recorder.received(prefetch.stream_id) == PREFETCH_BYTES)
