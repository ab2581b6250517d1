"""The node against a scripted agent: whatever the far end says, the viewer gets the truth.

Each test plays the agent's side of the stream message by message, including the odd and
the broken (no counts, more instances than announced, garbage), and checks what a
pynetdicom viewer is told.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import pytest
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import AE, build_context, build_role, evt

from relay.dicom import contexts, rawds
from relay.dicom import status as st
from relay.dicom.codec import (
    DicomLimits,
    FinalResponse,
    Instance,
    Message,
    MessageCodec,
    Pending,
    Request,
    read_message,
    write_message,
)
from relay.dicom.contexts import MODELS
from relay.dicom.node import DicomNode, _failed_list, move_proposals
from relay.dicom.session import STOPPING_REASON
from relay.net.bytestream import ByteStream, pipe
from relay.proto import ErrorCode
from relay_dev import samples

from . import viewer
from .chain import until
from .helpers import EXPLICIT, capturing_scp, query, scu

STUDY = samples.make_study(4, rows=16, cols=16, seed=61)
CLASSES = [samples.CT_IMAGE_STORAGE]


def inst(i: int) -> Instance:
    x = STUDY[i]
    return Instance(x.sop_class, x.sop_instance, x.transfer_syntax, x.data)


def as_class(i: int, sop_class: str, uid: str) -> Instance:
    """STUDY[i] as an instance of another SOP class."""
    ds = rawds.decode_dataset(STUDY[i].data, EXPLICIT)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid
    return Instance(sop_class, uid, EXPLICIT, rawds.encode_dataset(ds, EXPLICIT))


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


async def with_agent(
    script: Script,
    call: Callable[[int], T],
    limit: float = 20,
    pipe_limit: int = 256 * 1024,
    **options: Any,
) -> T:
    """Run `call(port)` (a blocking viewer) against a node whose agent plays `script`
    over a stream buffering `pipe_limit` bytes; `options` go to the DicomNode."""
    requests: list[Request] = []
    tasks: set[asyncio.Task[None]] = set()

    async def open_stream(headers: Mapping[str, str]) -> ByteStream:
        a, b = pipe(headers, limit=pipe_limit)

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

    node = DicomNode(open_stream, listen=("127.0.0.1", 0), timeout=limit, **options)
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


SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
RT_STRUCTURE_SET = "1.2.840.10008.5.1.4.1.1.481.3"  # not among contexts.COMMON_STORAGE


async def move_to_capture(
    script: Script, identifiers: list[Dataset | None]
) -> tuple[list[Dataset], dict[str, tuple[str, bytes]]]:
    """A C-MOVE to a capturing storage SCP; the statuses and what the SCP received."""
    with capturing_scp("DEST") as (captured, port):
        statuses = await with_agent(
            script,
            lambda p: viewer.move(
                p, query("STUDY", StudyInstanceUID="1.2.3"), "DEST", identifiers=identifiers
            ),
            destinations={"DEST": ("127.0.0.1", port)},
        )
        return statuses, captured.by_uid()


async def test_a_move_proposes_more_than_the_first_instance_s_class() -> None:
    """The PACS gives counts, so the agent sends no class list: the destination must still
    get a context for a class that comes after the first instance."""
    other = as_class(1, SECONDARY_CAPTURE, "2.25.6101")
    script = playing(
        Pending(remaining=3, completed=0, failed=0, warning=0),
        inst(0),
        other,
        inst(2),
        FinalResponse(0, completed=3, failed=0, warning=0),
    )
    statuses, received = await move_to_capture(script, [])
    final = statuses[-1]
    assert final.Status == 0 and final.NumberOfCompletedSuboperations == 3
    assert set(received) == {STUDY[0].sop_instance, other.sop_instance, STUDY[2].sop_instance}


async def test_a_move_instance_of_a_class_without_a_context_fails_that_sub_operation() -> None:
    """A class neither announced nor common has no context on the destination association:
    that sub-operation fails (0xB000, listed), the others arrive, nothing waits. A second
    association is not opened for it: a destination that serves one association at a time
    (storescp without --fork) would keep it waiting for as long as the first is open."""
    odd = as_class(1, RT_STRUCTURE_SET, "2.25.6102")
    script = playing(
        Pending(remaining=3, completed=0, failed=0, warning=0),
        inst(0),
        odd,
        inst(2),
        FinalResponse(0, completed=3, failed=0, warning=0),
    )
    identifiers: list[Dataset | None] = []
    statuses, received = await move_to_capture(script, identifiers)
    final, failed = statuses[-1], identifiers[-1]
    assert final.Status == st.WARNING_SUBOPS
    assert final.NumberOfCompletedSuboperations == 2 and final.NumberOfFailedSuboperations == 1
    assert failed is not None and failed.FailedSOPInstanceUIDList == odd.sop_instance
    assert set(received) == {STUDY[0].sop_instance, STUDY[2].sop_instance}


def test_move_proposals_put_the_known_classes_first_then_the_common_ones() -> None:
    mr, j2k = samples.MR_IMAGE_STORAGE, "1.2.840.10008.1.2.4.90"
    cxs = move_proposals([mr], [j2k])
    assert len(cxs) == contexts.MAX_CONTEXTS
    assert all(len(cx.transfer_syntax) == 1 for cx in cxs)
    first = [cx for cx in cxs if cx.abstract_syntax == mr]
    assert cxs[: len(first)] == first and str(first[0].transfer_syntax[0]) == j2k
    assert len(first) >= 10  # every likely syntax of the known class
    proposed = {str(cx.abstract_syntax) for cx in cxs}
    assert set(contexts.COMMON_STORAGE) <= proposed
    many = list(contexts.STORAGE_CLASSES[:40])
    assert {str(cx.abstract_syntax) for cx in move_proposals(many, [])} <= set(many)
    assert len(move_proposals(many, [])) == contexts.MAX_CONTEXTS


async def refused_for_limits(stream: ByteStream, codec: MessageCodec, request: Request) -> None:
    """What the agent's dispatcher does over its per-device caps (relay.agent.dispatch)."""
    stream.reset(ErrorCode.LIMIT_EXCEEDED)


async def test_an_agent_at_its_limits_is_out_of_resources_for_a_get() -> None:
    result = await with_agent(refused_for_limits, get)
    assert isinstance(result, viewer.GetResult)
    assert result.final.Status == st.SUBOPS_FAILED  # C-GET's "Refused: Out of resources"
    assert "busy" in str(result.final.ErrorComment)


async def test_an_agent_at_its_limits_is_out_of_resources_for_a_find() -> None:
    matches, final = await with_agent(
        refused_for_limits, lambda port: viewer.find(port, query("STUDY", StudyInstanceUID=""))
    )
    assert matches == []
    assert final.Status == st.AGENT_BUSY == 0xA700  # C-FIND's "Refused: Out of resources"


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


class _NodeEnd:
    """The node's end of the stream, telling whether the node is waiting for bytes."""

    def __init__(self, inner: ByteStream) -> None:
        self.inner = inner
        self.reading = False

    @property
    def headers(self) -> Mapping[str, str]:
        return self.inner.headers

    async def read(self, max_bytes: int = 65536) -> bytes:
        self.reading = True
        try:
            return await self.inner.read(max_bytes)
        finally:
            self.reading = False

    async def write(self, data: bytes) -> None:
        await self.inner.write(data)

    async def write_eof(self) -> None:
        await self.inner.write_eof()

    def reset(self, code: int) -> None:
        self.inner.reset(code)


@pytest.mark.parametrize("depth", [1, 6])
async def test_a_slow_viewer_holds_the_agent_at_the_node_s_queue_depth(depth: int) -> None:
    """The node reads ahead of a slow viewer by its configured queue depth, no more, no less.

    The viewer holds its first C-STORE; the agent writes instances as fast as the stream
    takes them. Once nothing moves, the agent has written the instance at the viewer,
    `depth` queued in the node, and the one the node has read and waits to queue; the next
    one is stuck in the stream (messages are larger than the stream's buffer).
    """
    study = samples.make_study(16, rows=16, cols=16, seed=67)
    held = threading.Event()
    release = threading.Event()
    written = 0
    writing = False
    ends: list[_NodeEnd] = []

    async def open_stream(headers: Mapping[str, str]) -> ByteStream:
        a, b = pipe(headers, limit=64)
        ends.append(_NodeEnd(a))

        async def agent() -> None:
            nonlocal written, writing
            codec = MessageCodec()
            assert isinstance(await read_message(b, codec), Request)
            counts = Pending(remaining=len(study), completed=0, failed=0, warning=0)
            await write_message(b, codec, counts)
            for x in study:
                writing = True
                await write_message(
                    b, codec, Instance(x.sop_class, x.sop_instance, x.transfer_syntax, x.data)
                )
                writing = False
                written += 1
            await write_message(b, codec, FinalResponse(0, completed=len(study), failed=0))
            await b.write_eof()

        task = asyncio.create_task(agent())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return ends[-1]

    def slow_viewer() -> None:
        held.set()
        assert release.wait(30)

    def stalled() -> bool:
        return held.is_set() and writing and bool(ends) and not ends[0].reading

    tasks: set[asyncio.Task[None]] = set()
    node = DicomNode(open_stream, listen=("127.0.0.1", 0), limits=DicomLimits(queue_depth=depth))
    await node.start()
    try:
        call = asyncio.create_task(
            asyncio.to_thread(
                viewer.get,
                node.address[1],
                query("STUDY", StudyInstanceUID="1.2.3"),
                classes=CLASSES,
                before_store=slow_viewer,
            )
        )
        await until(stalled)
        for _ in range(20):  # let every wake-up already scheduled on the loop run
            await asyncio.sleep(0)
        assert stalled()
        assert written == 1 + depth + 1
        release.set()
        result = await asyncio.wait_for(call, 60)
    finally:
        release.set()
        await node.stop()
    assert len(result.received) == len(study) and result.final.Status == 0


def find_then_cancel(port: int) -> list[int]:
    """A viewer's study C-FIND, cancelled after its first answer: the statuses it got."""
    model = MODELS[("study", "find")]
    assoc = scu("VIEWER").associate(
        "127.0.0.1", port, contexts=[build_context(model)], ae_title="RELAY"
    )
    assert assoc.is_established
    codes = []
    for n, (status, _match) in enumerate(
        assoc.send_c_find(query("STUDY", StudyInstanceUID=""), model, msg_id=7)
    ):
        codes.append(int(status.Status))
        if n == 0:
            assoc.send_c_cancel(7, query_model=model)
    assoc.release()
    return codes


async def test_a_viewer_cancel_reaches_a_silent_agent_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The node does not poll for the viewer's C-CANCEL: pynetdicom's receipt of it wakes
    the waiting handler. With the handler's own look-around pushed out to a minute, the
    cancel must still reach an agent that has gone quiet."""

    from relay.dicom import node as node_module
    from relay.dicom.codec import Cancel
    from relay.dicom.rawds import encode_dataset

    monkeypatch.setattr(node_module, "_LOOK", 60.0)
    match = encode_dataset(query("STUDY", StudyInstanceUID="1.2.3", PatientName="X^Y"))

    async def script(stream: ByteStream, codec: MessageCodec, req: Request) -> None:
        await write_message(stream, codec, Pending(transfer_syntax=EXPLICIT, dataset=match))
        try:
            async with asyncio.timeout(20):
                got = await read_message(stream, codec)
        except TimeoutError:
            got = None
        status = st.CANCEL if isinstance(got, Cancel) else st.SUCCESS
        await write_message(stream, codec, FinalResponse(status))
        await stream.write_eof()

    codes = await with_agent(script, find_then_cancel, limit=60)
    assert codes == [st.PENDING, st.CANCEL]


def failed_uids(identifier: Dataset | None) -> list[str]:
    """The Failed SOP Instance UID List of a final response's identifier."""
    assert identifier is not None and "FailedSOPInstanceUIDList" in identifier
    value = identifier.FailedSOPInstanceUIDList
    return [str(v) for v in value] if isinstance(value, list | MultiValue) else [str(value)]


async def test_a_move_cut_by_the_link_lists_what_failed_at_the_destination() -> None:
    """The node's failure final carries a list (the agent's), so pynetdicom does not add
    its own: the node must list the sub-operations that failed at the destination itself,
    or the list and NumberOfFailedSuboperations disagree (PS3.4 C.4.2.1.4.2)."""
    odd = as_class(1, RT_STRUCTURE_SET, "2.25.6102")  # no context at DEST: its store fails
    script = playing(Pending(remaining=4, completed=0, failed=0, warning=0), inst(0), odd, inst(2))
    identifiers: list[Dataset | None] = []
    statuses, received = await move_to_capture(script, identifiers)
    final = statuses[-1]
    assert final.Status == st.LINK_LOST
    assert final.NumberOfCompletedSuboperations == 2 and final.NumberOfFailedSuboperations == 2
    assert failed_uids(identifiers[-1]) == [odd.sop_instance]  # the 4th: never received
    assert set(received) == {STUDY[0].sop_instance, STUDY[2].sop_instance}


async def test_a_move_ending_in_a_warning_lists_the_destination_s_and_the_agent_s_failures() -> (
    None
):
    odd = as_class(1, RT_STRUCTURE_SET, "2.25.6103")
    script = playing(
        Pending(remaining=4, completed=0, failed=0, warning=0),
        inst(0),
        odd,
        inst(2),
        FinalResponse(0xB000, completed=3, failed=1, warning=0, failed_instances=("1.2.3.9",)),
    )
    identifiers: list[Dataset | None] = []
    statuses, _received = await move_to_capture(script, identifiers)
    final = statuses[-1]
    assert final.Status == st.WARNING_SUBOPS
    assert final.NumberOfCompletedSuboperations == 2 and final.NumberOfFailedSuboperations == 2
    assert failed_uids(identifiers[-1]) == [odd.sop_instance, "1.2.3.9"]


async def test_a_get_cut_by_the_link_lists_what_the_viewer_refused() -> None:
    """The same for a C-GET: the viewer's own refusals are listed (PS3.4 C.4.3.1.3.2)."""
    script = playing(Pending(remaining=4, completed=0, failed=0, warning=0), inst(0), inst(1))
    model = MODELS[("study", "get")]

    def refusing_get(port: int) -> list[tuple[Dataset, Dataset | None]]:
        assoc = scu("VIEWER").associate(
            "127.0.0.1",
            port,
            contexts=[build_context(model), build_context(CLASSES[0], [EXPLICIT])],
            ae_title="RELAY",
            ext_neg=[build_role(CLASSES[0], scp_role=True)],
            evt_handlers=[(evt.EVT_C_STORE, lambda event: 0xA700)],  # out of resources
        )
        assert assoc.is_established
        answers = list(assoc.send_c_get(query("STUDY", StudyInstanceUID="1.2.3"), model))
        assoc.release()
        return answers

    answers = await with_agent(script, refusing_get)
    final, identifier = answers[-1]
    assert final.Status == st.LINK_LOST
    assert final.NumberOfCompletedSuboperations == 0 and final.NumberOfFailedSuboperations == 4
    assert failed_uids(identifier) == [STUDY[0].sop_instance, STUDY[1].sop_instance]


def test_the_failed_list_is_bounded() -> None:
    uids = [f"1.2.826.0.1.3680043.10.1341.{i:030d}" for i in range(3000)]
    assert _failed_list(uids + uids[:5], 10).FailedSOPInstanceUIDList == uids[:10]
    listed = _failed_list(uids, 5000).FailedSOPInstanceUIDList
    assert len("\\".join(listed)) <= 0xFFFE  # an explicit VR UI value's 16-bit length
    assert listed == uids[: len(listed)] and len(listed) > 1000
    assert _failed_list(["1.2", "1.2", "1.3"], 10).FailedSOPInstanceUIDList == ["1.2", "1.3"]


@contextlib.contextmanager
def stalling_scp(ae_title: str = "DEST") -> Iterator[tuple[threading.Event, int]]:
    """A storage SCP that takes each C-STORE and never answers (until the test ends);
    the event is set once one has arrived."""
    arrived, done = threading.Event(), threading.Event()

    def on_store(event: Any) -> int:
        arrived.set()
        done.wait(60)
        return 0xA700

    ae = AE(ae_title=ae_title)
    ae.maximum_pdu_size = 0
    for sop in contexts.STORAGE_CLASSES[:100]:
        ae.add_supported_context(sop, [EXPLICIT])
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    assert server is not None
    try:
        yield arrived, int(server.server_address[1])
    finally:
        done.set()
        server.shutdown()
        server.server_close()


BIG_STUDY = samples.make_study(40, rows=16, cols=16, seed=71)


def streaming(study: Sequence[samples.EncodedInstance], written: list[int]) -> Script:
    """An agent sending `study` with its counts, as fast as the stream takes it."""

    async def play(stream: ByteStream, codec: MessageCodec, request: Request) -> None:
        n = len(study)
        await write_message(stream, codec, Pending(remaining=n, completed=0, failed=0, warning=0))
        for x in study:
            inst = Instance(x.sop_class, x.sop_instance, x.transfer_syntax, x.data)
            await write_message(stream, codec, inst)
            written[0] += 1
        await write_message(stream, codec, FinalResponse(0, completed=n, failed=0, warning=0))
        await stream.write_eof()

    return play


async def test_a_move_whose_destination_stalls_stops_pulling_the_study() -> None:
    """The first C-STORE gets no answer within the node's timeout: pynetdicom aborts the
    destination's association, and every later sub-operation would fail at once. The
    node stops the retrieve at the agent then, and fails with the true counts."""
    written = [0]
    identifiers: list[Dataset | None] = []
    with stalling_scp() as (_arrived, port):
        statuses = await with_agent(
            streaming(BIG_STUDY, written),
            lambda p: viewer.move(
                p, query("STUDY", StudyInstanceUID="1.2.3"), "DEST", identifiers=identifiers
            ),
            limit=1,
            pipe_limit=64,
            destinations={"DEST": ("127.0.0.1", port)},
        )
    final = statuses[-1]
    assert final.Status == st.MOVE_DESTINATION_UNREACHABLE
    assert "stopped answering" in str(final.ErrorComment)
    assert final.NumberOfCompletedSuboperations == 0
    assert final.NumberOfFailedSuboperations == len(BIG_STUDY)
    listed = failed_uids(identifiers[-1])
    assert listed[0] == BIG_STUDY[0].sop_instance
    assert set(listed) <= {x.sop_instance for x in BIG_STUDY}
    # The one at the destination, the node's queue, and what the stream held.
    assert written[0] < 10, f"the agent sent {written[0]} of {len(BIG_STUDY)}"


async def test_a_cancel_cuts_a_c_store_the_destination_does_not_answer() -> None:
    """A viewer's C-CANCEL while the destination sits on a C-STORE takes effect at once,
    not after the node's timeout (pynetdicom waits that long for the C-STORE's answer)."""
    model = MODELS[("study", "move")]
    cancelled_at: list[float] = []

    with stalling_scp() as (arrived, port):

        def move_then_cancel(p: int) -> tuple[list[Dataset], float]:
            assoc = scu("VIEWER").associate(
                "127.0.0.1", p, contexts=[build_context(model)], ae_title="RELAY"
            )
            assert assoc.is_established

            def cancel() -> None:
                assert arrived.wait(20)
                cancelled_at.append(time.monotonic())
                assoc.send_c_cancel(7, query_model=model)

            canceller = threading.Thread(target=cancel)
            canceller.start()
            ident = query("STUDY", StudyInstanceUID="1.2.3")
            statuses = [s for s, _ in assoc.send_c_move(ident, "DEST", model, msg_id=7)]
            done = time.monotonic()
            canceller.join(20)
            assoc.release()
            return statuses, done

        statuses, done = await with_agent(
            streaming(STUDY, [0]),
            move_then_cancel,
            limit=30,
            destinations={"DEST": ("127.0.0.1", port)},
        )
    final = statuses[-1]
    assert final.Status == st.CANCEL
    assert done - cancelled_at[0] < 5, f"the cancel took {done - cancelled_at[0]:.1f} s"
    assert final.NumberOfCompletedSuboperations == 0


async def test_stopping_while_a_retrieve_pauses_to_resume_answers_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A retrieve whose stream broke pauses before it asks again (up to 2 s); stop()
    gives an operation `_LEAVE` (1 s) to answer before it aborts the association. The
    pause ends at the stop, and the viewer gets the stopping failure, not an abort."""
    from relay.dicom import node as node_module

    monkeypatch.setattr(node_module, "_RESUME_PAUSE", (5.0, 5.0))
    tasks: set[asyncio.Task[None]] = set()
    opened: list[int] = []

    async def open_stream(headers: Mapping[str, str]) -> ByteStream:
        a, b = pipe(headers)
        opened.append(1)

        async def agent() -> None:
            codec = MessageCodec()
            assert isinstance(await read_message(b, codec), Request)
            await write_message(b, codec, Pending(remaining=4, completed=0, failed=0, warning=0))
            await write_message(b, codec, inst(0))
            await until(lambda: not a._inbox)  # type: ignore[attr-defined]  # a reset drops the unread
            b.reset(int(ErrorCode.INTERNAL_ERROR))  # a link-level break: resumable

        task = asyncio.create_task(agent())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return a

    node = DicomNode(open_stream, listen=("127.0.0.1", 0), timeout=20)
    await node.start()
    try:
        call = asyncio.create_task(asyncio.to_thread(get, node.address[1]))
        await until(lambda: bool(opened) and not tasks)
        await asyncio.sleep(0.3)  # the node has seen the break and pauses
        loop = asyncio.get_running_loop()
        started = loop.time()
        await node.stop()
        assert loop.time() - started < 1.0 + 0.5
        result = await asyncio.wait_for(call, 30)
    finally:
        await node.stop()
    assert len(opened) == 1
    assert result.final.Status == st.LINK_LOST
    assert result.final.ErrorComment == STOPPING_REASON
    assert result.final.NumberOfFailedSuboperations == 4 - len(result.received)


async def test_a_get_whose_every_sub_operation_failed_is_a702_not_a_warning() -> None:
    """PS3.4 C.4.3.3.1: Warning when some sub-operations completed and some failed,
    Failure when all failed. A PACS that calls an all-failed retrieve 0xB000 is not
    passed on as a warning with nothing completed."""
    script = playing(
        Pending(remaining=2, completed=0, failed=0, warning=0),
        FinalResponse(0xB000, completed=0, failed=2, warning=0, failed_instances=("1.2.3.4",)),
    )
    result = await with_agent(script, get)
    assert isinstance(result, viewer.GetResult)
    assert result.received == {}
    assert result.final.Status == st.SUBOPS_FAILED
    assert int(result.final.NumberOfCompletedSuboperations) == 0
    assert int(result.final.NumberOfFailedSuboperations) == 2


async def test_a_get_that_brought_nothing_of_what_was_announced_is_a702() -> None:
    script = playing(Pending(remaining=3, completed=0, failed=0, warning=0), FinalResponse(0))
    result = await with_agent(script, get)
    assert isinstance(result, viewer.GetResult)
    assert result.final.Status == st.SUBOPS_FAILED
    assert int(result.final.NumberOfFailedSuboperations) == 3


async def test_a_get_with_some_completed_and_some_failed_stays_a_warning() -> None:
    script = playing(
        Pending(remaining=2, completed=0, failed=0, warning=0),
        inst(0),
        FinalResponse(0xB000, completed=1, failed=1, warning=0),
    )
    result = await with_agent(script, get)
    assert isinstance(result, viewer.GetResult)
    assert len(result.received) == 1
    assert result.final.Status == st.WARNING_SUBOPS


async def test_a_cancelled_find_ends_in_cancel_even_if_the_pacs_says_success() -> None:
    """Once the viewer cancelled, the node drops the matches that still come: a
    Success after that would claim a complete result set the viewer never got
    (PS3.4 C.4.1.3.1: a cancelled C-FIND ends with status Cancel)."""
    from relay.dicom.codec import Cancel

    match = rawds.encode_dataset(query("STUDY", StudyInstanceUID="1.2.3", PatientName="X^Y"))

    async def script(stream: ByteStream, codec: MessageCodec, req: Request) -> None:
        await write_message(stream, codec, Pending(transfer_syntax=EXPLICIT, dataset=match))
        async with asyncio.timeout(20):
            assert isinstance(await read_message(stream, codec), Cancel)
        # The PACS had finished before the cancel reached it: more matches, then Success.
        await write_message(stream, codec, Pending(transfer_syntax=EXPLICIT, dataset=match))
        await write_message(stream, codec, FinalResponse(st.SUCCESS))
        await stream.write_eof()

    codes = await with_agent(script, find_then_cancel)
    assert codes == [st.PENDING, st.CANCEL]


@pytest.mark.parametrize(
    ("pacs_status", "viewer_status"),
    [(0xA700, st.SUBOPS_FAILED), (0xA801, st.SUBOPS_FAILED), (0xD123, 0xC000)],
)
async def test_a_pacs_status_a_c_get_does_not_have_reaches_the_viewer_as_one_it_does(
    pacs_status: int, viewer_status: int
) -> None:
    """PS3.4 C.4.3.1.4 lists the C-GET statuses; many PACS answer 0xA700 (C-FIND's and
    C-STORE's out of resources). pynetdicom sends a status its tables lack with the
    last pending response's counts (the undelivered not counted failed) and no Failed
    SOP Instance UID List: the node maps it first."""
    script = playing(
        Pending(remaining=3, completed=0, failed=0, warning=0),
        inst(0),
        FinalResponse(pacs_status, comment="no more"),
    )
    result = await with_agent(script, get)
    assert isinstance(result, viewer.GetResult)
    final = result.final
    assert final.Status == viewer_status and final.ErrorComment == "no more"
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (1, 2)


async def test_a_pacs_status_a_c_get_does_not_have_before_any_count_is_mapped_too() -> None:
    result = await with_agent(playing(FinalResponse(0xA700, comment="busy")), get)
    assert isinstance(result, viewer.GetResult)
    assert result.final.Status == st.SUBOPS_FAILED
    assert result.final.NumberOfFailedSuboperations == 1


def test_retrieve_statuses_keep_what_the_service_defines() -> None:
    for code in (0x0000, 0xFE00, 0xA701, 0xA702, 0xA900, 0xB000, 0xC000, 0xC311, 0x0122):
        assert st.for_retrieve(code) == code
    assert st.for_retrieve(0xA801) == st.SUBOPS_FAILED  # a C-GET has no destination
    assert st.for_retrieve(0xA801, move=True) == st.MOVE_DESTINATION_UNKNOWN
    assert st.for_retrieve(0xB007) == st.WARNING_SUBOPS
    assert st.for_retrieve(0x0001) == st.WARNING_SUBOPS
    assert st.for_retrieve(st.AGENT_BUSY) == st.SUBOPS_FAILED


@pytest.mark.parametrize(
    "end",
    [
        FinalResponse(0xB000, completed=1, failed=2, warning=0),  # warning
        FinalResponse(0xC311, comment="PACS failed"),  # failure
        None,  # the link lost: the node's own failure
    ],
)
async def test_a_retrieve_s_warning_or_failure_final_has_no_remaining_count(
    end: FinalResponse | None,
) -> None:
    """PS3.4 C.4.3.1.5: a C-GET response with Warning, Failure or Success shall not
    contain Number of Remaining Sub-operations. pynetdicom's final kept its last pending
    response's (2 here, beside 2 failed: five of three sub-operations)."""
    msgs: list[Message] = [Pending(remaining=3, completed=0, failed=0, warning=0), inst(0)]
    result = await with_agent(playing(*msgs, *([end] if end else [])), get)
    assert isinstance(result, viewer.GetResult)
    final = result.final
    assert final.Status not in (st.SUCCESS, st.PENDING, st.CANCEL)
    assert "NumberOfRemainingSuboperations" not in final
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (1, 2)


async def test_an_upload_whose_dataset_is_of_another_sop_class_is_a900() -> None:
    """PS3.4 B.2.3: a C-STORE whose dataset's SOP Class UID is not the command's is
    0xA900 "Data Set does not match SOP Class", refused before the agent is asked."""
    mr = samples.make_study(1, modality="MR", rows=16, cols=16, seed=62)[0]

    async def never(stream: ByteStream, codec: MessageCodec, req: Request) -> None:
        raise AssertionError("the agent must not be asked")

    status = await with_agent(
        never,
        lambda port: viewer.store(port, samples.CT_IMAGE_STORAGE, mr.sop_instance, mr.data),
    )
    assert status.Status == st.STORE_DATASET_MISMATCH == 0xA900


async def test_a_failure_before_any_pending_keeps_the_pacs_counts_and_its_instances() -> None:
    """A PACS that sends no pending response: its final's counts are the retrieve's. The
    node announced one notional sub-operation instead: the instances that had come were
    dropped, and 3 failed UIDs were listed beside NumberOfFailedSuboperations 1."""
    lost = ("1.2.3.7", "1.2.3.8", "1.2.3.9")
    script = playing(inst(0), inst(1),
                     FinalResponse(0xC311, "PACS failed", completed=2, failed=3, warning=0,
                                   failed_instances=lost))  # fmt: skip
    identifiers: list[Any] = []

    def get_noting(port: int) -> viewer.GetResult:
        """A C-GET like viewer.get's, noting each response's identifier (the failed list)."""
        model = MODELS[("study", "get")]
        result = viewer.GetResult()

        def on_store(event: Any) -> int:
            result.received[str(event.request.AffectedSOPInstanceUID)] = (EXPLICIT, b"")
            return 0

        assoc = scu("VIEWER").associate(
            "127.0.0.1",
            port,
            contexts=[build_context(model), build_context(CLASSES[0], [EXPLICIT])],
            ae_title="RELAY",
            ext_neg=[build_role(CLASSES[0], scp_role=True)],
            evt_handlers=[(evt.EVT_C_STORE, on_store)],
        )
        assert assoc.is_established
        for status, identifier in assoc.send_c_get(query("STUDY", StudyInstanceUID="1"), model):
            result.statuses.append(status)
            identifiers.append(identifier)
        assoc.release()
        return result

    result = await with_agent(script, get_noting)
    final = result.final
    assert set(result.received) == {STUDY[0].sop_instance, STUDY[1].sop_instance}
    assert final.Status == 0xC311
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (2, 3)
    assert failed_uids(identifiers[-1]) == list(lost)


async def test_a_pacs_warning_that_counts_nothing_is_a_failure_not_success() -> None:
    """A PACS's 0xB000 final with no counts and no instance before it delivered nothing:
    0xA702, not pynetdicom's "Success, 0 sub-operations"."""
    script = playing(FinalResponse(st.WARNING_SUBOPS))
    result = await with_agent(script, get)
    assert isinstance(result, viewer.GetResult)
    assert result.final.Status == st.SUBOPS_FAILED
    assert not result.received


async def test_a_pacs_a702_without_pending_counts_every_failure() -> None:
    lost = ("1.2.3.7", "1.2.3.8", "1.2.3.9")
    script = playing(FinalResponse(st.SUBOPS_FAILED, completed=0, failed=3, warning=0,
                                   failed_instances=lost))  # fmt: skip
    result = await with_agent(script, get)
    assert isinstance(result, viewer.GetResult)
    assert result.final.Status == st.SUBOPS_FAILED
    assert result.final.NumberOfFailedSuboperations == 3


def retrieve_cancelled_at_once(port: int, kind: str, asked: threading.Event) -> Dataset:
    """A C-GET or C-MOVE (to DEST) cancelled as soon as the agent has its request, before
    any response; its final response. (pynetdicom drops a C-CANCEL that comes before its
    handler starts.)"""
    model = MODELS[("study", kind)]
    cxs = [build_context(model)]
    roles: list[Any] = []
    if kind == "get":
        cxs.append(build_context(CLASSES[0], [EXPLICIT]))
        roles.append(build_role(CLASSES[0], scp_role=True))
    assoc = scu("VIEWER").associate(
        "127.0.0.1", port, contexts=cxs, ae_title="RELAY", ext_neg=roles or None
    )
    assert assoc.is_established
    ident = query("STUDY", StudyInstanceUID="1.2.3")
    if kind == "get":
        responses = assoc.send_c_get(ident, model, msg_id=5)
    else:
        responses = assoc.send_c_move(ident, "DEST", model, msg_id=5)
    assert asked.wait(20)
    assoc.send_c_cancel(5, query_model=model)
    statuses = [status for status, _ in responses]
    assoc.release()
    return statuses[-1]


async def cancelled_at_once(kind: str, end: FinalResponse) -> Dataset:
    """The viewer's final for a retrieve it cancels as soon as the agent has it, whose
    agent answers the C-CANCEL with `end`."""
    from relay.dicom.codec import Cancel

    asked = threading.Event()

    async def script(stream: ByteStream, codec: MessageCodec, req: Request) -> None:
        asked.set()
        async with asyncio.timeout(20):
            assert isinstance(await read_message(stream, codec), Cancel)
        await write_message(stream, codec, end)
        await stream.write_eof()

    with capturing_scp("DEST") as (_, dest_port):
        final = await with_agent(
            script,
            lambda port: retrieve_cancelled_at_once(port, kind, asked),
            destinations={"DEST": ("127.0.0.1", dest_port)},
        )
    return final


@pytest.mark.parametrize("kind", ["get", "move"])
@pytest.mark.parametrize(
    ("end", "remaining"),
    [
        (FinalResponse(st.CANCEL), None),  # the PACS counted nothing: unknown
        (FinalResponse(st.CANCEL, remaining=4, completed=0, failed=0, warning=0), 4),
    ],
)
async def test_a_retrieve_cancelled_before_any_count_does_not_claim_one_remaining(
    kind: str, end: FinalResponse, remaining: int | None
) -> None:
    """PS3.4 C.4.2.1.6, C.4.3.1.5: a Cancel response's Number of Remaining
    Sub-operations is the number not done, or absent. Cancelled before any count, the
    node announced one notional sub-operation to pynetdicom, whose Cancel then said 1
    remaining of a study of any size; a count the PACS's cancel gives is kept."""
    final = await cancelled_at_once(kind, end)
    assert final.Status == st.CANCEL
    assert final.get("NumberOfRemainingSuboperations") == remaining
    assert final.NumberOfCompletedSuboperations == 0


@pytest.mark.parametrize(
    ("kind", "end"),
    [
        ("get", FinalResponse(st.SUCCESS)),  # the agent's final counts nothing
        ("move", FinalResponse(st.SUCCESS)),
        ("get", FinalResponse(st.WARNING_SUBOPS)),
        ("get", FinalResponse(0xA700, "out of resources")),
    ],
)
async def test_a_retrieve_the_viewer_cancelled_before_any_count_ends_in_cancel(
    kind: str, end: FinalResponse
) -> None:
    """PS3.4 C.4.2.1.6, C.4.3.1.5: a cancelled retrieve ends in Cancel. The viewer's
    C-CANCEL reached the agent, whose final then counted nothing: the node answered
    "Success, 0 sub-operations" (or the agent's failure) instead."""
    final = await cancelled_at_once(kind, end)
    assert final.Status == st.CANCEL
    assert final.get("NumberOfRemainingSuboperations") is None
    assert final.NumberOfCompletedSuboperations == 0


async def test_a_match_the_pacs_warns_of_reaches_the_viewer_as_ff01() -> None:
    """The agent's PENDING says 0xFF01 (optional keys the PACS did not support); the node
    answered every match 0xFF00."""
    match = rawds.encode_dataset(query("STUDY", StudyInstanceUID="1.2.3", PatientName="X^Y"))
    script = playing(
        Pending(transfer_syntax=EXPLICIT, dataset=match, status=0xFF01),
        Pending(transfer_syntax=EXPLICIT, dataset=match),
        FinalResponse(st.SUCCESS),
    )

    def find(port: int) -> list[int]:
        model = MODELS[("study", "find")]
        assoc = scu("VIEWER").associate(
            "127.0.0.1", port, contexts=[build_context(model)], ae_title="RELAY"
        )
        assert assoc.is_established
        codes = [int(s.Status) for s, _ in assoc.send_c_find(query("STUDY"), model)]
        assoc.release()
        return codes

    assert await with_agent(script, find) == [0xFF01, st.PENDING, st.SUCCESS]
