"""A retrieve whose relay stream breaks is resumed: every instance reaches the viewer once.

The in-process chain (tests/dicom/chain.py) drops streams after some bytes, as a dead
gateway would, in the middle of a message; scripted agents check the protocol (the
resumed request and its skip list) and what must not be resumed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import pytest
from pydicom.dataset import Dataset

from relay.codecs import encode, find_pixels
from relay.dicom import node as node_module
from relay.dicom import rawds
from relay.dicom import status as st
from relay.dicom.codec import (
    DicomLimits,
    DicomProtocolError,
    FinalResponse,
    Instance,
    Message,
    MessageCodec,
    Pending,
    PixelPart,
    Request,
    Skip,
    read_message,
    write_message,
)
from relay.dicom.node import MAX_RESUMES, DicomNode
from relay.dicom.pacs_target import PacsTarget
from relay.net.bytestream import ByteStream, pipe
from relay.proto.errors import ErrorCode
from relay.wire import HEADER_DICOM_PIXELS
from relay_dev import samples
from relay_dev.pacs import EmbeddedPacs, MemoryStore

from . import viewer
from .chain import Chain
from .helpers import EXPLICIT, capturing_scp, query

STUDY = samples.make_study(30, rows=128, cols=128, seed=71)
UID = str(rawds.decode_dataset(STUDY[0].data, EXPLICIT).StudyInstanceUID)
BY_UID = {i.sop_instance: i.data for i in STUDY}
CLASSES = [samples.CT_IMAGE_STORAGE]
DROP = len(STUDY[0].data) * 5 + 1234  # bytes per dropped stream: ~5 instances, then a cut


@pytest.fixture
def pacs() -> Iterator[EmbeddedPacs]:
    with EmbeddedPacs(MemoryStore(STUDY)) as p:
        yield p


def target(p: EmbeddedPacs) -> PacsTarget:
    return PacsTarget(ae_title=p.ae_title, host="127.0.0.1", port=p.port, timeout=10)


@pytest.fixture
async def dropping(pacs: EmbeddedPacs) -> AsyncIterator[Chain]:
    """A chain whose first three streams drop after ~5 instances each."""
    c = Chain(target(pacs), drop_after=DROP, drop_streams=3)
    await c.start()
    yield c
    await c.stop()


def _consistent(statuses: list[Dataset], total: int) -> None:
    """Every pending response adds up to the total; completed only grows."""
    done = -1
    for s in statuses[:-1]:
        counts = [
            int(s.get(k, 0) or 0)
            for k in (
                "NumberOfRemainingSuboperations",
                "NumberOfCompletedSuboperations",
                "NumberOfFailedSuboperations",
                "NumberOfWarningSuboperations",
            )
        ]
        assert sum(counts) == total, counts
        assert counts[1] >= done
        done = counts[1]


async def test_get_resumes_after_drops_with_every_instance_once(dropping: Chain) -> None:
    result = await asyncio.wait_for(
        asyncio.to_thread(
            viewer.get, dropping.port, query("STUDY", StudyInstanceUID=UID), classes=CLASSES
        ),
        60,
    )
    assert len(result.order) == len(STUDY) == len(set(result.order))  # once each
    assert {u: d for u, (_ts, d) in result.received.items()} == BY_UID  # intact, all
    final = result.statuses[-1]
    assert final.Status == st.SUCCESS
    assert final.NumberOfCompletedSuboperations == len(STUDY)
    assert int(final.get("NumberOfFailedSuboperations", 0) or 0) == 0
    _consistent(result.statuses, len(STUDY))
    assert len(dropping.headers) >= 3  # broken streams, then one that finished


async def test_move_resumes_after_drops_with_every_instance_once(pacs: EmbeddedPacs) -> None:
    with capturing_scp("VIEWERSCP") as (captured, port):
        c = Chain(target(pacs), destinations={"VIEWERSCP": ("127.0.0.1", port)},
                  drop_after=DROP, drop_streams=2)  # fmt: skip
        await c.start()
        try:
            statuses = await asyncio.wait_for(
                asyncio.to_thread(
                    viewer.move, c.port, query("STUDY", StudyInstanceUID=UID), "VIEWERSCP"
                ),
                60,
            )
        finally:
            await c.stop()
    uids = [uid for uid, _ts, _data in captured.items]
    assert len(uids) == len(set(uids)) == len(STUDY)
    assert captured.by_uid() == {u: (EXPLICIT, d) for u, d in BY_UID.items()}
    assert statuses[-1].Status == st.SUCCESS
    assert statuses[-1].NumberOfCompletedSuboperations == len(STUDY)
    _consistent(statuses, len(STUDY))


async def test_resume_window_exceeded_ends_in_failure(pacs: EmbeddedPacs) -> None:
    c = Chain(target(pacs), drop_after=DROP, max_streams=1, resume_window=1.0)
    await c.start()
    try:
        result = await asyncio.wait_for(
            asyncio.to_thread(
                viewer.get, c.port, query("STUDY", StudyInstanceUID=UID), classes=CLASSES
            ),
            60,
        )
    finally:
        await c.stop()
    final = result.statuses[-1]
    assert final.Status not in (st.SUCCESS, st.WARNING_SUBOPS)
    assert 0 < len(result.order) < len(STUDY) and len(set(result.order)) == len(result.order)
    assert int(final.get("NumberOfFailedSuboperations", 0) or 0) > 0
    assert len(c.headers) >= 2  # it did try to resume


# -- scripted agents: the protocol, and what is not resumed -----------------------------


def inst(i: int) -> Instance:
    x = STUDY[i]
    return Instance(x.sop_class, x.sop_instance, x.transfer_syntax, x.data)


class Scripted:
    """Agents that play one script per stream; records each request and skip list."""

    def __init__(self, *scripts: list[Message | bytes | int]) -> None:
        """Each script: messages to write (or frames, as bytes), then an int (reset with
        that code) or nothing (a clean end)."""
        self.scripts = list(scripts)
        self.requests: list[tuple[Request, Skip | None]] = []
        self.headers: list[dict[str, str]] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def open_stream(self, headers: Mapping[str, str]) -> ByteStream:
        if not self.scripts:
            raise ConnectionError("no more agents (test)")
        script = self.scripts.pop(0)
        self.headers.append(dict(headers))
        a, b = pipe(headers)

        async def agent() -> None:
            codec = MessageCodec()
            req = await read_message(b, codec)
            assert isinstance(req, Request)
            skip = await read_message(b, codec) if req.resume else None
            assert skip is None or isinstance(skip, Skip)
            self.requests.append((req, skip))
            for m in script:
                if isinstance(m, int):
                    await _drained(a)  # a reset drops unread data: let the node read first
                    b.reset(m)
                    return
                if isinstance(m, bytes):
                    await b.write(m)
                    continue
                await write_message(b, codec, m)
            await b.write_eof()

        task = asyncio.create_task(agent())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return a

    async def get(self, n: int = 4) -> viewer.GetResult:
        node = DicomNode(self.open_stream, listen=("127.0.0.1", 0), timeout=20, resume_window=5)
        await node.start()
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(
                    viewer.get,
                    node.address[1],
                    query("STUDY", StudyInstanceUID=UID),
                    classes=CLASSES,
                ),
                60,
            )
        finally:
            await node.stop()


async def _drained(end: Any) -> None:
    """Wait (bounded) until the node has read everything written to its end of a pipe."""
    for _ in range(1000):
        if not end._inbox:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the node did not read its stream")


def counts(rem: int, ok: int) -> Pending:
    return Pending(remaining=rem, completed=ok, failed=0, warning=0)


async def test_a_link_reset_resumes_with_the_delivered_uids() -> None:
    agents = Scripted(
        [counts(4, 0), inst(0), counts(3, 1), inst(1), int(ErrorCode.INTERNAL_ERROR)],
        [counts(4, 0), counts(3, 1), counts(2, 2), inst(2), inst(3),
         FinalResponse(0, completed=4, failed=0, warning=0)],
    )  # fmt: skip
    result = await agents.get()
    assert result.order == [STUDY[i].sop_instance for i in range(4)]
    assert result.statuses[-1].Status == st.SUCCESS
    (first, no_skip), (again, skip) = agents.requests
    assert not first.resume and no_skip is None
    assert again.resume and again.dataset == first.dataset
    assert skip is not None and set(skip.uids) == {STUDY[0].sop_instance, STUDY[1].sop_instance}


async def test_an_instance_sent_again_is_not_delivered_twice() -> None:
    agents = Scripted(
        [counts(3, 0), inst(0), inst(1), int(ErrorCode.INTERNAL_ERROR)],
        [inst(1), inst(0), inst(2), FinalResponse(0, completed=3, failed=0, warning=0)],
    )
    result = await agents.get()
    assert sorted(result.order) == sorted(STUDY[i].sop_instance for i in range(3))
    assert len(result.order) == 3
    assert result.statuses[-1].Status == st.SUCCESS


async def test_a_pacs_failure_is_not_resumed() -> None:
    agents = Scripted(
        [counts(4, 0), inst(0), inst(1), FinalResponse(st.PACS_NO_RESPONSE, "PACS aborted")],
        [counts(4, 0), inst(2), inst(3), FinalResponse(0, completed=4)],  # must not be used
    )
    result = await agents.get()
    assert len(agents.requests) == 1
    assert result.statuses[-1].Status == st.PACS_NO_RESPONSE
    assert len(result.order) == 2


async def test_an_agent_giving_up_is_not_resumed() -> None:
    """CANCEL is the agent's own reset (stalled workstation): not the path's fault."""
    agents = Scripted(
        [counts(4, 0), inst(0), inst(1), int(ErrorCode.CANCEL)],
        [counts(4, 0), inst(2), inst(3), FinalResponse(0, completed=4)],
    )
    result = await agents.get()
    assert len(agents.requests) == 1
    assert result.statuses[-1].Status == st.LINK_LOST
    assert len(result.order) == 2


async def test_an_agent_shutting_down_is_resumed() -> None:
    """SHUTDOWN is the drain of a restarting agent (relay.agent.dispatch): resumed."""
    agents = Scripted(
        [counts(3, 0), inst(0), int(ErrorCode.SHUTDOWN)],
        [inst(1), inst(2), FinalResponse(0, completed=3, failed=0, warning=0)],
    )
    result = await agents.get()
    assert result.order == [STUDY[i].sop_instance for i in range(3)]
    assert result.statuses[-1].Status == st.SUCCESS
    assert len(agents.requests) == 2


class Offline(Scripted):
    """Scripted agents behind a link that goes down after the first stream: the next
    `down` opens fail at once, as the workstation's tunnel fails them while it knows the
    link is down (relay.workstation.tunnel.TunnelOffline is a ConnectionError)."""

    def __init__(self, down: int, *scripts: list[Message | bytes | int]) -> None:
        super().__init__(*scripts)
        self.down = down
        self.refused = 0

    async def open_stream(self, headers: Mapping[str, str]) -> ByteStream:
        if self.headers and self.refused < self.down:
            self.refused += 1
            raise ConnectionError("offline (test): the link is known down")
        return await super().open_stream(headers)


async def test_an_outage_longer_than_the_tries_is_waited_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Opens that fail at once while the link is down use none of MAX_RESUMES: the
    retrieve waits for the link as long as its resume_window allows, however many opens
    that takes (the old code gave up after MAX_RESUMES of them, about a minute)."""
    monkeypatch.setattr(node_module, "_RESUME_PAUSE", (0.001, 0.001))
    agents = Offline(
        MAX_RESUMES + 3,
        [counts(3, 0), inst(0), int(ErrorCode.INTERNAL_ERROR)],
        [inst(1), inst(2), FinalResponse(0, completed=3, failed=0, warning=0)],
    )
    result = await agents.get()
    assert agents.refused == MAX_RESUMES + 3  # every failed open was answered by another
    assert result.order == [STUDY[i].sop_instance for i in range(3)]
    assert result.statuses[-1].Status == st.SUCCESS
    assert len(agents.requests) == 2


# -- pixels that do not decode exactly: again, without that codec -------------------------


def _inexact(i: int, other: int, codec: str = "htj2k") -> bytes:
    """Instance `i` framed with a pixel codec whose codestream holds instance `other`'s
    pixels: what a codec that is not exact at one end amounts to (the CRC catches it)."""
    msg, theirs = inst(i), STUDY[other].data
    mine, layout = find_pixels(msg.dataset, EXPLICIT), find_pixels(theirs, EXPLICIT)
    assert mine is not None and layout is not None
    enc = encode(layout.fmt, theirs[layout.offset : layout.end], codec)
    assert enc is not None
    return MessageCodec().encode(msg, PixelPart(enc, mine.offset))


@pytest.mark.parametrize("first", [True, False], ids=["first instance", "later instance"])
async def test_pixels_that_do_not_decode_exactly_come_again_without_the_codec(
    first: bool,
) -> None:
    before: list[Message] = [] if first else [inst(0), counts(2, 1)]
    agents = Scripted(
        [*before, _inexact(1, 2), inst(2), FinalResponse(0, completed=3)],
        [*([] if first else [counts(2, 1)]), inst(1), inst(2),
         *([inst(0)] if first else []), FinalResponse(0, completed=3)],
    )  # fmt: skip
    result = await agents.get()
    assert sorted(result.order) == sorted(STUDY[i].sop_instance for i in range(3))
    assert all(result.received[u][1] == BY_UID[u] for u in result.order)
    assert result.statuses[-1].Status == st.SUCCESS
    (_, _), (again, skip) = agents.requests
    assert again.resume and skip is not None
    assert set(skip.uids) == (set() if first else {STUDY[0].sop_instance})
    assert "htj2k" in agents.headers[0][HEADER_DICOM_PIXELS].split(",")
    assert "htj2k" not in agents.headers[1].get(HEADER_DICOM_PIXELS, "").split(",")


# -- the skip message ---------------------------------------------------------------------


def test_skip_round_trips_compressed() -> None:
    codec = MessageCodec()
    uids = tuple(f"1.2.826.0.1.3680043.8.498.{10**20 + i}" for i in range(5000))
    frame = codec.encode(Skip(uids))
    assert codec.decode_frame(frame) == Skip(uids)
    assert len(frame) < sum(len(u) for u in uids) // 3  # compressed


def test_skip_limits_are_enforced() -> None:
    codec = MessageCodec(DicomLimits(max_skip=3))
    with pytest.raises(DicomProtocolError):
        codec.encode(Skip(("1.2", "1.3", "1.4", "1.5")))
    big = MessageCodec().encode(Skip(("1.2", "1.3", "1.4", "1.5")))
    with pytest.raises(DicomProtocolError):
        codec.decode_frame(big)
    with pytest.raises(DicomProtocolError):
        codec.encode(Skip(("1.2", "not-a-uid")))


def test_only_a_retrieve_is_resumed() -> None:
    with pytest.raises(DicomProtocolError):
        MessageCodec().encode(Request(op="echo", resume=True))
    req = Request(op="retrieve", root="study", transfer_syntax=EXPLICIT, resume=True)
    assert MessageCodec().decode_frame(MessageCodec().encode(req)) == req
