"""The spare association (relay.dicom.spare): opened after a request, taken by the next,
never more than one, released when idle or unsuited, replaced when the PACS had ended it."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pydicom.uid import UID
from pynetdicom import _config, build_context
from pynetdicom.association import Association

from relay.dicom import contexts, pacs_ops
from relay.dicom.agent import DicomAgent
from relay.dicom.codec import FinalResponse, Instance, Pending, Request
from relay.dicom.pacs_ops import spare_contexts
from relay.dicom.pacs_target import PacsTarget
from relay.dicom.spare import OUTCOMES, SpareAssociation
from relay.dicom.survey import StorageMemory
from relay.net.bytestream import pipe
from relay_dev.pacs import EmbeddedPacs, MemoryStore

from .helpers import EXPLICIT
from .test_agent import CT, CT_STUDY, MR, Workstation, ident, retrieve, run, target


@pytest.fixture
def pacs() -> Iterator[EmbeddedPacs]:
    with EmbeddedPacs(MemoryStore(CT + MR)) as p:
        yield p


def find() -> Request:
    return Request(
        op="find",
        root="study",
        transfer_syntax=EXPLICIT,
        dataset=ident("STUDY", StudyInstanceUID="", PatientName=""),
    )


async def until(predicate: Callable[[], bool], within: float = 10.0) -> None:
    """Poll (bounded): the spare opens and expires on threads of its own."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 - polling is the point here
            await asyncio.sleep(0.01)


async def through_agent(agent: DicomAgent, request: Request) -> list[object]:
    a, b = pipe()
    server = asyncio.create_task(agent.serve(b))
    ws = Workstation(a)
    await ws.send(request)
    msgs = await ws.all()
    await asyncio.wait_for(server, 20)
    return list(msgs)


async def test_the_next_request_skips_associating(pacs: EmbeddedPacs) -> None:
    """Through the agent: a find leaves a spare, the next find and then a C-GET take
    theirs, each leaving the next; the PACS associates once per request, not twice."""
    agent = DicomAgent(target(pacs))
    await agent.start()
    try:
        msgs = await through_agent(agent, find())
        assert isinstance(msgs[-1], FinalResponse) and msgs[-1].status == 0
        await until(lambda: agent.spare.counts()["opened"] == 1)
        assert pacs.events.associations == 2  # the find's and the spare

        msgs = await through_agent(agent, find())
        assert len([m for m in msgs if isinstance(m, Pending)]) == 2
        await until(lambda: agent.spare.counts()["opened"] == 2)
        assert agent.spare.counts()["used"] == 1
        assert pacs.events.associations == 3  # the find took the spare: one more, its own

        msgs = await through_agent(agent, retrieve(StudyInstanceUID=CT_STUDY))
        assert [m.sop_instance for m in msgs if isinstance(m, Instance)] == [
            i.sop_instance for i in CT
        ]  # the C-STORE handler is bound on the spare it took
        assert isinstance(msgs[-1], FinalResponse) and msgs[-1].completed == len(CT)
        assert agent.spare.counts()["used"] == 2
        await until(lambda: agent.spare.counts()["opened"] == 3)
        assert pacs.held() == 1  # only the spare stays
    finally:
        await agent.stop()
    await until(lambda: pacs.held() == 0)  # stop() released it


async def test_an_idle_spare_is_released(pacs: EmbeddedPacs) -> None:
    spare = SpareAssociation(0.2)
    await run(target(pacs), find(), spare=spare)
    await until(lambda: spare.counts()["expired"] == 1)
    await until(lambda: pacs.held() == 0)
    before = pacs.events.associations
    await run(target(pacs), find(), spare=spare)
    assert spare.counts()["used"] == 0
    assert pacs.events.associations > before  # associated afresh


async def test_never_more_than_one_spare(pacs: EmbeddedPacs) -> None:
    spare = SpareAssociation(5)
    pacs_target = target(pacs)
    for _ in range(3):
        spare.refill(pacs_target, *spare_contexts(pacs_target, None))
    await until(lambda: spare.counts()["opened"] == 1)
    await asyncio.sleep(0.2)  # a second opener would have associated by now
    assert pacs.events.associations == 1 and pacs.held() == 1
    assert not spare.vacant()  # held: a request's end builds no contexts for another
    spare.close()
    spare.refill(pacs_target, *spare_contexts(pacs_target, None))  # closed: opens no more
    await until(lambda: pacs.held() == 0)
    assert spare.counts()["opened"] == 1


async def test_a_spare_without_the_needed_context_is_released(pacs: EmbeddedPacs) -> None:
    """A spare that only carries C-FIND cannot take a C-GET: the retrieve associates with
    its own contexts and still brings every instance."""
    pacs_target = target(pacs)
    spare = SpareAssociation(5)
    find_model = contexts.MODELS[("study", "find")]
    spare.refill(pacs_target, [build_context(find_model)])
    await until(lambda: spare.counts()["opened"] == 1)
    msgs, _ = await run(pacs_target, retrieve(StudyInstanceUID=CT_STUDY), spare=spare)
    assert len([m for m in msgs if isinstance(m, Instance)]) == len(CT)
    assert spare.counts()["unsuited"] == 1 and spare.counts()["used"] == 0


@pytest.mark.parametrize("noticed", [True, False], ids=["noticed", "in-flight"])
async def test_a_spare_the_pacs_ended_is_replaced(pacs: EmbeddedPacs, noticed: bool) -> None:
    """The PACS ends the spare as the request takes it (its idle timeout, a restart):
    whether the agent notices before its request goes ("noticed") or after (the A-ABORT
    still on its way, "in-flight": no answer), the request goes on a new association and
    succeeds, with nothing counted twice."""

    class EndedAtThePacs(SpareAssociation):
        def take(self, wanted: str) -> Association | None:
            assoc = super().take(wanted)
            if assoc is not None:
                pacs.abort_all(wait=False)
                deadline = time.monotonic() + 5
                while noticed and assoc.is_established and time.monotonic() < deadline:
                    time.sleep(0.005)
            return assoc

    pacs_target = target(pacs)
    requests = ((find(), None), (retrieve(StudyInstanceUID=CT_STUDY), StorageMemory()))
    for request, memory in requests:
        spare = EndedAtThePacs(5)
        spare.refill(pacs_target, *spare_contexts(pacs_target, memory))
        await until(lambda spare=spare: spare.counts()["opened"] == 1)  # type: ignore[misc]
        msgs, _ = await run(pacs_target, request, spare=spare)
        final = msgs[-1]
        assert isinstance(final, FinalResponse) and final.status == 0, final
        assert spare.counts()["used"] == 1
        if request.op == "retrieve":
            assert len([m for m in msgs if isinstance(m, Instance)]) == len(CT)
            assert final.completed == len(CT) and final.failed == 0
        else:
            assert len([m for m in msgs if isinstance(m, Pending)]) == 2
        spare.close()


async def test_a_spare_already_closed_counts_as_stale(pacs: EmbeddedPacs) -> None:
    spare = SpareAssociation(5)
    pacs_target = target(pacs)
    spare.refill(pacs_target, *spare_contexts(pacs_target, None))
    await until(lambda: pacs.held() == 1 and spare.counts()["opened"] == 1)
    pacs.abort_all()
    await until(lambda: pacs.held() == 0)
    await asyncio.sleep(0.1)  # our end sees the A-ABORT
    msgs, _ = await run(pacs_target, find(), spare=spare)
    assert isinstance(msgs[-1], FinalResponse) and msgs[-1].status == 0
    assert spare.counts()["stale"] == 1 and spare.counts()["used"] == 0


async def test_zero_seconds_means_no_spare(pacs: EmbeddedPacs) -> None:
    agent = DicomAgent(target(pacs, spare_association=0))
    await agent.start()
    try:
        await through_agent(agent, find())
        await asyncio.sleep(0.2)  # a spare would have been opened by now
        assert pacs.events.associations == 1 and pacs.held() == 0
        assert not agent.spare.enabled and not agent.spare.vacant()
        assert agent.spare.counts()["opened"] == 0
    finally:
        await agent.stop()


@pytest.mark.parametrize("seconds", [5.0, 0.0])
async def test_a_c_get_on_a_spare_builds_no_storage_contexts(
    pacs: EmbeddedPacs, monkeypatch: pytest.MonkeyPatch, seconds: float
) -> None:
    """The spare carries its own storage contexts: a C-GET that takes it must not build
    another ~60 before its request goes (a millisecond before the first instance). Without
    a spare the C-GET builds them to associate."""
    built_by: list[str] = []
    remembered = pacs_ops.remembered_storage

    def counting(memory: StorageMemory | None, used: int) -> list[Any]:
        built_by.append(sys._getframe(1).f_code.co_name)  # who asked for them
        return remembered(memory, used)

    monkeypatch.setattr(pacs_ops, "remembered_storage", counting)
    spare = SpareAssociation(seconds)
    try:
        await run(target(pacs), find(), spare=spare)
        if seconds:
            await until(lambda: spare.counts()["opened"] == 1)
        built_by.clear()
        msgs, _ = await run(target(pacs), retrieve(StudyInstanceUID=CT_STUDY), spare=spare)
    finally:
        spare.close()
    assert isinstance(msgs[-1], FinalResponse) and msgs[-1].completed == len(CT)
    assert spare.counts()["used"] == (1 if seconds else 0)
    for_the_get = [caller for caller in built_by if caller != "spare_contexts"]  # not refills
    assert bool(for_the_get) == (not seconds), built_by


async def test_no_spare_after_the_pacs_was_unreachable() -> None:
    with EmbeddedPacs() as gone:
        pacs_target = PacsTarget(gone.ae_title, "127.0.0.1", gone.port, timeout=5)
    spare = SpareAssociation(5)
    msgs, _ = await run(pacs_target, find(), spare=spare)
    assert isinstance(msgs[-1], FinalResponse) and msgs[-1].status != 0
    await asyncio.sleep(0.1)
    assert spare.counts() == dict.fromkeys(OUTCOMES, 0)


async def test_a_spare_that_cannot_be_opened_is_counted_not_raised() -> None:
    with EmbeddedPacs() as gone:
        pacs_target = PacsTarget(gone.ae_title, "127.0.0.1", gone.port, timeout=5)
    spare = SpareAssociation(5)
    spare.refill(pacs_target, *spare_contexts(pacs_target, None))
    await until(lambda: spare.counts()["failed"] == 1)
    assert spare.take(contexts.MODELS[("study", "find")]) is None


def test_uids_are_checked_once_and_still_checked() -> None:
    contexts.prepare_pynetdicom()
    check = _config.VALIDATORS["UI"]
    contexts.prepare_pynetdicom()
    assert _config.VALIDATORS["UI"] is check  # not wrapped twice
    assert check.cache_info().maxsize == contexts.MAX_REMEMBERED_UIDS  # type: ignore[attr-defined]
    assert check(UID("1.2.840.10008.1.2"))[0]
    assert not check(UID("1.2.x" + "1" * 70))[0]
    # pydicom's own UID.is_valid, which pynetdicom asks again: remembered, same answers.
    is_valid = UID.__dict__["is_valid"].fget
    assert is_valid.cache_info().maxsize == contexts.MAX_REMEMBERED_UIDS
    hits = is_valid.cache_info().hits
    assert UID("1.2.840.10008.1.2.1").is_valid and UID("1.2.840.10008.1.2.1").is_valid
    assert is_valid.cache_info().hits > hits
    assert not UID("1.2.x").is_valid
    assert not UID("1." + "2" * 63).is_valid  # 65 characters
    assert not UID("1.02.3").is_valid  # a component with a leading zero
