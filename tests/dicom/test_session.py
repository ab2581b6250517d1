"""The workstation's side of one relayed operation (relay.dicom.session): a viewer's
C-CANCEL is never lost, writes on the stream never interleave, and an upload is bounded by
its progress, not by its size.

A pynetdicom viewer talks to the node over loopback; the agent is a coroutine at the far
end of an in-memory stream (relay.net.bytestream.pipe) whose opening can be held back, as
the tunnel holds it while it waits for the link.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

import pytest
from pynetdicom import build_context, build_role, evt

from relay.dicom import node as node_module
from relay.dicom import status as st
from relay.dicom.codec import (
    Cancel,
    FinalResponse,
    Instance,
    Message,
    MessageCodec,
    Pending,
    Request,
    Skip,
    read_message,
    write_message,
)
from relay.dicom.contexts import MODELS
from relay.dicom.node import DicomNode
from relay.dicom.session import Session
from relay.net.bytestream import ByteStream, pipe
from relay.proto.errors import ErrorCode
from relay_dev import samples

from . import viewer
from .chain import until
from .helpers import EXPLICIT, query, scu

N = 20
STUDY = samples.make_study(N, rows=16, cols=16, seed=83)
HOLD = 0.5  # how long the held stream takes to open (the tunnel waiting for the link)
WAIT = 20.0


def inst(i: int) -> Instance:
    x = STUDY[i]
    return Instance(x.sop_class, x.sop_instance, x.transfer_syntax, x.data)


class Agent:
    """Streams the study slowly, stopping at a Cancel; stream number `held` opens late
    (and says so in `opening`), stream number `broken` is reset after two instances."""

    def __init__(self, held: int, broken: int | None = None) -> None:
        self.held = held
        self.broken = broken
        self.opening = threading.Event()
        self.streams = 0
        self.got: list[list[str]] = []  # per stream: the type of each message received
        self.sent = 0
        self.tasks: set[asyncio.Task[None]] = set()

    async def open_stream(self, headers: Mapping[str, str]) -> ByteStream:
        number = self.streams
        self.streams += 1
        if number == self.held:
            self.opening.set()
            await asyncio.sleep(HOLD)
        a, b = pipe(headers)
        task = asyncio.create_task(self.serve(number, a, b))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return a

    async def serve(self, number: int, ours: ByteStream, stream: ByteStream) -> None:
        codec = MessageCodec()
        got: list[str] = []
        self.got.append(got)
        cancelled = asyncio.Event()
        req = await read_message(stream, codec)
        assert isinstance(req, Request)
        got.append("request")
        skip: frozenset[str] = frozenset()
        if req.resume:
            msg = await read_message(stream, codec)
            assert isinstance(msg, Skip)
            got.append("skip")
            skip = frozenset(msg.uids)

        async def watch() -> None:
            while (msg := await read_message(stream, codec)) is not None:
                got.append(type(msg).__name__.lower())
                if isinstance(msg, Cancel):
                    cancelled.set()

        watcher = asyncio.create_task(watch())
        try:
            await write_message(stream, codec, Pending(remaining=N, completed=0, failed=0,
                                                       warning=0))  # fmt: skip
            for i in range(N):
                await asyncio.sleep(0.05)  # a slow PACS
                if cancelled.is_set():
                    final = FinalResponse(st.CANCEL, remaining=N - i, completed=i)
                    await write_message(stream, codec, final)
                    break
                if number == self.broken and i == 2:
                    await _drained(ours)
                    stream.reset(ErrorCode.INTERNAL_ERROR)  # the link dropped
                    return
                if STUDY[i].sop_instance not in skip:
                    await write_message(stream, codec, inst(i))
                    self.sent += 1
            else:
                await write_message(stream, codec, FinalResponse(0, completed=N))
            await stream.write_eof()
        finally:
            watcher.cancel()


async def _drained(end: Any) -> None:
    """Wait (bounded) until the node has read everything written to its end of a pipe."""
    await until(lambda: not end._inbox, WAIT)


def get_cancelling_when_opening(port: int, opening: threading.Event) -> list[int]:
    """A C-GET whose C-CANCEL goes out as soon as `opening` is set; the statuses."""
    model = MODELS[("study", "get")]
    cls = samples.CT_IMAGE_STORAGE
    assoc = scu("VIEWER").associate(
        "127.0.0.1",
        port,
        contexts=[build_context(model), build_context(cls, [EXPLICIT])],
        ae_title="RELAY",
        ext_neg=[build_role(cls, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, lambda event: 0)],
    )
    assert assoc.is_established
    context = next(c for c in assoc.accepted_contexts if c.abstract_syntax == model)

    def cancel() -> None:
        if opening.wait(WAIT):
            assoc.send_c_cancel(1, context.context_id)

    canceller = threading.Thread(target=cancel)
    canceller.start()
    statuses = [
        int(status.Status)
        for status, _ in assoc.send_c_get(query("STUDY", StudyInstanceUID="1.2.3"), model, msg_id=1)
    ]
    canceller.join(WAIT)
    assoc.release()
    return statuses


async def run_get(agent: Agent) -> list[int]:
    node = DicomNode(agent.open_stream, listen=("127.0.0.1", 0), timeout=WAIT, resume_window=5)
    await node.start()
    try:
        return await asyncio.wait_for(
            asyncio.to_thread(get_cancelling_when_opening, node.address[1], agent.opening), 60
        )
    finally:
        await node.stop()


@pytest.fixture(autouse=True)
def _look_often(monkeypatch: pytest.MonkeyPatch) -> None:
    """The handler notices the viewer's C-CANCEL well within HOLD, whatever the race
    between pynetdicom's wake-up and its recording of the cancel."""
    monkeypatch.setattr(node_module, "_LOOK", 0.05)


async def test_a_cancel_while_the_stream_opens_reaches_the_agent() -> None:
    agent = Agent(held=0)
    statuses = await run_get(agent)
    assert statuses[-1] == st.CANCEL
    assert agent.got == [["request", "cancel"]]
    assert agent.sent == 0


async def test_a_cancel_while_a_resumed_stream_opens_follows_the_skip() -> None:
    agent = Agent(held=1, broken=0)
    statuses = await run_get(agent)
    assert statuses[-1] == st.CANCEL
    assert agent.got[1] == ["request", "skip", "cancel"]
    assert agent.sent == 2  # the two before the break, none after the cancel


class Paced:
    """A stream that writes in pieces, letting the loop run between them (as a slow
    uplink, or a transport that frames what it sends, does)."""

    PIECE = 16 * 1024

    def __init__(self, inner: ByteStream) -> None:
        self.inner = inner

    @property
    def headers(self) -> Mapping[str, str]:
        return self.inner.headers

    async def read(self, max_bytes: int = 65536) -> bytes:
        return await self.inner.read(max_bytes)

    async def write(self, data: bytes) -> None:
        for start in range(0, len(data), self.PIECE):
            await asyncio.sleep(0.001)
            await self.inner.write(data[start : start + self.PIECE])

    async def write_eof(self) -> None:
        await self.inner.write_eof()

    def reset(self, code: int) -> None:
        self.inner.reset(code)


async def test_a_cancel_during_a_large_request_is_written_after_it_whole() -> None:
    """The Cancel waits for the request: a frame written in the middle of another would
    corrupt both."""
    loop = asyncio.get_running_loop()
    a, b = pipe({}, limit=4 << 20)
    opened = asyncio.Event()

    async def open_stream(headers: Mapping[str, str]) -> ByteStream:
        opened.set()
        return Paced(a)

    data = os.urandom(1 << 20)  # does not compress: 64 pieces
    request = Request(op="store", sop_class=samples.CT_IMAGE_STORAGE, sop_instance="1.2.3.4",
                      transfer_syntax=EXPLICIT, dataset=data)  # fmt: skip
    session = Session(loop, open_stream, {}, request, MessageCodec(), open_timeout=WAIT)
    session.start()
    await asyncio.wait_for(opened.wait(), WAIT)
    await asyncio.sleep(0.01)  # the request is on its way, a piece at a time
    session.cancel()
    codec = MessageCodec()
    got: list[Message | None] = []
    async with asyncio.timeout(WAIT):
        got.append(await read_message(b, codec))
        got.append(await read_message(b, codec))
    assert got == [request, Cancel()]
    await write_message(b, codec, FinalResponse(st.CANCEL))
    await b.write_eof()
    final = await asyncio.to_thread(session.next_final, WAIT)
    assert final.status == st.CANCEL
    session.close()


# -- uploads: bounded by progress, not by size --------------------------------------------

UPLOAD = samples.make_study(1, rows=1024, cols=1024, seed=3)[0]  # 2 MB, 0.8 MB on the wire
LIMIT = 1.0  # the node's timeout in these tests (120 s in production)
# The stream's window: the request is written once its end is in it, up to 0.2 s before
# the slow agent below has read it.
WINDOW = 64 * 1024


class SlowReader:
    """The agent's end behind a slow uplink: it takes `piece` bytes every 50 ms, so the
    workstation gets credit (progress) in small steps."""

    def __init__(self, inner: ByteStream, piece: int) -> None:
        self.inner = inner
        self.piece = piece

    @property
    def headers(self) -> Mapping[str, str]:
        return self.inner.headers

    async def read(self, max_bytes: int = 65536) -> bytes:
        await asyncio.sleep(0.05)
        return await self.inner.read(min(max_bytes, self.piece))

    async def write(self, data: bytes) -> None:
        await self.inner.write(data)

    async def write_eof(self) -> None:
        await self.inner.write_eof()

    def reset(self, code: int) -> None:
        self.inner.reset(code)


class StoreAgent:
    """Reads the upload at `piece` bytes per 50 ms (0: never), then answers after
    `answer_after` seconds (None: never)."""

    def __init__(self, piece: int, answer_after: float | None) -> None:
        self.piece = piece
        self.answer_after = answer_after
        self.received: float | None = None  # when the whole request had arrived
        self.request: Request | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def open_stream(self, headers: Mapping[str, str]) -> ByteStream:
        a, b = pipe(headers, limit=WINDOW)
        task = asyncio.create_task(self.serve(b))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return a

    async def serve(self, stream: ByteStream) -> None:
        if not self.piece:
            await asyncio.Event().wait()  # never reads: no credit, ever
        codec = MessageCodec()
        req = await read_message(SlowReader(stream, self.piece), codec)
        assert isinstance(req, Request)
        self.request, self.received = req, time.monotonic()
        if self.answer_after is None:
            await asyncio.Event().wait()  # never answers
            return
        await asyncio.sleep(self.answer_after)
        await write_message(stream, codec, FinalResponse(st.SUCCESS))
        await stream.write_eof()


async def store(agent: StoreAgent) -> tuple[int, str, float]:
    """The viewer's C-STORE of UPLOAD: status, comment, and when the answer came."""
    node = DicomNode(agent.open_stream, listen=("127.0.0.1", 0), timeout=LIMIT)
    await node.start()
    try:
        status = await asyncio.wait_for(
            asyncio.to_thread(viewer.store, node.address[1], UPLOAD.sop_class,
                              UPLOAD.sop_instance, UPLOAD.data),
            60,
        )  # fmt: skip
        return int(status.Status), str(status.get("ErrorComment", "")), time.monotonic()
    finally:
        await node.stop()


async def test_an_upload_longer_than_the_timeout_goes_through_while_it_progresses() -> None:
    """About 2.5 s of upload with a 1 s timeout, then an answer 0.4 s later: the write is
    bounded by its progress, and the answer's deadline starts once the request is out."""
    agent = StoreAgent(piece=16 * 1024, answer_after=LIMIT * 0.4)
    started = time.monotonic()
    status, comment, _ = await store(agent)
    assert (status, comment) == (st.SUCCESS, "")
    assert agent.received is not None and agent.received - started > 2 * LIMIT
    assert agent.request is not None and agent.request.dataset == UPLOAD.data


async def test_an_upload_without_credit_fails_after_the_timeout() -> None:
    started = time.monotonic()
    status, comment, ended = await store(StoreAgent(piece=0, answer_after=None))
    assert status == st.STORE_OUT_OF_RESOURCES
    assert comment == "relay stream stalled: no credit for 1 s"
    assert LIMIT <= ended - started < LIMIT + 3


async def test_an_agent_that_never_answers_an_upload_fails_a_timeout_after_it_is_written() -> None:
    agent = StoreAgent(piece=16 * 1024, answer_after=None)
    status, comment, ended = await store(agent)
    assert status == st.STORE_OUT_OF_RESOURCES
    assert comment == "no response from the agent in time"
    assert agent.received is not None
    # The deadline starts once the request is written, which is up to WINDOW (0.2 s of
    # reads, more on a loaded machine) before the agent has read it all; an upload of
    # several seconds timed from its start would end before the agent had it.
    assert LIMIT * 0.5 <= ended - agent.received < LIMIT + 3


async def test_a_stream_that_does_not_open_fails_after_the_timeout() -> None:
    async def never(headers: Mapping[str, str]) -> ByteStream:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    node = DicomNode(never, listen=("127.0.0.1", 0), timeout=LIMIT)
    await node.start()
    started = time.monotonic()
    try:
        status = await asyncio.wait_for(
            asyncio.to_thread(viewer.store, node.address[1], UPLOAD.sop_class,
                              UPLOAD.sop_instance, UPLOAD.data),
            60,
        )  # fmt: skip
    finally:
        await node.stop()
    assert status.Status == st.STORE_OUT_OF_RESOURCES
    assert status.ErrorComment == "relay link unavailable: no stream within 1 s"
    assert LIMIT <= time.monotonic() - started < LIMIT + 3
