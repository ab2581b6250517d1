"""The agent's DICOM service stops within a bound whatever the PACS does: every
association with the PACS is ended (A-ABORT, then cut), also one the PACS stopped
answering on, one it never answered and one whose TCP connect it never answered, and
none of pynetdicom's connection threads (not daemons: they hold the process's exit) is
left."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace

import pytest
from pynetdicom import build_context
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from relay.dicom.agent import DicomAgent, OperationSummary
from relay.dicom.codec import Instance
from relay.dicom.ending import ABORT_LINGER, STOP_JOIN, OpenAssociations
from relay.dicom.pacs_assoc import associate
from relay.dicom.pacs_echo import echo_pacs
from relay.dicom.pacs_target import PacsTarget
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


def _requestor_threads() -> set[DULServiceProvider]:
    return {
        t
        for t in threading.enumerate()
        if isinstance(t, DULServiceProvider) and t.is_alive() and t.assoc.is_requestor
    }


_LEFT_BEFORE: set[DULServiceProvider] = set()


@pytest.fixture(autouse=True)
def _left_by_earlier_tests() -> None:
    """The connection threads alive when the test starts (an earlier test's agent never
    stopped, its spare still open): not the test's to count."""
    _LEFT_BEFORE.clear()
    _LEFT_BEFORE.update(_requestor_threads())


def agent_connections() -> list[DULServiceProvider]:
    """pynetdicom's connection threads of the associations the test requested (the
    embedded PACS's, in this process too, are acceptors)."""
    return list(_requestor_threads() - _LEFT_BEFORE)


# Connections that may fill a listen backlog (Linux queues backlog + 1), and how long a
# connect gets to tell it is queued (loopback: at once) from dropped.
MAX_FILLERS = 16
FILL_WAIT = 0.2


@pytest.fixture
def silent_pacs() -> Iterator[PacsTarget]:
    """A PACS that never answers the TCP connect: its listener never accepts and its
    listen backlog is full, so our SYNs are dropped (as a PACS overwhelmed, or behind a
    firewall that drops). Its timeouts (10 s) are far beyond what a stop may take."""
    fillers: list[socket.socket] = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        try:
            for _ in range(MAX_FILLERS):
                filler = socket.socket()
                fillers.append(filler)
                filler.settimeout(FILL_WAIT)
                try:
                    filler.connect(address)
                except TimeoutError:
                    break  # dropped: the backlog is full
            else:
                pytest.skip("this system does not leave a connect to a full backlog pending")
            yield PacsTarget(ae_title="SILENT", host="127.0.0.1", port=address[1], timeout=10)
        finally:
            for filler in fillers:
                filler.close()


def wait_for(predicate: Callable[[], bool], limit: float) -> bool:
    """Poll `predicate` (from a test's thread) until true or `limit` seconds pass."""
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


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


def test_end_all_cuts_a_connect_the_pacs_never_answers(silent_pacs: PacsTarget) -> None:
    """An association whose TCP connect the PACS leaves unanswered is held from its
    creation: `end_all` cuts the connect (its DUL thread ended at once), rather than
    leaving it to `pacs.timeout`."""
    owner = OpenAssociations()
    results: list[bool] = []

    def request() -> None:
        assoc = associate(silent_pacs, [build_context(Verification)], keep=(owner,))
        results.append(assoc.is_established)

    requester = threading.Thread(target=request, daemon=True)
    requester.start()
    assert wait_for(lambda: bool(agent_connections()), 5), "no connect under way"
    started = time.monotonic()
    assert owner.end_all() == 1
    assert wait_for(lambda: not agent_connections(), ABORT_LINGER + STOP_JOIN + SLACK)
    requester.join(SLACK)
    assert results == [False]
    assert time.monotonic() - started < ABORT_LINGER + STOP_JOIN + SLACK
    assert owner.held() == []


def test_an_association_created_after_the_end_is_not_connected(
    silent_pacs: PacsTarget,
) -> None:
    """An owner that has ended has an association created after its end cut before it
    connects: it fails at once, nothing left waiting on the PACS."""
    owner = OpenAssociations()
    owner.end_all()
    started = time.monotonic()
    assoc = associate(silent_pacs, [build_context(Verification)], keep=(owner,))
    assert not assoc.is_established
    assert time.monotonic() - started < SLACK
    assert agent_connections() == []
    assert owner.held() == []


def test_a_failed_connect_is_not_held() -> None:
    """An association whose connect failed is let go of by its owner (it holds only what
    is open or being opened: a PACS that refuses for hours would grow it otherwise)."""
    owner = OpenAssociations()
    refused = PacsTarget(ae_title="NONE", host="127.0.0.1", port=free_port(), timeout=10)
    assoc = associate(refused, [build_context(Verification)], keep=(owner,))
    assert not assoc.is_established
    assert owner.held() == []
    assert owner._open == set()


def free_port() -> int:
    """A loopback port with no listener (a connect to it is refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_stop_while_the_connect_to_the_pacs_is_pending(silent_pacs: PacsTarget) -> None:
    """A retrieve's connect the PACS never answers: the drain's cut and the stop end it at
    once, and no connection thread is left to hold the process `pacs.timeout` (10 s)."""
    agent = DicomAgent(replace(silent_pacs, survey=False))
    await agent.start()
    a, b = pipe()
    server = asyncio.create_task(agent.serve(b))
    await Workstation(a).send(retrieve(StudyInstanceUID="1.2.3.4"))
    await until(lambda: bool(agent_connections()), 5)
    took = await _cut_and_stop(agent, server)
    assert took < ABORT_LINGER + STOP_JOIN + SLACK
    assert agent_connections() == []
    assert agent.associations.held() == []


async def test_stop_ends_a_readiness_echo_still_connecting(silent_pacs: PacsTarget) -> None:
    """The readiness C-ECHO's connect the PACS never answers: the agent's stop cuts it,
    and the echo reports the PACS not ready at once rather than after its timeout."""
    agent = DicomAgent(replace(silent_pacs, survey=False))
    echo = asyncio.ensure_future(asyncio.to_thread(echo_pacs, silent_pacs, 10.0))
    await until(lambda: bool(agent_connections()), 5)
    started = time.monotonic()
    await asyncio.wait_for(agent.stop(), 30)
    ready, why = await asyncio.wait_for(echo, 30)
    assert time.monotonic() - started < ABORT_LINGER + STOP_JOIN + SLACK
    assert not ready
    assert "unreachable or did not answer" in why
    assert agent_connections() == []
