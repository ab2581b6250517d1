"""A device sending its request slowly, against the embedded PACS over a pipe: what the
agent holds while it reads (memory for what came, not what was announced), that an
upload slower than `pacs.timeout` but above the minimum rate is stored, that a trickle or
a silence is cut by the pace (relay/dicom/pace.py), and that an operation slot is taken
only once the request is wholly read."""

from __future__ import annotations

import asyncio
import os
import struct
import threading
import tracemalloc
import zlib
from collections.abc import Iterator

import pytest

from relay.dicom import rawds
from relay.dicom import status as st
from relay.dicom.agent import DicomAgent, OperationSummary, serve_dicom_stream
from relay.dicom.codec import MessageCodec, MessageType, Request
from relay.dicom.pace import pace_deadline
from relay.dicom.uploads import UploadBudget, UploadBudgetFull, inflated_size
from relay.net.bytestream import ByteStream, StreamResetError, pipe
from relay.proto import ErrorCode
from relay_dev.pacs import EmbeddedPacs, MemoryStore
from tests.ends_helpers import wait_until

from .helpers import EXPLICIT
from .test_agent import CT, Workstation, final_of, retrieve, run, study_uid, target

DEFLATED = "1.2.840.10008.1.2.1.99"


@pytest.fixture
def pacs() -> Iterator[EmbeddedPacs]:
    with EmbeddedPacs(MemoryStore(CT)) as p:
        yield p


def store_request(extra: int = 0) -> Request:
    """CT[0] as an upload, with `extra` random bytes in a private OB element (no codec
    squeezes them: the wire carries them all)."""
    inst = CT[0]
    data = inst.data
    if extra:
        data += struct.pack("<HH2sHI", 0x0009, 0x1000, b"OB", 0, extra) + os.urandom(extra)
    return Request(op="store", transfer_syntax=EXPLICIT, dataset=data,
                   sop_class=inst.sop_class, sop_instance=inst.sop_instance)  # fmt: skip


def store_head(length: int) -> bytes:
    """A store REQUEST's first bytes, announcing a message of `length` bytes."""
    inst = CT[0]
    header = (
        f'{{"op":"store","ts":"{EXPLICIT}","cls":"{inst.sop_class}","iuid":"{inst.sop_instance}"}}'
    ).encode()
    return struct.pack(">IBBBH", length, 1, MessageType.REQUEST, 0, len(header)) + header


async def send_slowly(stream: ByteStream, data: bytes, step: int, pause: float) -> int:
    """Write `data` `step` bytes at a time, `pause` seconds apart (the device's uplink);
    returns what went before the agent stopped taking it."""
    sent = 0
    try:
        while sent < len(data):
            await stream.write(data[sent : sent + step])
            sent += len(data[sent : sent + step])
            await asyncio.sleep(pause)
    except Exception:
        return sent
    return sent


async def test_an_announced_upload_holds_what_came_not_what_it_announced(
    pacs: EmbeddedPacs,
) -> None:
    """A store REQUEST announcing 256 MiB made the agent allocate (and zero) 256 MiB at its
    first bytes, held for the whole request deadline: 32 such streams of one device were
    16 GiB at 512 MiB each. Now the buffer grows with what the device sent."""
    a, b = pipe()
    tracemalloc.start()
    try:
        server = asyncio.create_task(serve_dicom_stream(b, target(pacs)))
        await a.write(store_head(256 << 20) + os.urandom(64 << 10))
        await a.write_eof()  # the message ends short
        msgs = await Workstation(a).all()
        await asyncio.wait_for(server, 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert final_of(msgs).status == st.RELAY_PROTOCOL
    assert peak < 16 << 20, f"peak {peak >> 20} MiB"
    assert pacs.events.associations == 0


async def test_an_upload_longer_than_the_timeout_but_at_a_fair_rate_is_stored(
    pacs: EmbeddedPacs,
) -> None:
    """The whole request had to come within `pacs.timeout`: an upload over a slow uplink
    that needed longer was refused (the 30 s timeout, here 0.5 s, is one read's stall)."""
    frame = MessageCodec().encode(store_request(extra=256 << 10))
    a, b = pipe()
    server = asyncio.create_task(serve_dicom_stream(b, target(pacs, timeout=0.5)))
    # ~270 KiB in 17 steps 50 ms apart: about 1 s, well above MIN_REQUEST_RATE
    sender = asyncio.create_task(send_slowly(a, frame, 16 << 10, 0.05))
    msgs = await Workstation(a).all()
    assert await sender == len(frame)
    summary = await asyncio.wait_for(server, 20)
    assert final_of(msgs).status == 0, final_of(msgs)
    assert summary.seconds > 0.5  # longer than the old deadline, and not cut
    assert pacs.events.stores == 1


@pytest.mark.parametrize(("step", "reason"), [(64, "slower than"), (0, "nothing sent for")])
async def test_a_trickled_or_silent_request_is_cut_at_its_pace(
    pacs: EmbeddedPacs, step: int, reason: str
) -> None:
    """64 bytes every 20 ms (3 KiB/s) against a 64 KiB/s minimum; or its first bytes and
    then nothing. The PACS is never asked."""
    frame = MessageCodec().encode(store_request(extra=1 << 20))
    a, b = pipe()
    server = asyncio.create_task(
        serve_dicom_stream(b, target(pacs, timeout=0.5), min_rate=64 << 10)
    )
    await a.write(frame[:512])
    sender = asyncio.create_task(send_slowly(a, frame[512:], step, 0.02)) if step else None
    msgs = await Workstation(a).all()
    summary = await asyncio.wait_for(server, 20)
    final = final_of(msgs)
    assert final.status == st.RELAY_PROTOCOL and reason in final.comment, final
    assert summary.op == "invalid"
    assert pacs.events.associations == 0
    if sender is not None:
        sender.cancel()


async def test_a_slot_is_taken_only_once_the_request_is_read(pacs: EmbeddedPacs) -> None:
    """`admit` (the dispatcher's admit_request) is asked after the last byte of the
    request; refused, the PACS is not asked and the stream is not answered."""
    asked: list[int] = []
    frame = MessageCodec().encode(store_request())
    a, b = pipe()
    sent = 0

    def admit() -> bool:
        asked.append(sent)
        b.reset(ErrorCode.LIMIT_EXCEEDED)  # what the dispatcher does
        return False

    server = asyncio.create_task(serve_dicom_stream(b, target(pacs), admit=admit))
    for sent in range(0, len(frame), 4096):
        assert not asked
        await a.write(frame[sent : sent + 4096])
    sent = len(frame)
    summary = await asyncio.wait_for(server, 20)
    assert asked == [len(frame)]
    assert (summary.op, summary.status) == ("refused", st.AGENT_BUSY)
    assert pacs.events.associations == 0


async def test_a_devices_requests_are_held_within_its_upload_budget(pacs: EmbeddedPacs) -> None:
    """Each stream's request bytes were bounded (max_message) but not their sum: a device
    uploading on its 32 streams at once made the agent hold 32 x 512 MiB. Here the
    device's budget is 400 KiB: a second upload of ~300 KiB while the first is held is
    reset LIMIT_EXCEEDED (the workstation: agent busy), the first is stored, and the
    budget is given back whatever happened."""
    agent = DicomAgent(target(pacs))
    agent.uploads = UploadBudget(total=1 << 20, per_device=400 << 10)
    frame = MessageCodec().encode(store_request(extra=300 << 10))
    first_a, first_b = pipe()
    first = asyncio.create_task(agent.serve(first_b))
    await first_a.write(frame[: 200 << 10])
    await wait_until(lambda: agent.uploads.held >= 200 << 10)
    second_a, second_b = pipe()
    second = asyncio.create_task(agent.serve(second_b))
    with pytest.raises(StreamResetError) as info:
        await second_a.write(frame)
        await Workstation(second_a).all()
    assert info.value.code == ErrorCode.LIMIT_EXCEEDED
    refused = await asyncio.wait_for(second, 20)
    assert (refused.op, refused.status) == ("refused", st.AGENT_BUSY)
    await first_a.write(frame[200 << 10 :])
    assert final_of(await Workstation(first_a).all()).status == 0
    await asyncio.wait_for(first, 20)
    assert pacs.events.stores == 1
    assert (agent.uploads.held, dict(agent.uploads.by_device), agent.uploads.refused) == (0, {}, 1)


async def test_a_compressed_upload_is_charged_for_what_it_decodes_to(pacs: EmbeddedPacs) -> None:
    """zstd squeezes zeros ~1,000 to 1: charged only for its wire bytes, a device's 32
    uploads of 512 MiB each came in ~16 MB and were held decoded. Here 512 KiB of zeros
    (a few hundred bytes on the wire) against a 256 KiB budget."""
    agent = DicomAgent(target(pacs))
    agent.uploads = UploadBudget(total=1 << 20, per_device=256 << 10)
    inst = CT[0]
    data = inst.data + struct.pack("<HH2sHI", 0x0009, 0x1000, b"OB", 0, 512 << 10)
    data += bytes(512 << 10)
    request = Request(op="store", transfer_syntax=EXPLICIT, dataset=data,
                      sop_class=inst.sop_class, sop_instance=inst.sop_instance)  # fmt: skip
    frame = MessageCodec().encode(request)
    assert len(frame) < 64 << 10
    a, b = pipe()
    server = asyncio.create_task(agent.serve(b))
    await a.write(frame)
    with pytest.raises(StreamResetError) as info:
        await Workstation(a).all()
    assert info.value.code == ErrorCode.LIMIT_EXCEEDED
    summary = await asyncio.wait_for(server, 20)
    assert (summary.op, summary.status) == ("refused", st.AGENT_BUSY)
    assert pacs.events.associations == 0
    assert agent.uploads.held == 0


async def test_a_deflated_upload_is_charged_for_what_it_inflates_to_before_it_is(
    pacs: EmbeddedPacs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deflated upload of 512 KiB of zeros is ~500 bytes on the wire and after zstd: its
    check and its audit keys inflated it (512 MiB from ~500 KB, seconds of CPU), the audit
    keys on the event loop. Now the budget is charged its inflated size, counted without
    holding it, before anything inflates it; within the budget, the keys are read off the
    loop."""
    inflates: list[bool] = []  # whether each ran on the event loop's thread
    loop_thread = threading.get_ident()
    real = rawds.inflate

    def recording(data: bytes, limit: int) -> bytes:
        inflates.append(threading.get_ident() == loop_thread)
        return real(data, limit)

    monkeypatch.setattr(rawds, "inflate", recording)
    inst = CT[0]
    data = inst.data + struct.pack("<HH2sHI", 0x0009, 0x1000, b"OB", 0, 512 << 10)
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = c.compress(data + bytes(512 << 10)) + c.flush()
    request = Request(op="store", transfer_syntax=DEFLATED, dataset=deflated,
                      sop_class=inst.sop_class, sop_instance=inst.sop_instance)  # fmt: skip
    agent = DicomAgent(target(pacs))
    agent.uploads = UploadBudget(total=1 << 20, per_device=256 << 10)
    a, b = pipe()
    server = asyncio.create_task(agent.serve(b))
    await Workstation(a).send(request)
    with pytest.raises(StreamResetError) as info:
        await Workstation(a).all()
    assert info.value.code == ErrorCode.LIMIT_EXCEEDED
    assert (await asyncio.wait_for(server, 20)).status == st.AGENT_BUSY
    assert inflates == [] and pacs.events.associations == 0
    assert agent.uploads.held == 0
    # Within the budget: stored, and nothing inflated on the loop.
    agent.uploads = UploadBudget(total=4 << 20, per_device=2 << 20)
    # (on_request reads the keys, as the audit trail's "transfer begins" does)
    msgs, _ = await run(target(pacs), request, uploads=agent.uploads, on_request=_keys_of)
    assert final_of(msgs).status == 0
    assert inflates and not any(inflates)


async def test_a_reader_that_stalls_is_cut_and_its_association_let_go(pacs: EmbeddedPacs) -> None:
    """The other way round: a retrieve whose device takes its first answer and then nothing
    (the pipe holds 64 bytes) is cut after `pacs.stall_timeout` (here 0.5 s): the stream
    reset, the PACS association ended, and the summary says what the device got."""
    a, b = pipe(limit=64)
    pacing = target(pacs, stall_timeout=0.5, survey=False, spare_association=0)
    server = asyncio.create_task(serve_dicom_stream(b, pacing))
    ws = Workstation(a)
    await ws.send(retrieve(StudyInstanceUID=study_uid(CT)))
    assert await ws.recv() is not None  # then it reads no more
    summary = await asyncio.wait_for(server, 20)
    # The PACS had finished (the answers were queued here): the summary, and so the audit
    # trail, said success with every instance sent, which the device never got.
    assert summary.status == st.LINK_LOST and "took nothing for 0.5 s" in summary.comment
    assert summary.instances < len(CT)
    await wait_until(lambda: pacs.held() == 0)
    with pytest.raises(StreamResetError):
        while await a.read():
            pass


def _keys_of(summary: OperationSummary) -> None:
    summary.keys()


def test_the_inflated_size_is_counted_within_its_limit() -> None:
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    data = c.compress(bytes(5 << 20)) + c.flush()
    assert inflated_size(data, 64 << 20) == 5 << 20
    assert inflated_size(data, 1 << 20) == (1 << 20) + 1
    assert inflated_size(b"not deflate", 100) == len(b"not deflate")


def test_the_upload_budget_holds_per_device_and_in_all() -> None:
    budget = UploadBudget(total=100, per_device=60)
    budget.charge("a", 60)
    with pytest.raises(UploadBudgetFull, match="this device"):
        budget.charge("a", 1)
    budget.charge("b", 40)
    with pytest.raises(UploadBudgetFull, match="all devices"):
        budget.charge("c", 1)
    budget.release("a", 60)
    budget.charge("c", 60)
    assert (budget.held, budget.by_device) == (100, {"b": 40, "c": 60})


def test_the_pace_deadline_grows_with_what_came() -> None:
    """The first `stall` is grace; then each byte buys 1 / min_rate seconds, so a request
    of n bytes is done by stall + n / min_rate at worst."""
    assert pace_deadline(100.0, 0, 30.0, 1024.0) == 130.0
    assert pace_deadline(100.0, 1024 * 60, 30.0, 1024.0) == 190.0
    big = 512 << 20
    assert pace_deadline(0.0, big, 30.0, 16 * 1024) == 30.0 + big / (16 * 1024)
