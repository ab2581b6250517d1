"""The agent's DICOM service stops within a bound whatever the PACS does: every
association with the PACS is ended (A-ABORT, then cut), also one the PACS stopped
answering on and one it never answered, and none of pynetdicom's connection threads
(not daemons: they hold the process's exit) is left."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator

import pytest
from pynetdicom.dul import DULServiceProvider

from relay.dicom.agent import DicomAgent, OperationSummary
from relay.dicom.codec import Instance
from relay.dicom.pacs_assoc import ABORT_LINGER, STOP_JOIN
from relay.net.bytestream import pipe
from relay_dev import samples
from relay_dev.pacs import EmbeddedPacs, MemoryStore

from .chain import until
from .test_agent import Workstation, retrieve, study_uid, target

# What a stop may take beyond its linger and join bounds (thread hops, a loaded machine);
# the PACS's own timeouts (10 s here) are far beyond it.
SLACK = 1.0


class StallingPacs:
    """A TCP proxy in front of a PACS that `stall()` turns into a PACS that stops
    answering: nothing passes either way any more and no connection is closed (as a PACS
    whose process hangs, or whose host vanished behind a firewall that drops)."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.port = 0
        self.stalled = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> StallingPacs:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()

    def stall(self) -> None:
        self.stalled.set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        for w in (writer, up_writer):
            w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._writers.add(w)

        async def pipe_(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while not self.stalled.is_set():
                    read = asyncio.ensure_future(src.read(1 << 16))
                    stall = asyncio.ensure_future(self.stalled.wait())
                    await asyncio.wait((read, stall), return_when=asyncio.FIRST_COMPLETED)
                    stall.cancel()
                    if self.stalled.is_set():
                        read.cancel()
                        break
                    data = read.result()
                    if not data:
                        dst.transport.abort()
                        return
                    dst.write(data)
                    await dst.drain()
            await asyncio.Event().wait()  # stalled: hold the connection, never close it

        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(pipe_(reader, up_writer), pipe_(up_reader, writer))


def agent_connections() -> list[DULServiceProvider]:
    """pynetdicom's connection threads of the associations we requested (the embedded
    PACS's, in this process too, are acceptors)."""
    return [
        t
        for t in threading.enumerate()
        if isinstance(t, DULServiceProvider) and t.is_alive() and t.assoc.is_requestor
    ]


@pytest.fixture
async def stalling() -> AsyncIterator[StallingPacs]:
    study = samples.make_study(30, rows=32, cols=32, seed=41)
    with EmbeddedPacs(MemoryStore(study), send_delay=0.05) as pacs:
        pacs.study = study  # type: ignore[attr-defined]
        async with StallingPacs(pacs.port) as proxy:
            proxy.pacs = pacs  # type: ignore[attr-defined]
            yield proxy


async def _cut_and_stop(agent: DicomAgent, server: asyncio.Task[OperationSummary]) -> float:
    """What the agent's drain does once its grace is over (cancel the stream's handler,
    wait for it), then its stop; how long both took."""
    started = time.monotonic()
    server.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(server, 30)
    await asyncio.wait_for(agent.stop(), 30)
    return time.monotonic() - started


async def test_stop_mid_retrieve_from_a_pacs_that_stopped_answering(
    stalling: StallingPacs,
) -> None:
    """The PACS stalls mid-C-GET and keeps the connection after our A-ABORT: the stream's
    end and the stop wait for it a moment (ABORT_LINGER), not its ARTIM timer (10 s)."""
    pacs: EmbeddedPacs = stalling.pacs  # type: ignore[attr-defined]
    agent = DicomAgent(target(pacs, port=stalling.port, survey=False))
    await agent.start()
    a, b = pipe()
    server = asyncio.create_task(agent.serve(b))
    ws = Workstation(a)
    await ws.send(retrieve(StudyInstanceUID=study_uid(pacs.study)))  # type: ignore[attr-defined]
    while not isinstance(await ws.recv(), Instance):
        pass
    stalling.stall()
    took = await _cut_and_stop(agent, server)
    assert took < ABORT_LINGER + STOP_JOIN + SLACK
    assert agent_connections() == []
    assert agent.associations.held() == []
    assert pacs.events.instances_sent < 30  # (it was cut, not finished)


async def test_stop_while_the_pacs_never_answers_the_association_request(
    stalling: StallingPacs,
) -> None:
    """The PACS takes the connection and never answers the A-ASSOCIATE-RQ: the request
    (on the operation's thread) is cut at once when the stream is, not left to wait
    `pacs.timeout`."""
    pacs: EmbeddedPacs = stalling.pacs  # type: ignore[attr-defined]
    stalling.stall()
    agent = DicomAgent(target(pacs, port=stalling.port, survey=False))
    await agent.start()
    a, b = pipe()
    server = asyncio.create_task(agent.serve(b))
    await Workstation(a).send(retrieve(StudyInstanceUID=study_uid(pacs.study)))  # type: ignore[attr-defined]
    await asyncio.sleep(0.2)  # the request has gone (loopback: well within)
    assert agent.associations.held(), "no association being requested"
    took = await _cut_and_stop(agent, server)
    assert took < ABORT_LINGER + STOP_JOIN + SLACK
    assert agent_connections() == []
    assert pacs.events.gets == 0


async def test_stop_ends_a_spare_the_pacs_no_longer_answers(stalling: StallingPacs) -> None:
    """A spare association held when the PACS stalls: its A-RELEASE gets no answer; the
    stop aborts and cuts it rather than waiting `pacs.timeout` for one."""
    pacs: EmbeddedPacs = stalling.pacs  # type: ignore[attr-defined]
    agent = DicomAgent(target(pacs, port=stalling.port, survey=False, spare_association=20))
    await agent.start()
    a, b = pipe()
    await Workstation(a).send(retrieve(StudyInstanceUID="1.2.3.999"))  # nothing: ends at once
    summary = await asyncio.wait_for(agent.serve(b), 10)
    assert summary.status == 0
    await until(lambda: agent.spare.counts()["opened"] == 1, 5)
    stalling.stall()
    started = time.monotonic()
    await asyncio.wait_for(agent.stop(), 30)
    assert time.monotonic() - started < 2 * ABORT_LINGER + STOP_JOIN + SLACK
    assert agent_connections() == []
