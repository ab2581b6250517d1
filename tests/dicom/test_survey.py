"""The study survey runs beside the retrieve (relay.dicom.survey): the first instance does
not wait for it, and what it finds corrects a C-GET whose contexts missed something."""

from __future__ import annotations

import asyncio
import logging
import threading
import warnings
from collections.abc import Iterator
from dataclasses import replace

import pytest
from pydicom.dataset import Dataset
from pynetdicom import build_context

from relay.dicom import contexts, rawds, survey
from relay.dicom.agent import DicomAgent
from relay.dicom.bridge import Channel
from relay.dicom.codec import FinalResponse, Instance, Message, MessageCodec, Pending
from relay.dicom.contexts import COMMON_STORAGE
from relay.dicom.pacs_ops import FIRST_CONTEXTS, PacsOperation, remembered_storage
from relay.dicom.pacs_target import PacsTarget
from relay.dicom.rawds import encode_dataset
from relay.dicom.survey import StorageMemory, Survey, uncovered
from relay.net.bytestream import pipe
from relay.wire import DICOM_CONTENT_HEADERS, HEADER_DICOM_CONTENT
from relay_dev import matching, samples
from relay_dev.pacs import EmbeddedPacs, MemoryStore

from .helpers import EXPLICIT
from .test_agent import Workstation, retrieve, run

VL_PHOTO = "1.2.840.10008.5.1.4.1.1.77.1.4"  # not among the common classes
JPEG = "1.2.840.10008.1.2.4.70"
J2K = "1.2.840.10008.1.2.4.90"
CT = samples.make_study(4, rows=32, cols=32, seed=7)
STUDY = str(rawds.decode_dataset(CT[0].data, EXPLICIT).StudyInstanceUID)


def _as_class(inst: samples.EncodedInstance, sop_class: str) -> samples.EncodedInstance:
    ds = rawds.decode_dataset(inst.data, inst.transfer_syntax)
    ds.SOPClassUID = sop_class
    return replace(inst, sop_class=sop_class, data=encode_dataset(ds, inst.transfer_syntax))


RARE = [*CT[:3], _as_class(CT[3], VL_PHOTO)]


@pytest.fixture
def pacs() -> Iterator[EmbeddedPacs]:
    with EmbeddedPacs(MemoryStore(RARE)) as p:
        yield p


def target(pacs: EmbeddedPacs) -> PacsTarget:
    return PacsTarget(ae_title=pacs.ae_title, host="127.0.0.1", port=pacs.port, timeout=10)


def test_uncovered_judges_pairs_and_classes() -> None:
    ct, ts = samples.CT_IMAGE_STORAGE, EXPLICIT
    found = Survey(count=2, sop_classes=[ct], transfer_syntaxes=[ts], pairs={(ct, ts)})
    assert not uncovered(found, {(ct, ts)})
    assert uncovered(found, {(ct, "1.2.840.10008.1.2")})  # the class, not its syntax
    assert uncovered(Survey(count=1, sop_classes=[VL_PHOTO]), {(ct, ts)})
    assert not uncovered(Survey(count=1, sop_classes=[ct]), {(ct, "1.2.840.10008.1.2")})


def test_storage_memory_is_bounded_most_recent_first() -> None:
    memory = StorageMemory(max_classes=3, max_syntaxes=2)
    memory.remember(Survey(sop_classes=["1", "2"], transfer_syntaxes=["1.1"]))
    memory.remember(Survey(sop_classes=["3", "4"], transfer_syntaxes=["1.2", "1.3"]))
    assert memory.classes() == ["3", "4", "1"]  # "2" was the oldest
    assert memory.syntaxes() == ["1.2", "1.3"]
    memory.remember(Survey(sop_classes=["2"]))
    assert memory.classes() == ["2", "3", "4"]


def test_storage_memory_refuses_what_is_not_a_uid() -> None:
    """What it holds becomes presentation contexts of every C-GET (pynetdicom refuses a
    bad UID there) and goes to disk: a survey's or a retrieve's odd value stays out."""
    memory = StorageMemory()
    odd = [f"['{EXPLICIT}', '{J2K}']", f"{EXPLICIT}\\{J2K}", "1.2.x", "1." + "2" * 64, "", " "]
    memory.remember_seen([samples.CT_IMAGE_STORAGE, *odd], [*odd, EXPLICIT])
    memory.remember(Survey(sop_classes=odd, transfer_syntaxes=odd))
    assert memory.classes() == [samples.CT_IMAGE_STORAGE]
    assert memory.syntaxes() == [EXPLICIT]
    assert remembered_storage(memory, 2)  # a C-GET's contexts can be built from it


class _Answers:
    """An association whose C-FIND answers one series of one instance, listing the
    instance's SOP class and syntaxes as a PACS may (values of a VM 1-n element)."""

    def __init__(self, sop_class: object, syntaxes: object) -> None:
        self.sop_class = sop_class
        self.syntaxes = syntaxes

    def send_c_find(
        self, q: Dataset, model: str, msg_id: int = 1
    ) -> Iterator[tuple[Dataset, Dataset | None]]:
        match = Dataset()
        if q.QueryRetrieveLevel == "SERIES":
            match.SeriesInstanceUID = "1.2.3.4"
            yield _status(0xFF00, None), match
        elif q.QueryRetrieveLevel == "IMAGE":
            match.SOPInstanceUID = "1.2.3.4.5"
            match.SOPClassUID = self.sop_class
            match.AvailableTransferSyntaxUID = self.syntaxes
            yield _status(0xFF00, None), match
        yield _status(0, None), None


@pytest.mark.parametrize(
    ("sop_class", "syntaxes"),
    [
        (samples.CT_IMAGE_STORAGE, [EXPLICIT, JPEG, J2K]),  # what pydicom makes of 1-n
        (samples.CT_IMAGE_STORAGE, f"{EXPLICIT}\\{JPEG}\\{J2K}"),  # backslashes, as sent
        (f"{samples.CT_IMAGE_STORAGE}\\1.2.x", [EXPLICIT, "", JPEG, "1.2.x", J2K]),
    ],
)
def test_the_survey_takes_each_value_of_a_multi_valued_answer(
    sop_class: object, syntaxes: object
) -> None:
    """AvailableTransferSyntaxUID is VM 1-n: each value is one syntax (pydicom's str() of
    several is no UID), and what is not a UID is left out."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = "1.2.3"
    model = contexts.MODELS[("study", "find")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns of the odd values we give it
        found = survey.walk(
            _Answers(sop_class, syntaxes),  # type: ignore[arg-type]
            model, query, timeout=5, stopped=threading.Event(),
        )  # fmt: skip
    assert found is not None and found.count == 1
    assert found.sop_classes == [samples.CT_IMAGE_STORAGE]
    assert found.transfer_syntaxes == [EXPLICIT, JPEG, J2K]
    assert found.pairs == {(samples.CT_IMAGE_STORAGE, ts) for ts in (EXPLICIT, JPEG, J2K)}
    MessageCodec().validate(
        Pending(0, 0, 0, 0, sop_classes=tuple(found.sop_classes),
                transfer_syntaxes=tuple(found.transfer_syntaxes), estimate=True)
    )  # fmt: skip


async def test_the_retrieve_does_not_wait_for_the_survey(monkeypatch: pytest.MonkeyPatch) -> None:
    """A survey that never ends: every instance still comes, and the survey is stopped."""
    was_stopped = threading.Event()

    def endless(*_: object, stopped: threading.Event, **__: object) -> None:
        if stopped.wait(30):
            was_stopped.set()

    monkeypatch.setattr(survey, "walk", endless)
    with EmbeddedPacs(MemoryStore(CT)) as pacs:
        msgs, _ = await run(target(pacs), retrieve(StudyInstanceUID=STUDY))
    got = [m.sop_instance for m in msgs if isinstance(m, Instance)]
    assert got == [i.sop_instance for i in CT]
    assert isinstance(msgs[-1], FinalResponse) and msgs[-1].status == 0
    assert was_stopped.wait(5)
    assert not any(isinstance(m, Pending) and m.estimate for m in msgs)


async def test_the_survey_estimate_comes_while_a_slow_retrieve_runs(pacs: EmbeddedPacs) -> None:
    pacs.send_delay = 0.2
    msgs, _ = await run(target(pacs), retrieve(StudyInstanceUID=STUDY))
    (estimate,) = [m for m in msgs if isinstance(m, Pending) and m.estimate]
    assert estimate.remaining == 4
    assert set(estimate.sop_classes) == {samples.CT_IMAGE_STORAGE, VL_PHOTO}
    assert msgs.index(estimate) < len(msgs) - 1  # before the final response


async def test_a_class_the_first_contexts_missed_is_retrieved_again_once(
    pacs: EmbeddedPacs, caplog: pytest.LogCaptureFixture
) -> None:
    """VL Photographic is not proposed at first: the PACS fails that sub-operation, the
    survey shows the class, and a second C-GET brings it (and nothing twice). The agent
    remembers the class, so the next retrieve proposes it from the start."""
    assert VL_PHOTO not in COMMON_STORAGE
    caplog.set_level(logging.INFO, logger="relay.dicom.pacs_ops")
    memory = StorageMemory()
    msgs, summary = await run(target(pacs), retrieve(StudyInstanceUID=STUDY), memory=memory)
    got = [m.sop_instance for m in msgs if isinstance(m, Instance)]
    assert sorted(got) == sorted(i.sop_instance for i in RARE)  # each once
    final = msgs[-1]
    assert isinstance(final, FinalResponse)
    assert (final.status, final.completed, final.failed) == (0, 4, 0)
    assert summary.status == 0 and pacs.events.gets == 2
    assert VL_PHOTO in memory.classes()
    again = [r for r in caplog.records if "retrieving again" in r.getMessage()]
    assert len(again) == 1

    msgs, _ = await run(target(pacs), retrieve(StudyInstanceUID=STUDY), memory=memory)
    assert len([m for m in msgs if isinstance(m, Instance)]) == 4
    assert pacs.events.gets == 3  # one C-GET: the remembered class was proposed


async def test_no_survey_for_headers_only_or_one_instance() -> None:
    """A headers-only retrieve (its reader uses the final counts) and a single instance
    (the viewport's, retrieved ahead) cost the PACS no C-FIND; a study retrieve for a
    viewer does, beside it (slowed here, so that the survey finishes first)."""
    with EmbeddedPacs(MemoryStore(CT)) as pacs:
        async with DicomAgent(target(pacs)) as agent:  # its spare association ended
            await _no_survey(pacs, agent)


async def _no_survey(pacs: EmbeddedPacs, agent: DicomAgent) -> None:
    one = retrieve("IMAGE", StudyInstanceUID=STUDY,
                   SeriesInstanceUID=str(rawds.decode_dataset(CT[0].data, EXPLICIT)
                                         .SeriesInstanceUID),
                   SOPInstanceUID=CT[0].sop_instance)  # fmt: skip
    for headers, request in (({HEADER_DICOM_CONTENT: DICOM_CONTENT_HEADERS},
                              retrieve(StudyInstanceUID=STUDY)), ({}, one)):  # fmt: skip
        a, b = pipe(headers)
        server = asyncio.create_task(agent.serve(b))
        ws = Workstation(a)
        await ws.send(request)
        msgs = await ws.all()
        await asyncio.wait_for(server, 20)
        assert isinstance(msgs[-1], FinalResponse) and msgs[-1].status == 0
    assert pacs.events.finds == 0 and pacs.events.gets == 2
    pacs.send_delay = 0.1
    await run(target(pacs), retrieve(StudyInstanceUID=STUDY))
    assert pacs.events.finds > 0


async def test_a_headers_only_retrieve_surveys_when_its_contexts_missed(
    pacs: EmbeddedPacs,
) -> None:
    """No survey beside it, but after failed sub-operations one is made, and the class
    the first contexts missed comes in a second C-GET."""
    a, b = pipe({HEADER_DICOM_CONTENT: DICOM_CONTENT_HEADERS})
    async with DicomAgent(target(pacs)) as agent:
        server = asyncio.create_task(agent.serve(b))
        ws = Workstation(a)
        await ws.send(retrieve(StudyInstanceUID=STUDY))
        msgs = await ws.all()
        await asyncio.wait_for(server, 20)
    assert sorted(m.sop_instance for m in msgs if isinstance(m, Instance)) == sorted(
        i.sop_instance for i in RARE
    )
    assert isinstance(msgs[-1], FinalResponse) and msgs[-1].completed == 4
    assert pacs.events.finds > 0 and pacs.events.gets == 2


async def test_once_the_pacs_is_known_the_first_c_get_proposes_fewer_contexts(
    pacs: EmbeddedPacs,
) -> None:
    """Every proposed context costs association time before the first instance: the
    first retrieve from a PACS proposes broadly, later ones what it held and a few more."""
    memory = StorageMemory()
    await run(target(pacs), retrieve(StudyInstanceUID=STUDY), memory=memory)
    assert pacs.events.most_proposed > FIRST_CONTEXTS + 2  # nothing known: the common classes
    pacs.events.most_proposed = 0
    msgs, _ = await run(target(pacs), retrieve(StudyInstanceUID=STUDY), memory=memory)
    assert len([m for m in msgs if isinstance(m, Instance)]) == 4
    assert pacs.events.most_proposed <= FIRST_CONTEXTS + 2  # + the Q/R models
    assert pacs.events.gets == 3  # still one C-GET: what it held was proposed first


async def test_a_pacs_whose_retrieves_count_is_not_surveyed_again(pacs: EmbeddedPacs) -> None:
    """The first retrieve from a PACS is surveyed beside it; once its C-GETs have given
    their counts, later ones are not (the C-FIND would cost both ends CPU for nothing),
    and what they bring still teaches the memory its classes."""
    memory = StorageMemory()
    pacs.send_delay = 0.2  # the survey finishes while the retrieve runs
    msgs, _ = await run(target(pacs), retrieve(StudyInstanceUID=STUDY), memory=memory)
    assert any(isinstance(m, Pending) and m.estimate for m in msgs)
    finds = pacs.events.finds
    assert finds > 0 and memory.counts_given("get")

    fresh = StorageMemory()
    fresh.note_counts("get", given=True)
    msgs, _ = await run(target(pacs), retrieve(StudyInstanceUID=STUDY), memory=fresh)
    assert len([m for m in msgs if isinstance(m, Instance)]) == 4
    assert pacs.events.finds > finds  # VL Photographic failed: surveyed after all
    assert VL_PHOTO in fresh.classes()

    with EmbeddedPacs(MemoryStore(CT)) as plain:
        msgs, _ = await run(target(plain), retrieve(StudyInstanceUID=STUDY), memory=fresh)
        assert len([m for m in msgs if isinstance(m, Instance)]) == 4
        assert not any(isinstance(m, Pending) and m.estimate for m in msgs)
        assert plain.events.finds == 0
    assert fresh.classes()[0] == samples.CT_IMAGE_STORAGE
    assert EXPLICIT in fresh.syntaxes()


def _status(code: int, remaining: int | None) -> Dataset:
    status = Dataset()
    status.Status = code
    if remaining is not None:
        status.NumberOfRemainingSuboperations = remaining
        status.NumberOfCompletedSuboperations = 0
    return status


@pytest.mark.parametrize("counted", [True, False])
async def test_a_retrieve_without_counts_starts_the_survey_at_once(
    pacs: EmbeddedPacs, counted: bool
) -> None:
    """A PACS known to count whose retrieve then gives no count: the survey for the
    viewer's fallback starts at its first pending response, not at the end."""
    memory = StorageMemory()
    memory.note_counts("get", given=True)
    request = retrieve(StudyInstanceUID=STUDY)
    out: Channel[Message] = Channel(asyncio.get_running_loop(), 8)
    op = PacsOperation(target(pacs), request, MessageCodec(), out, memory=memory)
    identifier = rawds.decode_dataset(request.dataset, request.transfer_syntax)
    op._survey_for = (contexts.MODELS[("study", "find")], identifier)
    responses = iter([(_status(0xFF00, 4 if counted else None), None), (_status(0, 0), None)])
    final = await asyncio.to_thread(op._follow, contexts.MODELS[("study", "get")], responses)
    assert final.status == 0
    assert memory.counts_given("get") is counted
    if counted:
        assert op._beside is None and pacs.events.finds == 0
    else:
        assert op._beside is not None
        found = await asyncio.to_thread(op._beside.finish, wait=True)
        assert found is not None and found.count == 4 and pacs.events.finds > 0


async def test_a_multi_valued_survey_answer_spoils_no_retrieve(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A PACS that lists three Available Transfer Syntax UIDs per instance: the estimate
    names each, the retrieve completes, and so do the next ones (what the survey taught
    the memory builds their contexts and the spare's)."""
    find = matching.find

    def listing(records: list[matching.Record], identifier: Dataset) -> list[Dataset]:
        found = find(records, identifier)
        if str(identifier.get("QueryRetrieveLevel")) == "IMAGE":
            for match in found:
                match.AvailableTransferSyntaxUID = [EXPLICIT, JPEG, J2K]
        return found

    monkeypatch.setattr(matching, "find", listing)
    with EmbeddedPacs(MemoryStore(CT), send_delay=0.1) as pacs:
        agent = DicomAgent(target(pacs))
        await agent.start()
        try:
            for attempt in range(3):
                a, b = pipe()
                server = asyncio.create_task(agent.serve(b))
                ws = Workstation(a)
                await ws.send(retrieve(StudyInstanceUID=STUDY))
                msgs = await ws.all()
                summary = await asyncio.wait_for(server, 20)
                assert summary.status == 0, (attempt, summary.comment)
                got = [m.sop_instance for m in msgs if isinstance(m, Instance)]
                assert got == [i.sop_instance for i in CT]
                assert isinstance(msgs[-1], FinalResponse) and msgs[-1].completed == len(CT)
                if attempt == 0:
                    (estimate,) = [m for m in msgs if isinstance(m, Pending) and m.estimate]
                    assert set(estimate.transfer_syntaxes) == {EXPLICIT, JPEG, J2K}
                    assert pacs.events.finds > 0
            assert {JPEG, J2K} <= set(agent.memory.syntaxes())
        finally:
            await agent.stop()


async def test_an_estimate_the_stream_cannot_carry_is_left_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The estimate is only the viewer's fallback: one the codec would refuse is dropped,
    and the retrieve goes on (it used to end the stream and abort the PACS operation)."""

    def odd(*_: object, **__: object) -> Survey:
        return Survey(count=4, sop_classes=["1.2.x"], transfer_syntaxes=[EXPLICIT])

    monkeypatch.setattr(survey, "walk", odd)
    with EmbeddedPacs(MemoryStore(CT), send_delay=0.1) as pacs:
        msgs, summary = await run(target(pacs), retrieve(StudyInstanceUID=STUDY))
        assert pacs.events.finds == 0 and pacs.events.gets == 1
    assert summary.status == 0
    assert [m.sop_instance for m in msgs if isinstance(m, Instance)] == [i.sop_instance for i in CT]
    assert not any(isinstance(m, Pending) and m.estimate for m in msgs)


@pytest.mark.parametrize("after", [0.0, 0.5, 1.5])
async def test_a_survey_stopped_mid_walk_ends_on_its_own_thread_at_once(
    pacs: EmbeddedPacs, monkeypatch: pytest.MonkeyPatch, after: float
) -> None:
    """`finish` without waiting, before or during either C-FIND of the walk (series: 1 s,
    image: 4 s): the survey's own thread ends its association long before the walk would
    have ended, and nothing raises on any thread. An A-ABORT from the finishing thread
    used to race the walk's next C-FIND (pynetdicom raised Evt9 in Sta13)."""
    raised: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: raised.append(args.exc_value))
    pacs.find_delay = 1.0  # per match: 1 series, 4 instances
    out: Channel[Message] = Channel(asyncio.get_running_loop(), 8)
    op = PacsOperation(target(pacs), retrieve(StudyInstanceUID=STUDY), MessageCodec(), out)
    identifier = rawds.decode_dataset(op.request.dataset, op.request.transfer_syntax)
    beside = op._survey_beside(contexts.MODELS[("study", "find")], identifier)
    assert beside is not None
    await asyncio.sleep(after)
    assert beside.finish(wait=False) is None
    await asyncio.to_thread(beside._thread.join, 2.5)  # the rest of the walk: 3.5 s or more
    assert not beside._thread.is_alive()
    assert raised == []
    assert op.survey is None  # a stopped survey tells nothing


async def test_a_stopped_survey_sends_no_query_after_it(pacs: EmbeddedPacs) -> None:
    """The walk asks its gate before each C-FIND: once stopped, it sends no more."""
    out: Channel[Message] = Channel(asyncio.get_running_loop(), 8)
    op = PacsOperation(target(pacs), retrieve(StudyInstanceUID=STUDY), MessageCodec(), out)
    identifier = rawds.decode_dataset(op.request.dataset, op.request.transfer_syntax)
    model = contexts.MODELS[("study", "find")]
    gate = survey.QueryGate()
    assoc = await asyncio.to_thread(op._associate, [build_context(model)], main=False)
    assert not isinstance(assoc, FinalResponse)
    gate.stop(assoc, model)  # nothing in flight: nothing to cancel
    try:
        found = await asyncio.to_thread(
            survey.walk, assoc, model, identifier,
            timeout=10, stopped=threading.Event(), gate=gate,
        )  # fmt: skip
    finally:
        await asyncio.to_thread(assoc.release)
    assert found is None
    assert pacs.events.finds == 0 and pacs.events.cancels == 0


class _CancelRecorder:
    def __init__(self) -> None:
        self.cancelled: list[tuple[int, str | None]] = []

    def send_c_cancel(self, msg_id: int, query_model: str | None = None) -> None:
        self.cancelled.append((msg_id, query_model))


def test_the_gate_cancels_only_the_c_find_in_flight_and_then_lets_none_start() -> None:
    model = contexts.MODELS[("study", "find")]
    idle, busy = _CancelRecorder(), _CancelRecorder()
    gate = survey.QueryGate()
    assert gate.begin(7)
    gate.end()
    gate.stop(idle, model)  # type: ignore[arg-type]
    assert idle.cancelled == []  # nothing in flight: nothing to cancel
    assert not gate.begin(8)  # stopped: no C-FIND after it
    gate = survey.QueryGate()
    assert gate.begin(9)
    gate.stop(busy, model)  # type: ignore[arg-type]
    assert busy.cancelled == [(9, model)]
