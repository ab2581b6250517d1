"""The agent side against the embedded PACS, driven message by message over a pipe."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, RLELossless
from pynetdicom.association import Association

from relay.codecs import pixels as px
from relay.dicom import contexts, rawds
from relay.dicom import status as st
from relay.dicom.agent import DicomAgent, OperationSummary, serve_dicom_stream
from relay.dicom.codec import (
    Cancel,
    DicomLimits,
    ErrorMessage,
    FinalResponse,
    Instance,
    Message,
    MessageCodec,
    Pending,
    PixelPart,
    Request,
    read_message,
    write_message,
)
from relay.dicom.pacs_target import PacsTarget
from relay.dicom.rawds import encode_dataset
from relay.dicom.stats import DicomCounters
from relay.net.bytestream import ByteStream, StreamResetError, pipe
from relay.ops.config import Address
from relay_dev import samples
from relay_dev.matching import Record
from relay_dev.pacs import EmbeddedPacs, MemoryStore
from tests.ports import dead_port

from .chain import until
from .helpers import EXPLICIT, query

CT = samples.make_study(5, rows=64, cols=64)
MR = samples.make_study(3, modality="MR", rows=32, cols=32)
CT_STUDY = str(rawds.decode_dataset(CT[0].data, EXPLICIT).StudyInstanceUID)
MR_STUDY = str(rawds.decode_dataset(MR[0].data, EXPLICIT).StudyInstanceUID)


@pytest.fixture
def pacs() -> Iterator[EmbeddedPacs]:
    with EmbeddedPacs(MemoryStore(CT + MR)) as p:
        yield p


def study_uid(study: list[samples.EncodedInstance]) -> str:
    return str(rawds.decode_dataset(study[0].data, EXPLICIT).StudyInstanceUID)


def target(pacs: EmbeddedPacs, **kw: object) -> PacsTarget:
    base = PacsTarget(ae_title=pacs.ae_title, host="127.0.0.1", port=pacs.port, timeout=10)
    return replace(base, **kw)  # type: ignore[arg-type]


def ident(level: str, **keys: str) -> bytes:
    return encode_dataset(query(level, **keys), EXPLICIT)


def retrieve(level: str = "STUDY", root: str = "study", **keys: str) -> Request:
    return Request(op="retrieve", root=root, transfer_syntax=EXPLICIT, dataset=ident(level, **keys))  # type: ignore[arg-type]


class Workstation:
    """The workstation end of one stream, by hand."""

    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self.codec = MessageCodec()

    async def send(self, msg: Message) -> None:
        await write_message(self.stream, self.codec, msg)

    async def recv(self) -> Message | None:
        return await asyncio.wait_for(read_message(self.stream, self.codec), 20)

    async def all(self) -> list[Message]:
        out = []
        while (m := await self.recv()) is not None:
            out.append(m)
        await self.stream.write_eof()
        return out


async def run(
    pacs_target: PacsTarget, request: Request | None, **kw: object
) -> tuple[list[Message], OperationSummary]:
    a, b = pipe()
    server = asyncio.create_task(serve_dicom_stream(b, pacs_target, **kw))  # type: ignore[arg-type]
    ws = Workstation(a)
    if request is not None:
        await ws.send(request)
    msgs = await ws.all()
    return msgs, await asyncio.wait_for(server, 20)


def final_of(msgs: list[Message]) -> FinalResponse:
    assert isinstance(msgs[-1], FinalResponse), msgs[-1]
    assert sum(isinstance(m, FinalResponse) for m in msgs) == 1
    return msgs[-1]


async def test_echo(pacs: EmbeddedPacs) -> None:
    msgs, summary = await run(target(pacs), Request(op="echo"))
    assert msgs == [FinalResponse(0)]
    assert (summary.op, summary.status) == ("echo", 0)


@pytest.mark.parametrize("root", ["patient", "study"])
async def test_find_streams_every_match(pacs: EmbeddedPacs, root: str) -> None:
    req = Request(
        op="find",
        root=root,  # type: ignore[arg-type]
        transfer_syntax=EXPLICIT,
        dataset=ident("STUDY", PatientID="", StudyInstanceUID="", PatientName=""),
    )
    msgs, _ = await run(target(pacs), req)
    assert final_of(msgs).status == 0
    matches = [
        rawds.decode_dataset(m.dataset, m.transfer_syntax) for m in msgs if isinstance(m, Pending)
    ]
    assert {str(m.StudyInstanceUID) for m in matches} == {CT_STUDY, MR_STUDY}
    assert {str(m.PatientName) for m in matches} == {"DOE^JANE", "ROE^RICHARD"}


async def test_find_at_image_level(pacs: EmbeddedPacs) -> None:
    series = str(rawds.decode_dataset(CT[0].data, EXPLICIT).SeriesInstanceUID)
    req = Request(
        op="find",
        root="study",
        transfer_syntax=EXPLICIT,
        dataset=ident(
            "IMAGE", StudyInstanceUID=CT_STUDY, SeriesInstanceUID=series, SOPInstanceUID=""
        ),
    )
    msgs, _ = await run(target(pacs), req)
    uids = {
        str(rawds.decode_dataset(m.dataset, EXPLICIT).SOPInstanceUID)
        for m in msgs
        if isinstance(m, Pending)
    }
    assert uids == {i.sop_instance for i in CT}


async def test_get_streams_the_pacs_bytes_with_the_pacs_counts(pacs: EmbeddedPacs) -> None:
    stats = DicomCounters()
    msgs, summary = await run(target(pacs), retrieve(StudyInstanceUID=CT_STUDY), stats=stats)
    counts = [m for m in msgs if isinstance(m, Pending) and not m.estimate]
    assert counts and (counts[0].remaining or 0) + (counts[0].completed or 0) == 5
    instances = [m for m in msgs if isinstance(m, Instance)]
    assert [(i.sop_instance, i.transfer_syntax, i.dataset) for i in instances] == [
        (i.sop_instance, i.transfer_syntax, i.data) for i in CT
    ]
    final = final_of(msgs)
    assert (final.status, final.completed, final.failed) == (0, 5, 0)
    assert (summary.op, summary.status, summary.instances) == ("get", 0, 5)
    assert summary.keys() == {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": CT_STUDY}
    assert stats.instances == 5 and stats.operations[("get", "success")] == 1
    assert stats.raw_bytes["out"] > stats.wire_bytes["out"] > 0  # zstd did something


async def test_get_by_patient_in_patient_root(pacs: EmbeddedPacs) -> None:
    msgs, _ = await run(target(pacs), retrieve("PATIENT", "patient", PatientID="RELAY0002"))
    assert {m.sop_instance for m in msgs if isinstance(m, Instance)} == {i.sop_instance for i in MR}
    assert final_of(msgs).status == 0


async def test_get_without_survey_still_works(pacs: EmbeddedPacs) -> None:
    msgs, _ = await run(target(pacs, survey=False), retrieve(StudyInstanceUID=MR_STUDY))
    assert len([m for m in msgs if isinstance(m, Instance)]) == 3
    pendings = [m for m in msgs if isinstance(m, Pending)]
    assert (
        pendings and pendings[0].remaining == 2 and pendings[0].completed == 1
    )  # the PACS's counts
    assert final_of(msgs).status == 0


async def test_get_of_an_unknown_study(pacs: EmbeddedPacs) -> None:
    msgs, _ = await run(target(pacs), retrieve(StudyInstanceUID="1.2.3.4.5.6"))
    assert not any(isinstance(m, Instance) for m in msgs)
    final = final_of(msgs)
    assert final.status == 0 and not final.completed


async def test_move_through_the_agents_storage_scp(pacs: EmbeddedPacs) -> None:
    agent = DicomAgent(
        target(
            pacs, retrieve="move", move_ae_title="RELAYMOVE", move_listen=Address("127.0.0.1", 0)
        )
    )
    await agent.start()
    try:
        assert agent.move_receiver is not None  # listening on the port it got
        pacs.destinations["RELAYMOVE"] = ("127.0.0.1", agent.move_receiver.port)
        a, b = pipe()
        server = asyncio.create_task(agent.serve(b))
        ws = Workstation(a)
        await ws.send(retrieve(StudyInstanceUID=CT_STUDY))
        msgs = await ws.all()
        summary = await server
    finally:
        await agent.stop()
    counts = [m for m in msgs if isinstance(m, Pending) and not m.estimate]
    assert counts and (counts[0].remaining or 0) + (counts[0].completed or 0) == 5
    got = {m.sop_instance: m.dataset for m in msgs if isinstance(m, Instance)}
    assert got == {i.sop_instance: i.data for i in CT}
    assert final_of(msgs).status == 0
    assert (summary.op, summary.instances) == ("move", 5)


async def test_move_receiver_refuses_strangers(pacs: EmbeddedPacs) -> None:
    agent = DicomAgent(
        target(
            pacs, retrieve="move", move_ae_title="RELAYMOVE", move_listen=Address("127.0.0.1", 0)
        )
    )
    await agent.start()
    try:
        assert agent.move_receiver is not None
        port = agent.move_receiver.port
        from pynetdicom import build_context

        from .helpers import scu

        inst = CT[0]

        def push(called: str, calling: str = pacs.ae_title) -> int | None:
            assoc = scu(calling).associate(
                "127.0.0.1",
                port,
                contexts=[build_context(inst.sop_class, [EXPLICIT])],
                ae_title=called,
            )
            if not assoc.is_established:
                return None
            ds = rawds.EncodedDataset(inst.sop_class, inst.sop_instance, EXPLICIT, inst.data)
            status = int(assoc.send_c_store(ds).Status)
            assoc.release()
            return status

        # Not our AE title, or not the PACS calling: no association; the PACS calling
        # us, but naming no C-MOVE of ours: refused.
        assert await asyncio.to_thread(push, "ANY-SCP") is None
        assert await asyncio.to_thread(push, "RELAYMOVE", "STRANGER") is None
        assert await asyncio.to_thread(push, "RELAYMOVE") == st.STORE_NOT_AUTHORIZED
    finally:
        await agent.stop()


async def test_store_upload_reaches_the_pacs(pacs: EmbeddedPacs) -> None:
    new = samples.make_study(1, rows=32, cols=32, seed=11)[0]
    req = Request(
        op="store",
        transfer_syntax=EXPLICIT,
        dataset=new.data,
        sop_class=new.sop_class,
        sop_instance=new.sop_instance,
    )
    msgs, summary = await run(target(pacs), req)
    assert msgs == [FinalResponse(0)]
    assert pacs.instance_bytes(new.sop_instance) == new.data
    assert summary.op == "store"
    assert summary.keys()["SOPInstanceUID"] == new.sop_instance


async def test_malformed_upload_is_refused_before_the_pacs(pacs: EmbeddedPacs) -> None:
    new = samples.make_study(1, rows=32, cols=32, seed=12)[0]
    req = Request(
        op="store",
        transfer_syntax=EXPLICIT,
        dataset=new.data[:-7],
        sop_class=new.sop_class,
        sop_instance=new.sop_instance,
    )
    msgs, _ = await run(target(pacs), req)
    assert final_of(msgs).status == st.STORE_CANNOT_UNDERSTAND
    assert not pacs.has(new.sop_instance)
    assert pacs.events.stores == 0


async def test_pacs_down_fails_fast_with_a_reason() -> None:
    with dead_port() as port:  # nothing listens there, nor can while it is held
        await _fails_fast(PacsTarget(ae_title="NOPE", host="127.0.0.1", port=port, timeout=3))


async def _fails_fast(t: PacsTarget) -> None:
    for req, code in [
        (Request(op="echo"), st.PROCESSING_FAILURE),
        (retrieve(StudyInstanceUID="1.2.3"), st.PACS_UNREACHABLE),
        (
            Request(
                op="find",
                root="study",
                transfer_syntax=EXPLICIT,
                dataset=ident("STUDY", StudyInstanceUID=""),
            ),
            st.PACS_UNREACHABLE,
        ),
    ]:
        msgs, _ = await asyncio.wait_for(run(t, req), 15)
        final = final_of(msgs)
        assert final.status == code
        assert "unreachable" in final.comment


async def test_association_rejected() -> None:
    with EmbeddedPacs(MemoryStore(CT), require_called_aet=True) as strict:
        t = PacsTarget(ae_title="WRONGAE", host="127.0.0.1", port=strict.port, timeout=5)
        msgs, _ = await run(t, retrieve(StudyInstanceUID=CT_STUDY))
    final = final_of(msgs)
    assert final.status == st.PACS_REFUSED and "rejected" in final.comment


async def test_cancel_reaches_the_pacs() -> None:
    study = samples.make_study(30, rows=32, cols=32, seed=21)
    uid = str(rawds.decode_dataset(study[0].data, EXPLICIT).StudyInstanceUID)
    with EmbeddedPacs(MemoryStore(study), send_delay=0.03) as slow:
        a, b = pipe()
        server = asyncio.create_task(serve_dicom_stream(b, target(slow)))
        ws = Workstation(a)
        await ws.send(retrieve(StudyInstanceUID=uid))
        got = 0
        while got < 2:
            if isinstance(await ws.recv(), Instance):
                got += 1
        await ws.send(Cancel())
        msgs = await ws.all()
        summary = await asyncio.wait_for(server, 20)
        assert slow.events.cancels == 1
        assert slow.events.instances_sent < 30
    final = final_of(msgs)
    assert final.status == st.CANCEL
    assert summary.cancelled


async def test_stream_reset_mid_retrieval_aborts_the_pacs_operation() -> None:
    study = samples.make_study(30, rows=32, cols=32, seed=22)
    uid = str(rawds.decode_dataset(study[0].data, EXPLICIT).StudyInstanceUID)
    with EmbeddedPacs(MemoryStore(study), send_delay=0.02) as slow:
        a, b = pipe()
        server = asyncio.create_task(serve_dicom_stream(b, target(slow)))
        ws = Workstation(a)
        await ws.send(retrieve(StudyInstanceUID=uid))
        while not isinstance(await ws.recv(), Instance):
            pass
        a.reset(7)
        summary = await asyncio.wait_for(server, 20)
        sent = slow.events.instances_sent
        # The agent aborted the association: once the PACS has no association left,
        # nothing can send any more (without the abort it would go on to the end).
        await until(lambda: not slow._server.active_associations)
        assert slow.events.instances_sent <= sent + 1  # the PACS stopped sending
    assert summary.status == st.LINK_LOST
    assert sent < 30


async def test_workstation_closing_early_abandons_the_operation() -> None:
    study = samples.make_study(30, rows=32, cols=32, seed=23)
    uid = str(rawds.decode_dataset(study[0].data, EXPLICIT).StudyInstanceUID)
    with EmbeddedPacs(MemoryStore(study), send_delay=0.02) as slow:
        a, b = pipe()
        server = asyncio.create_task(serve_dicom_stream(b, target(slow)))
        ws = Workstation(a)
        await ws.send(retrieve(StudyInstanceUID=uid))
        await a.write_eof()
        summary = await asyncio.wait_for(server, 20)
        assert slow.events.instances_sent < 30
    assert summary.status == st.LINK_LOST


async def test_malformed_instance_from_the_pacs_is_counted_failed_not_relayed() -> None:
    bad = CT[2]
    store = MemoryStore(CT[:2] + CT[3:])
    broken = bad.data[:-50]
    store.add(bad.sop_class, bad.sop_instance, EXPLICIT, broken)
    with EmbeddedPacs(store) as p:
        msgs, _summary = await run(target(p), retrieve(StudyInstanceUID=CT_STUDY))
    relayed = {m.sop_instance for m in msgs if isinstance(m, Instance)}
    assert bad.sop_instance not in relayed and len(relayed) == 4
    final = final_of(msgs)
    assert final.status == st.WARNING_SUBOPS and final.failed == 1 and final.completed == 4
    assert bad.sop_instance in final.failed_instances


async def test_garbage_request_gets_an_error_and_a_failure(pacs: EmbeddedPacs) -> None:
    a, b = pipe()
    server = asyncio.create_task(serve_dicom_stream(b, target(pacs)))
    await a.write(b"\x00\x00\x00\x07\x09\x01\x00\x00\x00xx")
    ws = Workstation(a)
    msgs = await ws.all()
    summary = await server
    assert isinstance(msgs[0], ErrorMessage) and "version" in msgs[0].reason
    assert final_of(msgs).status == st.RELAY_PROTOCOL
    assert summary.op == "invalid"


async def test_a_request_must_come_first_and_in_time(pacs: EmbeddedPacs) -> None:
    msgs, _ = await run(target(pacs), Cancel())  # type: ignore[arg-type]
    assert isinstance(msgs[0], ErrorMessage) and final_of(msgs).status == st.RELAY_PROTOCOL
    _a, b = pipe()
    summary = await asyncio.wait_for(serve_dicom_stream(b, target(pacs, timeout=0.3)), 10)
    assert summary.status == st.RELAY_PROTOCOL


async def test_a_resumed_retrieve_must_bring_its_skip_list(pacs: EmbeddedPacs) -> None:
    """After a request with `resume`, the skip list comes next: anything else is refused
    with the relay-protocol status, and a stream that ends there is a lost link; the PACS
    is never asked."""
    resumed = replace(retrieve(StudyInstanceUID=CT_STUDY), resume=True)
    a, b = pipe()
    server = asyncio.create_task(serve_dicom_stream(b, target(pacs)))
    ws = Workstation(a)
    await ws.send(resumed)
    await ws.send(Cancel())
    msgs = await ws.all()
    summary = await asyncio.wait_for(server, 20)
    assert isinstance(msgs[0], ErrorMessage) and "skip list" in msgs[0].reason
    assert summary.status == st.RELAY_PROTOCOL

    a, b = pipe()
    server = asyncio.create_task(serve_dicom_stream(b, target(pacs)))
    ws = Workstation(a)
    await ws.send(resumed)
    await a.write_eof()
    summary = await asyncio.wait_for(server, 20)
    assert (summary.status, summary.comment) == (st.LINK_LOST, "stream closed before the skip list")
    assert pacs.events.associations == 0


def _device_pixels() -> bytes:
    """An instance with HTJ2K-encoded pixels, as a hostile device could frame one."""
    layout = px.find_pixels(CT[0].data, EXPLICIT)
    assert layout is not None
    enc = px.encode(layout.fmt, CT[0].data[layout.offset : layout.end], "htj2k")
    assert enc is not None
    msg = Instance(CT[0].sop_class, CT[0].sop_instance, EXPLICIT, CT[0].data)
    return MessageCodec().encode(msg, PixelPart(enc, layout.offset))


async def test_a_device_never_gets_the_agent_to_decode_pixels(
    pacs: EmbeddedPacs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Encoded pixels go only from the agent to a workstation: sent by a device, first
    or instead of a Cancel, they are refused before a codestream is looked at (an image
    decoder fed by a device can crash the agent, hang its loop, or build 500 MiB)."""
    decoded: list[px.EncodedPixels] = []
    decode = px.decode

    def recording(enc: px.EncodedPixels) -> bytes:
        decoded.append(enc)
        return decode(enc)

    frame = _device_pixels()
    monkeypatch.setattr(px, "decode", recording)
    a, b = pipe()
    server = asyncio.create_task(serve_dicom_stream(b, target(pacs)))
    await a.write(frame)
    msgs = await Workstation(a).all()
    summary = await asyncio.wait_for(server, 20)
    assert isinstance(msgs[0], ErrorMessage) and "encoded pixels" in msgs[0].reason
    assert (summary.op, summary.status) == ("invalid", st.RELAY_PROTOCOL)

    study = samples.make_study(30, rows=32, cols=32, seed=24)
    uid = str(rawds.decode_dataset(study[0].data, EXPLICIT).StudyInstanceUID)
    with EmbeddedPacs(MemoryStore(study), send_delay=0.02) as slow:
        a, b = pipe()
        server = asyncio.create_task(serve_dicom_stream(b, target(slow)))
        ws = Workstation(a)
        await ws.send(retrieve(StudyInstanceUID=uid))
        await a.write(frame)  # where only a Cancel may come: the device gave up
        with contextlib.suppress(StreamResetError):
            await ws.all()
        summary = await asyncio.wait_for(server, 20)
        assert summary.instances < 30
    assert decoded == []


@pytest.mark.parametrize("data", [b"\x08\x00\x52\x00CS\xff\xff", b"garbage!!", b""])
async def test_undecodable_identifier_never_reaches_the_pacs(
    pacs: EmbeddedPacs, data: bytes
) -> None:
    req = Request(op="find", root="study", transfer_syntax=EXPLICIT, dataset=data)
    msgs, _ = await run(target(pacs), req)
    final = final_of(msgs)
    assert final.status == st.BAD_IDENTIFIER and "identifier" in final.comment
    assert pacs.events.finds == 0 and pacs.events.associations == 0


async def test_backpressure_keeps_the_pacs_few_instances_ahead() -> None:
    study = samples.make_study(40, rows=128, cols=128, seed=24)
    uid = str(rawds.decode_dataset(study[0].data, EXPLICIT).StudyInstanceUID)
    depth = 2
    with EmbeddedPacs(MemoryStore(study)) as p:
        a, b = pipe(limit=16 * 1024)
        server = asyncio.create_task(
            serve_dicom_stream(b, target(p), limits=DicomLimits(queue_depth=depth))
        )
        ws = Workstation(a)
        await ws.send(retrieve(StudyInstanceUID=uid))
        received = 0
        while received < 3:
            if isinstance(await ws.recv(), Instance):
                received += 1
        await asyncio.sleep(0.5)  # a slow viewer: let the PACS run ahead as far as it can
        ahead = p.events.instances_sent - received
        # channel (depth) + one blocked in the C-STORE handler + one in the pipe + one in
        # the middle of being handed over + the encoder's window (codec_workers more in
        # the pump: being encoded or waiting to be written): never the whole study.
        assert ahead <= depth + 3 + target(p).codec_workers, ahead
        msgs = await ws.all()
        await server
    assert received + len([m for m in msgs if isinstance(m, Instance)]) == 40


async def test_first_instance_arrives_while_the_pacs_is_still_sending() -> None:
    study = samples.make_study(12, rows=32, cols=32, seed=25)
    uid = str(rawds.decode_dataset(study[0].data, EXPLICIT).StudyInstanceUID)
    with EmbeddedPacs(MemoryStore(study), send_delay=0.05) as slow:
        a, b = pipe()
        server = asyncio.create_task(serve_dicom_stream(b, target(slow)))
        ws = Workstation(a)
        await ws.send(retrieve(StudyInstanceUID=uid))
        while not isinstance(await ws.recv(), Instance):
            pass
        assert slow.events.instances_sent < 12
        await ws.all()
        await server


async def test_reset_of_the_pump_side_is_handled(pacs: EmbeddedPacs) -> None:
    """The workstation resets before reading anything: serve returns, nothing leaks."""
    a, b = pipe()
    server = asyncio.create_task(serve_dicom_stream(b, target(pacs)))
    await write_message(a, MessageCodec(), retrieve(StudyInstanceUID=CT_STUDY))
    a.reset(7)
    summary = await asyncio.wait_for(server, 20)
    assert summary.status in (st.LINK_LOST, 0)
    with pytest.raises(StreamResetError):
        await a.read()


async def test_a_move_waits_for_a_viewer_slower_than_the_pacs_timeout() -> None:
    """C-MOVE: the PACS's next response waits for its C-STORE at our receiver, which waits
    (up to `stall_timeout`) while the viewer reads nothing. A pause longer than
    `pacs.timeout` is the viewer's, not the PACS's failing: every instance comes."""
    study = samples.make_study(24, rows=128, cols=128, seed=26)
    with EmbeddedPacs(MemoryStore(study)) as p:
        agent = DicomAgent(
            target(
                p, timeout=1, stall_timeout=30, survey=False, spare_association=0,
                retrieve="move", move_ae_title="RELAYMOVE", move_listen=Address("127.0.0.1", 0),
            ),
            limits=DicomLimits(queue_depth=2),
        )  # fmt: skip
        await agent.start()
        try:
            assert agent.move_receiver is not None
            p.destinations["RELAYMOVE"] = ("127.0.0.1", agent.move_receiver.port)
            a, b = pipe(limit=16 * 1024)
            server = asyncio.create_task(agent.serve(b))
            ws = Workstation(a)
            await ws.send(retrieve(StudyInstanceUID=study_uid(study)))
            got = 0
            while got < 3:
                got += isinstance(await ws.recv(), Instance)
            await asyncio.sleep(2.5)  # the viewer pauses: longer than pacs.timeout
            assert p.events.instances_sent < len(study)  # the PACS waited on us
            msgs = await ws.all()
            summary = await asyncio.wait_for(server, 20)
        finally:
            await agent.stop()
    assert got + len([m for m in msgs if isinstance(m, Instance)]) == len(study)
    assert final_of(msgs).status == 0 and summary.status == 0


async def test_aborting_the_pacs_association_never_holds_up_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pynetdicom's A-ABORT blocks (it stops the association's thread and sleeps, longer
    while the PACS keeps the connection): the stream's end must not wait for it on the
    loop, where every other stream of the agent runs."""
    loop_thread = threading.current_thread()
    aborted_on: list[threading.Thread] = []
    abort = Association._abort_blocking  # what `abort()` runs (pynetdicom sets it)

    def slow_abort(self: Association, block: bool = True) -> None:
        aborted_on.append(threading.current_thread())
        time.sleep(0.5)  # as a PACS that holds on to the connection makes it
        abort(self, block)

    monkeypatch.setattr(Association, "_abort_blocking", slow_abort)
    study = samples.make_study(30, rows=32, cols=32, seed=27)
    gaps: list[float] = []

    async def ticker() -> None:
        while True:
            started = time.monotonic()
            await asyncio.sleep(0.005)
            gaps.append(time.monotonic() - started)

    with EmbeddedPacs(MemoryStore(study), send_delay=0.02) as slow:
        a, b = pipe()
        server = asyncio.create_task(serve_dicom_stream(b, target(slow, survey=False)))
        ws = Workstation(a)
        await ws.send(retrieve(StudyInstanceUID=study_uid(study)))
        while not isinstance(await ws.recv(), Instance):
            pass
        tick = asyncio.create_task(ticker())
        a.reset(7)  # the viewer goes away mid-retrieve
        summary = await asyncio.wait_for(server, 20)
        await until(lambda: bool(aborted_on))
        await asyncio.sleep(0.1)
        tick.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tick
        await until(lambda: not slow._server.active_associations)
    assert summary.status == st.LINK_LOST
    assert loop_thread not in aborted_on
    assert max(gaps) < 0.4  # the abort itself takes 0.5 s


class _StrayStore(MemoryStore):
    """A PACS that, asked for CT[1], sends it under another study (a mis-indexed
    archive, or one that matches a retrieve loosely)."""

    def read(self, record: Record) -> bytes:
        data = super().read(record)
        if record.sop_instance != CT[1].sop_instance:
            return data
        ds = rawds.decode_dataset(data, EXPLICIT)
        ds.StudyInstanceUID = MR_STUDY
        return encode_dataset(ds, EXPLICIT)


@pytest.mark.parametrize("kind", ["get", "move"])
async def test_an_instance_of_another_study_is_not_relayed(kind: str) -> None:
    """What the PACS sends for a retrieve must be what was asked for (intake.limit_to)."""
    with EmbeddedPacs(_StrayStore(CT)) as p:
        if kind == "get":
            msgs, _ = await run(target(p), retrieve(StudyInstanceUID=CT_STUDY))
        else:
            agent = DicomAgent(
                target(p, retrieve="move", move_ae_title="RELAYMOVE",
                       move_listen=Address("127.0.0.1", 0))
            )  # fmt: skip
            await agent.start()
            try:
                assert agent.move_receiver is not None
                p.destinations["RELAYMOVE"] = ("127.0.0.1", agent.move_receiver.port)
                a, b = pipe()
                server = asyncio.create_task(agent.serve(b))
                ws = Workstation(a)
                await ws.send(retrieve(StudyInstanceUID=CT_STUDY))
                msgs = await ws.all()
                await server
            finally:
                await agent.stop()
    relayed = {m.sop_instance for m in msgs if isinstance(m, Instance)}
    assert relayed == {i.sop_instance for i in CT} - {CT[1].sop_instance}
    final = final_of(msgs)
    assert final.status != st.SUCCESS and final.failed == 1, final


@contextlib.contextmanager
def ct_only_pacs() -> Iterator[int]:
    """A PACS (pynetdicom) that stores CT images only, in any syntax."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt

    ae = AE(ae_title="CTONLY")
    ae.add_supported_context(samples.CT_IMAGE_STORAGE, ALL_TRANSFER_SYNTAXES)
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda e: 0)]
    )
    assert server is not None
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()


async def test_an_upload_of_a_class_the_pacs_does_not_store_is_0122() -> None:
    """0xA700 tells the viewer to try again later; a PACS that rejected the SOP class's
    presentation context will refuse it every time: 0x0122, SOP Class not supported
    (PS3.7 C.5.9)."""
    mr = MR[0]
    req = Request(op="store", transfer_syntax=EXPLICIT, dataset=mr.data,
                  sop_class=mr.sop_class, sop_instance=mr.sop_instance)  # fmt: skip
    with ct_only_pacs() as port:
        t = PacsTarget(ae_title="CTONLY", host="127.0.0.1", port=port, timeout=5)
        msgs, summary = await run(t, req)
    final = final_of(msgs)
    assert final.status == st.STORE_SOP_CLASS_NOT_SUPPORTED == 0x0122
    assert "does not accept the presentation contexts" in final.comment
    assert summary.status == 0x0122


async def test_a_query_the_pacs_has_no_model_for_is_refused_not_aborted() -> None:
    """A PACS that accepts the association but none of its contexts refused the query
    (0xC002, status.PACS_REFUSED); it did not abort or fail to answer (0xC003)."""
    req = Request(op="find", root="study", transfer_syntax=EXPLICIT,
                  dataset=ident("STUDY", StudyInstanceUID=""))  # fmt: skip
    with ct_only_pacs() as port:
        t = PacsTarget(ae_title="CTONLY", host="127.0.0.1", port=port, timeout=5)
        msgs, _ = await run(t, req)
    final = final_of(msgs)
    assert final.status == st.PACS_REFUSED
    assert "does not accept the presentation contexts" in final.comment


async def test_a_patient_id_in_the_study_s_character_set_is_what_was_asked_for() -> None:
    """The intake checks each instance against the retrieve's keys; a Patient ID with a
    character outside ASCII (ISO_IR 100 in the samples) is compared as text in each
    side's own character set, not as the instance's bytes read as UTF-8 (every
    instance was refused 0xC0F1: a patient-level retrieve brought nothing)."""
    spec = samples.StudySpec(patient_id="MÜLLER01")
    study = samples.make_study(2, rows=16, cols=16, seed=81, spec=spec)
    identifier = query("PATIENT", PatientID="MÜLLER01")
    identifier.SpecificCharacterSet = "ISO_IR 100"
    req = Request(op="retrieve", root="patient", transfer_syntax=EXPLICIT,
                  dataset=encode_dataset(identifier, EXPLICIT))  # fmt: skip
    with EmbeddedPacs(MemoryStore(study)) as p:
        msgs, _ = await run(target(p), req)
    assert {m.sop_instance for m in msgs if isinstance(m, Instance)} == {
        i.sop_instance for i in study
    }
    final = final_of(msgs)
    assert (final.status, final.completed, final.failed) == (0, 2, 0)


async def test_an_upload_of_another_sop_class_than_its_command_is_a900(
    pacs: EmbeddedPacs,
) -> None:
    mr = MR[1]
    req = Request(op="store", transfer_syntax=EXPLICIT, dataset=mr.data,
                  sop_class=samples.CT_IMAGE_STORAGE, sop_instance=mr.sop_instance)  # fmt: skip
    msgs, _ = await run(target(pacs), req)
    assert final_of(msgs).status == st.STORE_DATASET_MISMATCH == 0xA900
    assert pacs.events.stores == 0


async def test_a_find_match_the_pacs_garbled_is_not_a_complete_success(
    pacs: EmbeddedPacs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pynetdicom gives a pending C-FIND response whose identifier it cannot decode as
    (status, None); the agent passed over it, and the PACS's Success then claimed a
    complete result set one match short."""
    import pynetdicom.association

    real = pynetdicom.association.decode  # type: ignore[attr-defined]
    calls = 0

    def garbling(*args: object, **kw: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise ValueError("garbled identifier")
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(pynetdicom.association, "decode", garbling)
    req = Request(op="find", root="study", transfer_syntax=EXPLICIT,
                  dataset=ident("STUDY", StudyInstanceUID=""))  # fmt: skip
    msgs, _ = await run(target(pacs, spare_association=0), req)
    assert len([m for m in msgs if isinstance(m, Pending)]) == 1  # of the 2 studies
    final = final_of(msgs)
    assert final.status == st.PACS_GARBLED
    assert "could not be decoded" in final.comment  # (no value of theirs)


_COUNT_TAGS = (0x1020, 0x1021, 0x1022, 0x1023)  # Remaining, Completed, Failed, Warning
_SENTINEL = 0xBEEF


def _odd_counts(pdv: bytes) -> bytes:
    """A command fragment (one PDV: its header byte, then the implicit VR command set)
    whose counts, encoded as _SENTINEL, are 3 bytes long instead (Command Group Length
    made to match): what pydicom cannot read as US."""
    grown = 0
    for elem in _COUNT_TAGS:
        tag = struct.pack("<HH", 0, elem)
        old = tag + struct.pack("<I", 2) + struct.pack("<H", _SENTINEL)
        if old in pdv:
            pdv = pdv.replace(old, tag + struct.pack("<I", 3) + b"\x01\x02\x03")
            grown += 1
    length = struct.unpack_from("<I", pdv, 9)[0]  # (0000,0000) UL, after the PDV's byte
    return pdv[:9] + struct.pack("<I", length + grown) + pdv[13:]


@contextlib.contextmanager
def pacs_with_malformed_counts(study: list[samples.EncodedInstance], how: str) -> Iterator[int]:
    """A PACS (pynetdicom) whose C-GET responses carry every sub-operation count
    malformed: two values each (`how` "values"), or 3 bytes long ("odd")."""
    from pynetdicom import AE, evt

    def on_get(event: object) -> Iterator[object]:
        yield len(study)
        for x in study:
            yield (
                0xFF00,
                rawds.EncodedDataset(x.sop_class, x.sop_instance, x.transfer_syntax, x.data),
            )

    def tamper(event: Any) -> None:
        msg = event.message
        cs = msg.command_set
        if cs.CommandField != 0x8010:
            return
        for elem in _COUNT_TAGS:
            if (0, elem) in cs:
                cs[0, elem].value = [3, 3] if how == "values" else _SENTINEL
        msg._set_command_group_length()
        if how == "odd":
            encode = msg.encode_msg

            def encode_odd(context_id: int, max_pdu: int) -> Iterator[Any]:
                for n, pdata in enumerate(encode(context_id, max_pdu)):
                    if n == 0:
                        cid, pdv = pdata.presentation_data_value_list[0]
                        pdata.presentation_data_value_list[0] = (cid, _odd_counts(pdv))
                    yield pdata

            msg.encode_msg = encode_odd

    server = AE(ae_title="ODDPACS").start_server(
        ("127.0.0.1", 0),
        block=False,
        evt_handlers=[(evt.EVT_C_GET, on_get), (evt.EVT_DIMSE_SENT, tamper)],
        contexts=contexts.scp_contexts(
            storage_role_selection=True, extra=[contexts.MODELS[("study", "get")]]
        ),
    )
    assert server is not None
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()


@pytest.mark.parametrize("standard_handlers", [False, True])
@pytest.mark.parametrize("how", ["values", "odd"])
async def test_a_pacs_s_malformed_sub_operation_counts_are_ignored(
    how: str,
    standard_handlers: bool,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A count that is not one US value: pynetdicom took the first of several (a count
    the PACS did not mean) and aborted the association on one pydicom cannot read (the
    retrieve ended 0xC003 as if the PACS had aborted, after pacs.timeout). It is left
    out, as from a PACS that gives none, and said once in the log without patient data.
    Also where pynetdicom's own DIMSE log handler is bound (at debug), which reads the
    counts first."""
    import pynetdicom._config

    monkeypatch.setattr(
        pynetdicom._config, "LOG_HANDLER_LEVEL", "standard" if standard_handlers else "none"
    )
    caplog.set_level(logging.INFO)
    with pacs_with_malformed_counts(CT, how) as port:
        t = PacsTarget(ae_title="ODDPACS", host="127.0.0.1", port=port, timeout=5, survey=False)
        msgs, summary = await run(t, retrieve(StudyInstanceUID=CT_STUDY))
    final = final_of(msgs)
    assert final.status == st.SUCCESS and summary.status == st.SUCCESS
    assert (final.remaining, final.completed, final.failed, final.warning) == (None,) * 4
    assert len([m for m in msgs if isinstance(m, Instance)]) == len(CT)
    counts = [m for m in msgs if isinstance(m, Pending)]
    assert counts and all(m.remaining is None and m.completed is None for m in counts)
    warned = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert len(warned) == 1 and "Number of Remaining Sub-operations" in warned[0]
    assert CT_STUDY not in warned[0] and "RELAY0001" not in caplog.text


@contextlib.contextmanager
def uncompressed_only_pacs() -> Iterator[int]:
    """A PACS (pynetdicom) that stores CT images in Explicit or Implicit VR Little
    Endian only."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    ae = AE(ae_title="PLAIN")
    ae.add_supported_context(CTImageStorage, list(contexts.UNCOMPRESSED[:2]))
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda e: 0)]
    )
    assert server is not None
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()


def in_syntax(instance: samples.EncodedInstance, ts: str) -> bytes:
    """`instance`'s dataset in RLE Lossless or Deflated Explicit VR Little Endian."""
    if ts == DeflatedExplicitVRLittleEndian:
        packer = zlib.compressobj(wbits=-15)
        return packer.compress(instance.data) + packer.flush()
    ds = rawds.decode_dataset(instance.data, EXPLICIT)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(EXPLICIT)
    ds.compress(ts, generate_instance_uid=False)
    return encode_dataset(ds, EXPLICIT)


@pytest.mark.parametrize(
    ("ts", "status"),
    [(RLELossless, st.STORE_SYNTAX_NOT_ACCEPTED), (DeflatedExplicitVRLittleEndian, st.SUCCESS)],
)
async def test_an_upload_in_a_syntax_the_pacs_does_not_take_is_not_out_of_resources(
    ts: str, status: int
) -> None:
    """The PACS takes the class, in other syntaxes: a compressed upload it will refuse
    every time. 0xA700 (out of resources) made viewers retry it for ever; 0xC0F2 (cannot
    understand) is a failure they report. One pynetdicom converts (deflated to explicit
    VR) is stored as before."""
    req = Request(op="store", transfer_syntax=ts, dataset=in_syntax(CT[0], ts),
                  sop_class=CT[0].sop_class, sop_instance=CT[0].sop_instance)  # fmt: skip
    with uncompressed_only_pacs() as port:
        t = PacsTarget(ae_title="PLAIN", host="127.0.0.1", port=port, timeout=5)
        msgs, summary = await run(t, req)
    final = final_of(msgs)
    assert final.status == summary.status == status
    if status != st.SUCCESS:
        assert final.comment == f"PACS does not accept transfer syntax {ts}"
        assert st.for_store(final.status) == final.status == 0xC0F2  # what the node passes on


async def test_a_find_match_the_pacs_warns_of_keeps_its_ff01() -> None:
    """0xFF01: matches are continuing, optional keys not supported (PS3.4 C.4.1.1.4). It
    reached the viewer as 0xFF00: the agent's PENDING had no status."""
    from pynetdicom import AE, evt

    def on_find(event: object) -> Iterator[tuple[int, Dataset | None]]:
        yield 0xFF01, query("STUDY", StudyInstanceUID="1.2.3")
        yield 0xFF00, query("STUDY", StudyInstanceUID="1.2.4")

    server = AE(ae_title="WARNPACS").start_server(
        ("127.0.0.1", 0),
        block=False,
        evt_handlers=[(evt.EVT_C_FIND, on_find)],
        contexts=contexts.scp_contexts(
            storage_role_selection=False, extra=[contexts.MODELS[("study", "find")]]
        ),
    )
    assert server is not None
    req = Request(op="find", root="study", transfer_syntax=EXPLICIT,
                  dataset=ident("STUDY", StudyInstanceUID="", PatientComments=""))  # fmt: skip
    try:
        t = PacsTarget(ae_title="WARNPACS", host="127.0.0.1", port=server.server_address[1],
                       timeout=5, spare_association=0)  # fmt: skip
        msgs, _ = await run(t, req)
    finally:
        server.shutdown()
    assert [m.status for m in msgs if isinstance(m, Pending)] == [0xFF01, 0xFF00]
    assert final_of(msgs).status == st.SUCCESS
