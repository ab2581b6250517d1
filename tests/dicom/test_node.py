"""The workstation's DICOM node through the whole in-process chain, with a pynetdicom viewer.

(The same paths with real DCMTK tools are in test_chain_dcmtk.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from relay.codecs import CODECS
from relay.dicom import rawds
from relay.dicom import status as st
from relay.dicom.codec import VERSION, DicomLimits
from relay.dicom.node import DicomNode
from relay.dicom.pacs_target import PacsTarget
from relay.dicom.session import MAX_RESUME_WINDOW
from relay_dev import samples
from relay_dev.pacs import EmbeddedPacs, MemoryStore
from tests.ports import dead_port

from . import viewer
from .chain import Chain, until
from .helpers import EXPLICIT, capturing_scp, query, quirky_instance

CT = samples.make_study(6, rows=64, cols=64)
MR = samples.make_study(3, modality="MR", rows=32, cols=32)
QUIRKY = quirky_instance()
CT_STUDY = str(rawds.decode_dataset(CT[0].data, EXPLICIT).StudyInstanceUID)
MR_STUDY = str(rawds.decode_dataset(MR[0].data, EXPLICIT).StudyInstanceUID)
QUIRKY_STUDY = str(rawds.decode_dataset(QUIRKY.data, EXPLICIT).StudyInstanceUID)
CLASSES = [samples.CT_IMAGE_STORAGE, samples.MR_IMAGE_STORAGE]


@pytest.fixture
def pacs() -> Iterator[EmbeddedPacs]:
    with EmbeddedPacs(MemoryStore([*CT, *MR, QUIRKY])) as p:
        yield p


def pacs_target(p: EmbeddedPacs, timeout: float = 10) -> PacsTarget:
    return PacsTarget(ae_title=p.ae_title, host="127.0.0.1", port=p.port, timeout=timeout)


@pytest.fixture
async def chain(pacs: EmbeddedPacs) -> AsyncIterator[Chain]:
    c = Chain(pacs_target(pacs))
    await c.start()
    yield c
    await c.stop()


async def test_echo_goes_to_the_pacs(chain: Chain, pacs: EmbeddedPacs) -> None:
    status = await asyncio.to_thread(viewer.echo, chain.port)
    assert status.Status == 0
    assert pacs.events.echoes == 1
    # ... and the pixel codecs this workstation decodes (all of them: imagecodecs is there).
    assert chain.headers == [
        {"target": "dicom", "dicom-version": str(VERSION), "dicom-pixels": ",".join(CODECS)}
    ]


async def test_find_equals_a_direct_query(chain: Chain, pacs: EmbeddedPacs) -> None:
    ident = query("STUDY", StudyInstanceUID="", PatientName="", StudyDate="", ModalitiesInStudy="")
    relayed, final = await asyncio.to_thread(viewer.find, chain.port, ident)
    direct, _ = await asyncio.to_thread(viewer.find, pacs.port, ident)
    assert final.Status == 0
    assert sorted(map(str, relayed)) == sorted(map(str, direct))
    assert len(relayed) == 3


async def test_get_delivers_the_pacs_bytes_with_counts_as_they_change(chain: Chain) -> None:
    result = await asyncio.to_thread(
        viewer.get, chain.port, query("STUDY", StudyInstanceUID=CT_STUDY), classes=CLASSES
    )
    assert result.received == {i.sop_instance: (EXPLICIT, i.data) for i in CT}
    assert result.final.Status == 0
    assert (
        result.final.NumberOfCompletedSuboperations,
        result.final.NumberOfFailedSuboperations,
    ) == (6, 0)
    assert [int(s.NumberOfRemainingSuboperations) for s in result.pending] == [5, 4, 3, 2, 1, 0]
    assert [int(s.NumberOfCompletedSuboperations) for s in result.pending] == [1, 2, 3, 4, 5, 6]
    await chain.settle()
    assert chain.node_stats.instances == 6 and chain.agent_stats.instances == 6
    assert chain.node_stats.operations[("get", "success")] == 1


async def test_get_keeps_bytes_that_pydicom_would_rewrite(chain: Chain) -> None:
    result = await asyncio.to_thread(
        viewer.get, chain.port, query("STUDY", StudyInstanceUID=QUIRKY_STUDY), classes=CLASSES
    )
    assert result.received == {QUIRKY.sop_instance: (EXPLICIT, QUIRKY.data)}


async def test_move_is_delivered_to_the_configured_destination(pacs: EmbeddedPacs) -> None:
    with capturing_scp("VIEWERSCP") as (captured, port):
        c = Chain(pacs_target(pacs), destinations={"VIEWERSCP": ("127.0.0.1", port)})
        await c.start()
        try:
            statuses = await asyncio.to_thread(
                viewer.move, c.port, query("STUDY", StudyInstanceUID=MR_STUDY), "VIEWERSCP"
            )
        finally:
            await c.stop()
    assert statuses[-1].Status == 0 and statuses[-1].NumberOfCompletedSuboperations == 3
    assert captured.by_uid() == {i.sop_instance: (EXPLICIT, i.data) for i in MR}
    assert pacs.events.moves == 0  # the agent retrieved with C-GET; the PACS never dialled us


async def test_move_to_an_unknown_destination_is_a801(chain: Chain, pacs: EmbeddedPacs) -> None:
    statuses = await asyncio.to_thread(
        viewer.move, chain.port, query("STUDY", StudyInstanceUID=MR_STUDY), "NOSUCHAE"
    )
    assert statuses[-1].Status == st.MOVE_DESTINATION_UNKNOWN
    assert chain.headers == []  # nothing was asked of the agent
    assert pacs.events.gets == 0


@contextlib.contextmanager
def not_listening() -> Iterator[int]:
    """A loopback port that is bound but not listening: connections to it are refused,
    and no other process can take it while the test runs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


async def test_move_to_a_known_destination_that_is_down_is_refused_first(
    pacs: EmbeddedPacs,
) -> None:
    with not_listening() as port:
        c = Chain(pacs_target(pacs), destinations={"DOWNSCP": ("127.0.0.1", port)})
        await c.start()
        try:
            statuses = await asyncio.to_thread(
                viewer.move, c.port, query("STUDY", StudyInstanceUID=MR_STUDY), "DOWNSCP"
            )
        finally:
            await c.stop()
    [final] = statuses
    assert final.Status == st.MOVE_DESTINATION_UNREACHABLE
    assert final.ErrorComment == f"move destination DOWNSCP at 127.0.0.1:{port} not reachable"
    assert c.headers == []  # the agent was never asked to retrieve
    assert pacs.events.gets == 0 and pacs.events.finds == 0
    assert c.node_stats.operations == {("move", "failure"): 1}
    assert c.node_stats.statuses == {("move", st.MOVE_DESTINATION_UNREACHABLE): 1}


async def test_a_destination_that_refuses_the_transfer_counts_as_a_failure(
    pacs: EmbeddedPacs,
) -> None:
    """A destination that answers the check (it accepts Verification only) but refuses
    the storage association: pynetdicom answers 0xA801 itself, and the node's metrics
    count a failed move, not a success."""
    ae = AE(ae_title="ECHOONLY")
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", 0), block=False)
    assert server is not None
    try:
        port = int(server.server_address[1])
        c = Chain(pacs_target(pacs), destinations={"ECHOONLY": ("127.0.0.1", port)})
        await c.start()
        try:
            statuses = await asyncio.to_thread(
                viewer.move, c.port, query("STUDY", StudyInstanceUID=MR_STUDY), "ECHOONLY"
            )
            await c.settle()
        finally:
            await c.stop()
    finally:
        server.shutdown()
        server.server_close()
    assert statuses[-1].Status == st.MOVE_DESTINATION_UNKNOWN  # pynetdicom's own answer
    assert c.node_stats.operations == {("move", "failure"): 1}


async def test_upload_reaches_the_pacs(chain: Chain, pacs: EmbeddedPacs) -> None:
    new = samples.make_study(1, rows=32, cols=32, seed=31)[0]
    status = await asyncio.to_thread(
        viewer.store, chain.port, new.sop_class, new.sop_instance, new.data
    )
    assert status.Status == 0
    assert pacs.instance_bytes(new.sop_instance) == new.data


async def test_malformed_upload_is_refused_at_the_workstation(
    chain: Chain, pacs: EmbeddedPacs
) -> None:
    new = samples.make_study(1, rows=32, cols=32, seed=32)[0]
    status = await asyncio.to_thread(
        viewer.store, chain.port, new.sop_class, new.sop_instance, new.data[:-20]
    )
    assert status.Status == st.STORE_CANNOT_UNDERSTAND
    assert "malformed" in str(status.get("ErrorComment", ""))
    assert chain.headers == [] and not pacs.has(new.sop_instance)


async def test_unknown_study_gets_no_instances_and_no_failure(chain: Chain) -> None:
    result = await asyncio.to_thread(
        viewer.get, chain.port, query("STUDY", StudyInstanceUID="1.2.3.4.5.6.7"), classes=CLASSES
    )
    assert result.received == {}
    assert result.final.Status == 0
    assert int(result.final.get("NumberOfCompletedSuboperations", 0)) == 0


async def test_pacs_down_gives_failure_statuses_quickly() -> None:
    with dead_port() as port:  # held: nothing can listen there during the test
        await _pacs_down_gives_failure_statuses_quickly(port)


async def _pacs_down_gives_failure_statuses_quickly(port: int) -> None:
    c = Chain(PacsTarget(ae_title="GONE", host="127.0.0.1", port=port, timeout=3))
    await c.start()
    try:
        echo = await asyncio.wait_for(asyncio.to_thread(viewer.echo, c.port), 20)
        _, find_final = await asyncio.wait_for(
            asyncio.to_thread(viewer.find, c.port, query("STUDY", StudyInstanceUID="")), 20
        )
        got = await asyncio.wait_for(
            asyncio.to_thread(
                viewer.get, c.port, query("STUDY", StudyInstanceUID=CT_STUDY), classes=CLASSES
            ),
            20,
        )
    finally:
        await c.stop()
    assert echo.Status == st.PROCESSING_FAILURE
    assert find_final.Status == st.PACS_UNREACHABLE
    assert got.final.Status == st.PACS_UNREACHABLE and got.received == {}
    assert "unreachable" in str(got.final.get("ErrorComment", ""))


async def test_tunnel_down_gives_failure_statuses(pacs: EmbeddedPacs) -> None:
    c = Chain(pacs_target(pacs), link_up=False)
    await c.start()
    try:
        echo = await asyncio.to_thread(viewer.echo, c.port)
        _, find_final = await asyncio.to_thread(
            viewer.find, c.port, query("STUDY", StudyInstanceUID="")
        )
        got = await asyncio.to_thread(
            viewer.get, c.port, query("STUDY", StudyInstanceUID=CT_STUDY), classes=CLASSES
        )
        new = CT[0]
        stored = await asyncio.to_thread(
            viewer.store, c.port, new.sop_class, new.sop_instance, new.data
        )
    finally:
        await c.stop()
    assert echo.Status == st.PROCESSING_FAILURE
    assert find_final.Status == st.LINK_LOST
    assert got.final.Status == st.LINK_LOST
    assert stored.Status == st.STORE_OUT_OF_RESOURCES


async def test_tunnel_dropped_mid_retrieval_never_reports_success() -> None:
    """Without resuming (test_resume.py has the resumed case)."""
    study = samples.make_study(20, rows=128, cols=128, seed=33)
    uid = str(rawds.decode_dataset(study[0].data, EXPLICIT).StudyInstanceUID)
    with EmbeddedPacs(MemoryStore(study)) as p:
        c = Chain(pacs_target(p), drop_after=len(study[0].data) * 4, resume_window=0)
        await c.start()
        try:
            result = await asyncio.wait_for(
                asyncio.to_thread(
                    viewer.get, c.port, query("STUDY", StudyInstanceUID=uid), classes=CLASSES
                ),
                30,
            )
            await c.settle()
        finally:
            await c.stop()
    final = result.final
    assert final.Status == st.LINK_LOST
    completed = int(final.NumberOfCompletedSuboperations)
    failed = int(final.NumberOfFailedSuboperations)
    assert 0 < len(result.received) == completed < 20
    assert completed + failed == 20
    # what did arrive is intact
    by_uid = {i.sop_instance: i.data for i in study}
    assert all(data == by_uid[uid] for uid, (_, data) in result.received.items())
    assert c.summaries and c.summaries[0].status == st.LINK_LOST


async def test_viewer_cancel_cancels_at_the_pacs() -> None:
    study = samples.make_study(40, rows=32, cols=32, seed=34)
    uid = str(rawds.decode_dataset(study[0].data, EXPLICIT).StudyInstanceUID)
    with EmbeddedPacs(MemoryStore(study), send_delay=0.03) as p:
        c = Chain(pacs_target(p))
        await c.start()
        try:
            model = __import__("relay.dicom.contexts", fromlist=["MODELS"]).MODELS[("study", "get")]

            def cancel_after_two(assoc: Any, n: int, status: Dataset) -> None:
                if n == 1:
                    assoc.send_c_cancel(9, query_model=model)

            result = await asyncio.to_thread(
                viewer.get,
                c.port,
                query("STUDY", StudyInstanceUID=uid),
                classes=CLASSES,
                on_pending=cancel_after_two,
                msg_id=9,
            )
            await c.settle()
        finally:
            await c.stop()
        assert p.events.cancels == 1
        assert p.events.instances_sent < 40
    assert result.final.Status == st.CANCEL
    assert len(result.received) < 40
    assert c.summaries[0].cancelled


async def test_viewer_cancel_of_a_find() -> None:
    many = [
        samples.make_study(
            1, rows=8, cols=8, seed=100 + i, spec=samples.StudySpec(patient_id=f"P{i:03d}")
        )[0]
        for i in range(30)
    ]
    with EmbeddedPacs(MemoryStore(many)) as p:
        c = Chain(pacs_target(p))
        await c.start()
        try:
            from pynetdicom import build_context

            from relay.dicom.contexts import MODELS

            from .helpers import scu

            model = MODELS[("study", "find")]

            def run() -> list[int]:
                assoc = scu("VIEWER").associate(
                    "127.0.0.1", c.port, contexts=[build_context(model)]
                )
                codes = []
                for n, (status, _m) in enumerate(
                    assoc.send_c_find(
                        query("STUDY", StudyInstanceUID="", PatientID=""), model, msg_id=5
                    )
                ):
                    codes.append(int(status.Status))
                    if n == 0:
                        assoc.send_c_cancel(5, query_model=model)
                assoc.release()
                return codes

            codes = await asyncio.to_thread(run)
        finally:
            await c.stop()
    # The PACS may have answered everything before the cancel arrived; if it did not, the
    # operation ends as cancelled. Either way it ends, and never with a failure.
    assert codes[-1] in (st.CANCEL, st.SUCCESS)
    assert codes.count(st.PENDING) <= 30


async def test_syntax_the_viewer_did_not_accept_fails_that_sub_operation_only() -> None:
    jpeg = "1.2.840.10008.1.2.4.50"
    base = samples.make_study(2, rows=16, cols=16, seed=35)
    fake = samples.EncodedInstance(base[1].sop_class, base[1].sop_instance, jpeg, base[1].data)
    uid = str(rawds.decode_dataset(base[0].data, EXPLICIT).StudyInstanceUID)
    with EmbeddedPacs(MemoryStore([base[0], fake])) as p:
        c = Chain(pacs_target(p))
        await c.start()
        try:
            result = await asyncio.to_thread(
                viewer.get, c.port, query("STUDY", StudyInstanceUID=uid), classes=CLASSES
            )
        finally:
            await c.stop()
    assert set(result.received) == {base[0].sop_instance}
    assert result.final.Status == st.WARNING_SUBOPS
    assert int(result.final.NumberOfFailedSuboperations) == 1


async def test_association_limit(pacs: EmbeddedPacs) -> None:
    study = samples.make_study(10, rows=16, cols=16, seed=36)
    uid = str(rawds.decode_dataset(study[0].data, EXPLICIT).StudyInstanceUID)
    with EmbeddedPacs(MemoryStore(study), send_delay=0.1) as slow:

        async def open_never(headers: Any) -> Any:
            raise ConnectionError

        c = Chain(pacs_target(slow))
        node = DicomNode(c.open_stream, listen=("127.0.0.1", 0), max_associations=1, timeout=20)
        await node.start()
        try:
            busy = asyncio.create_task(
                asyncio.to_thread(
                    viewer.get,
                    node.address[1],
                    query("STUDY", StudyInstanceUID=uid),
                    classes=CLASSES,
                )
            )
            await until(lambda: slow.events.instances_sent > 0)

            def second() -> bool:
                from pynetdicom import build_context
                from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

                from .helpers import scu

                assoc = scu().associate(
                    "127.0.0.1", node.address[1], contexts=[build_context(Verification)]
                )
                ok = bool(assoc.is_established)
                if ok:
                    assoc.release()
                return ok

            assert not await asyncio.to_thread(second)
            result = await busy
            assert result.final.Status == 0
        finally:
            await node.stop()
            await c.stop()


async def test_stopping_the_node_mid_retrieval_does_not_hang() -> None:
    study = samples.make_study(30, rows=16, cols=16, seed=37)
    uid = str(rawds.decode_dataset(study[0].data, EXPLICIT).StudyInstanceUID)
    with EmbeddedPacs(MemoryStore(study), send_delay=0.05) as slow:
        c = Chain(pacs_target(slow))
        await c.start()
        # No exception is swallowed here: a crash of the viewer or of the node fails the test.
        task = asyncio.create_task(
            asyncio.to_thread(
                viewer.get, c.port, query("STUDY", StudyInstanceUID=uid), classes=CLASSES
            )
        )
        await until(lambda: slow.events.instances_sent >= 2)
        await asyncio.wait_for(c.stop(), 30)
        result = await asyncio.wait_for(task, 30)
    # The viewer was told the operation ended: aborted (a response without a status) or
    # failed, and it is never a complete success.
    assert result.statuses, "the viewer got no answer at all"
    assert "Status" not in result.final or result.final.Status != 0
    assert len(result.received) < len(study)


@contextlib.asynccontextmanager
async def _slow_retrieval(
    count: int,
    seed: int,
    send_delay: float,
    on_pending: Callable[[Any, int, Dataset], None] | None = None,
) -> AsyncIterator[tuple[EmbeddedPacs, Chain, DicomNode, asyncio.Task[viewer.GetResult]]]:
    """A viewer's C-GET of a study of `count` instances from a PACS sending one every
    `send_delay` s, two of them sent already: what a drain finds under way. `on_pending`
    is the viewer's (`viewer.get`)."""
    study = samples.make_study(count, rows=16, cols=16, seed=seed)
    uid = str(rawds.decode_dataset(study[0].data, EXPLICIT).StudyInstanceUID)
    with EmbeddedPacs(MemoryStore(study), send_delay=send_delay) as slow:
        c = Chain(pacs_target(slow))
        node = await c.start()
        try:
            task = asyncio.create_task(
                asyncio.to_thread(
                    viewer.get,
                    c.port,
                    query("STUDY", StudyInstanceUID=uid),
                    classes=CLASSES,
                    on_pending=on_pending,
                )
            )
            await until(lambda: slow.events.instances_sent >= 2)
            yield slow, c, node, task
        finally:
            await c.stop()


async def test_a_drain_refuses_new_associations_and_lets_a_retrieval_finish() -> None:
    async with _slow_retrieval(16, seed=38, send_delay=0.05) as (slow, c, node, task):
        drained = asyncio.create_task(node.drain(30.0))
        await until(lambda: not viewer.associates(c.port))  # the listener is closed at once
        result = await asyncio.wait_for(task, 30)
        await asyncio.wait_for(drained, 5)  # and the drain ends with the retrieval
    assert result.final.Status == 0 and len(result.received) == 16
    assert slow.events.instances_sent < 16 + 2  # not started again


async def test_a_drain_aborts_what_is_left_when_the_grace_runs_out() -> None:
    """What is left is answered with a failure, and its viewer, which releases its
    association on that answer, learns at once. (The node used to abort the association
    together with that answer: the abort collided with the viewer's A-RELEASE-RQ, and
    pynetdicom's SCU then waited its whole ACSE timeout, 20 s here, in about one run in
    twelve.)"""
    viewer_assoc: list[Any] = []

    def keep(assoc: Any, n: int, status: Dataset) -> None:
        viewer_assoc[:] = [assoc]

    async with _slow_retrieval(30, seed=39, send_delay=0.1, on_pending=keep) as (_, _, node, task):
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(node.drain(0.5), 10)
        assert loop.time() - started < 3
        result = await asyncio.wait_for(task, 30)
        took = loop.time() - started
    # Well under a second but for a loaded machine; the ACSE timeouts are far longer.
    assert took < 0.5 + 5, f"the viewer was done {took:.1f} s after the drain began"
    assert result.final.Status == st.LINK_LOST  # never a success, and never just cut
    assert result.final.ErrorComment == "the workstation is stopping"
    assert len(result.received) < 30
    assert viewer_assoc[0].is_released and not viewer_assoc[0].is_aborted


async def test_a_drain_lets_a_viewer_answered_during_it_release() -> None:
    """A viewer answered during the drain is given a moment to release its association
    (it may first store what it got) instead of an A-ABORT that could collide with its
    A-RELEASE-RQ; the drain then ends at once."""
    viewer_assoc: list[Any] = []
    released_at: list[float] = []

    def slow_to_release(assoc: Any, n: int, status: Dataset) -> None:
        viewer_assoc[:] = [assoc]
        if status.Status not in (0xFF00, 0xFF01):
            time.sleep(0.3)
            released_at.append(time.monotonic())

    async with _slow_retrieval(8, seed=40, send_delay=0.05, on_pending=slow_to_release) as (
        _,
        _,
        node,
        task,
    ):
        drained = asyncio.create_task(node.drain(30.0))
        result = await asyncio.wait_for(task, 30)
        await asyncio.wait_for(drained, 5)
        drain_end = time.monotonic()
    assert result.final.Status == 0 and len(result.received) == 8
    assert viewer_assoc[0].is_released and not viewer_assoc[0].is_aborted
    assert drain_end - released_at[0] < 1.0  # the drain ended with the release


async def test_a_drain_does_not_wait_for_an_idle_association(chain: Chain) -> None:
    """A viewer that keeps its association open between requests does not hold the drain:
    nothing of it is unanswered, so the drain ends at once and the association is cut."""
    node = chain.node
    assert node is not None
    assoc = AE(ae_title="VIEWER").associate(
        "127.0.0.1", chain.port, contexts=[build_context(Verification)], ae_title="RELAY"
    )
    assert assoc.is_established
    assert (await asyncio.to_thread(assoc.send_c_echo)).Status == 0
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(node.drain(30.0), 5)
    assert asyncio.get_running_loop().time() - started < 2
    await until(lambda: not assoc.is_established)


async def test_node_settings_are_checked() -> None:
    async def never(headers: Any) -> Any:
        raise AssertionError

    with pytest.raises(ValueError, match="ae_title"):
        DicomNode(never, ae_title="")
    with pytest.raises(ValueError, match="destinations"):
        DicomNode(never, destinations={"X": "nohostport"})
    with pytest.raises(ValueError, match="max_associations"):
        DicomNode(never, max_associations=0)
    for window in (-1.0, MAX_RESUME_WINDOW + 1):
        with pytest.raises(ValueError, match="resume_window"):
            DicomNode(never, resume_window=window)


async def test_queue_depth_limit_is_used(pacs: EmbeddedPacs) -> None:
    c = Chain(pacs_target(pacs), limits=DicomLimits(queue_depth=1))
    await c.start()
    try:
        result = await asyncio.to_thread(
            viewer.get, c.port, query("STUDY", StudyInstanceUID=CT_STUDY), classes=CLASSES
        )
    finally:
        await c.stop()
    assert len(result.received) == 6 and result.final.Status == 0
