"""The node against a scripted agent: whatever the far end says, the viewer gets the truth.

Each test plays the agent's side of the stream message by message, including the odd and
the broken (no counts, more instances than announced, garbage), and checks what a
pynetdicom viewer is told.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from relay.dicom import status as st
from relay.dicom.codec import (
    FinalResponse,
    Instance,
    Message,
    MessageCodec,
    Pending,
    Request,
    read_message,
    write_message,
)
from relay.dicom.node import DicomNode
from relay.net.bytestream import ByteStream, pipe
from relay_dev import samples

from . import viewer
from .helpers import EXPLICIT, query

STUDY = samples.make_study(4, rows=16, cols=16, seed=61)
CLASSES = [samples.CT_IMAGE_STORAGE]


def inst(i: int) -> Instance:
    x = STUDY[i]
    return Instance(x.sop_class, x.sop_instance, x.transfer_syntax, x.data)


Script = Callable[[ByteStream, MessageCodec, Request], Awaitable[None]]


def playing(*msgs: Message | bytes, close: bool = True) -> Script:
    async def play(stream: ByteStream, codec: MessageCodec, request: Request) -> None:
        for m in msgs:
            if isinstance(m, bytes):
                await stream.write(m)
            else:
                await write_message(stream, codec, m)
        if close:
            await stream.write_eof()

    return play


T = TypeVar("T")


async def with_agent(script: Script, call: Callable[[int], T], limit: float = 20) -> T:
    """Run `call(port)` (a blocking viewer) against a node whose agent plays `script`."""
    requests: list[Request] = []
    tasks: set[asyncio.Task[None]] = set()

    async def open_stream(headers: Mapping[str, str]) -> ByteStream:
        a, b = pipe(headers)

        async def agent() -> None:
            codec = MessageCodec()
            req = await read_message(b, codec)
            assert isinstance(req, Request)
            requests.append(req)
            await script(b, codec, req)

        task = asyncio.create_task(agent())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return a

    node = DicomNode(open_stream, listen=("127.0.0.1", 0), timeout=limit)
    await node.start()
    try:
        return await asyncio.wait_for(asyncio.to_thread(call, node.address[1]), 60)
    finally:
        await node.stop()


def get(port: int) -> viewer.GetResult:
    return viewer.get(port, query("STUDY", StudyInstanceUID="1.2.3"), classes=CLASSES)


async def test_the_pacs_count_wins_over_the_survey_estimate() -> None:
    script = playing(
        Pending(remaining=2, completed=0, failed=0, warning=0, estimate=True),
        inst(0),
        Pending(remaining=3, completed=1, failed=0, warning=0),  # the study grew
        inst(1),
        inst(2),
        inst(3),
        FinalResponse(0, completed=4, failed=0, warning=0),
    )
    result = await with_agent(script, get)
    assert isinstance(result, viewer.GetResult)
    assert len(result.received) == 4
    assert result.final.Status == 0 and result.final.NumberOfCompletedSuboperations == 4


async def test_the_estimate_is_used_when_the_pacs_gives_no_counts() -> None:
    script = playing(
        Pending(remaining=4, completed=0, failed=0, warning=0, estimate=True),
        *(inst(i) for i in range(4)),
        FinalResponse(0),
    )
    result = await with_agent(script, get)
    assert isinstance(result, viewer.GetResult)
    assert len(result.received) == 4 and result.final.Status == 0


async def test_no_counts_at_all_is_a701() -> None:
    many = [inst(i % 4) for i in range(12)]
    result = await with_agent(playing(*many, FinalResponse(0)), get)
    assert isinstance(result, viewer.GetResult)
    assert result.final.Status == st.NO_COUNTS


async def test_final_without_counts_after_a_few_instances() -> None:
    result = await with_agent(playing(inst(0), inst(1), FinalResponse(0)), get)
    assert isinstance(result, viewer.GetResult)
    assert len(result.received) == 2 and result.final.Status == 0


async def test_more_instances_than_announced_is_not_a_success() -> None:
    script = playing(
        inst(0),
        Pending(remaining=1, completed=1, failed=0, warning=0),
        inst(1),
        inst(2),
        inst(3),
        FinalResponse(0),
    )
    result = await with_agent(script, get)
    assert isinstance(result, viewer.GetResult)
    assert result.final.Status == st.WARNING_SUBOPS
    assert int(result.final.NumberOfFailedSuboperations) >= 1


async def test_fewer_instances_than_announced_is_a_warning_with_failures() -> None:
    script = playing(
        inst(0),
        Pending(remaining=3, completed=1, failed=0, warning=0),
        inst(1),
        FinalResponse(0xB000, completed=2, failed=2, failed_instances=("1.2.3.4", "1.2.3.5")),
    )
    result = await with_agent(script, get)
    assert isinstance(result, viewer.GetResult)
    assert len(result.received) == 2
    assert result.final.Status == st.WARNING_SUBOPS
    assert int(result.final.NumberOfFailedSuboperations) == 2


async def test_link_lost_after_the_last_instance_still_delivers_it() -> None:
    script = playing(
        inst(0), Pending(remaining=1, completed=1, failed=0, warning=0), inst(1)
    )  # then the stream just ends: no final
    result = await with_agent(script, get)
    assert isinstance(result, viewer.GetResult)
    assert len(result.received) == 2 and result.final.Status == 0


async def test_link_lost_before_the_end_fails_with_counts() -> None:
    script = playing(inst(0), Pending(remaining=3, completed=1, failed=0, warning=0), inst(1))
    result = await with_agent(script, get)
    assert isinstance(result, viewer.GetResult)
    assert result.final.Status == st.LINK_LOST
    assert int(result.final.NumberOfCompletedSuboperations) == 2
    assert int(result.final.NumberOfFailedSuboperations) == 2


async def test_garbage_from_the_agent_is_a_protocol_failure() -> None:
    result = await with_agent(playing(b"\x00\x00\x00\x06garbage"), get)
    assert isinstance(result, viewer.GetResult)
    assert result.final.Status == st.RELAY_PROTOCOL


async def test_a_silent_agent_times_out() -> None:
    async def silent(stream: ByteStream, codec: MessageCodec, req: Request) -> None:
        await asyncio.sleep(30)

    result = await with_agent(silent, get, limit=1)
    assert isinstance(result, viewer.GetResult)
    assert result.final.Status == st.LINK_LOST
    assert "no response" in str(result.final.get("ErrorComment", ""))


async def test_find_passes_matches_and_the_final_status() -> None:
    match = query("STUDY", StudyInstanceUID="1.2.3", PatientName="DOE^JANE")
    from relay.dicom.rawds import encode_dataset

    script = playing(
        Pending(transfer_syntax=EXPLICIT, dataset=encode_dataset(match)),
        FinalResponse(0xC311, comment="PACS said no"),
    )
    matches, final = await with_agent(
        script, lambda port: viewer.find(port, query("STUDY", StudyInstanceUID=""))
    )
    assert [str(m.PatientName) for m in matches] == ["DOE^JANE"]
    assert final.Status == 0xC311 and final.ErrorComment == "PACS said no"
