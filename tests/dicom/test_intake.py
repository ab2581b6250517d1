"""The agent's C-MOVE storage SCP takes C-STOREs from the PACS only, into the C-MOVE that
asked for them, bounded while they arrive (relay.dicom.intake)."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import struct
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Iterator
from typing import Any, cast

import pytest
from pynetdicom import AE, build_context
from pynetdicom.pdu_primitives import MaximumLengthNotification

from relay.agent.config import MAX_PACS_OPERATIONS
from relay.dicom import contexts, rawds
from relay.dicom import status as st
from relay.dicom.agent import serve_dicom_stream
from relay.dicom.bridge import Channel
from relay.dicom.codec import MAX_COUNT, FinalResponse, Instance, Message, MessageCodec, Request
from relay.dicom.intake import (
    MAX_MOVES,
    PDU_SLACK,
    STORE_NOT_REQUESTED,
    Intake,
    MoveReceiver,
    MoveRoutesFull,
    MoveSenders,
)
from relay.dicom.pacs_target import PacsTarget
from relay.dicom.stats import NullStats
from relay.dicom.uidset import UidSet
from relay.net.bytestream import pipe
from relay.ops.loglimit import LOG_BURST
from relay_dev import samples
from relay_dev.pacs import EmbeddedPacs, MemoryStore

from .helpers import EXPLICIT, query
from .test_agent import Workstation, ident

CT = samples.make_study(5, rows=64, cols=64)
CT_STUDY = str(rawds.decode_dataset(CT[0].data, EXPLICIT).StudyInstanceUID)
OTHER = samples.make_study(1, modality="MR", rows=32, cols=32, seed=99)[0]  # another patient
PACS_AE = "RELAYPACS"
MOVE_AE = "RELAYMOVE"


@pytest.fixture
def pacs() -> Iterator[EmbeddedPacs]:
    with EmbeddedPacs(MemoryStore(CT), ae_title=PACS_AE, send_delay=0.3) as p:
        yield p


def move_target(pacs: EmbeddedPacs) -> PacsTarget:
    return PacsTarget(
        ae_title=pacs.ae_title, host="127.0.0.1", port=pacs.port, timeout=10,
        retrieve="move", move_ae_title=MOVE_AE, survey=False,
    )  # fmt: skip


def store(
    port: int,
    inst: samples.EncodedInstance,
    *,
    calling: str = PACS_AE,
    called: str = MOVE_AE,
    originator: tuple[str, int] | None = None,
    source: str = "127.0.0.1",
) -> int | None:
    """One C-STORE to the receiver; its status, None if no association, -1 if cut."""
    assoc = AE(ae_title=calling).associate(
        "127.0.0.1",
        port,
        contexts=[build_context(inst.sop_class, [EXPLICIT])],
        ae_title=called,
        bind_address=(source, 0),
    )
    if not assoc.is_established:
        return None
    ds = rawds.EncodedDataset(inst.sop_class, inst.sop_instance, EXPLICIT, inst.data)
    kw: dict[str, Any] = {}
    if originator is not None:
        kw = {"originator_aet": originator[0], "originator_id": originator[1]}
    status = assoc.send_c_store(ds, **kw)
    assoc.release()
    return int(status.Status) if "Status" in status else -1


async def move_with_injection(
    pacs: EmbeddedPacs, receiver: MoveReceiver, inject: Any
) -> tuple[list[Message], Any]:
    """A C-MOVE of CT through `receiver`; `inject(msg_id)` runs (on a thread) while it is
    running, with the Move Originator Message ID of that C-MOVE."""
    tgt = move_target(pacs)
    receiver.start()
    try:
        pacs.destinations[MOVE_AE] = ("127.0.0.1", receiver.port)
        a, b = pipe()
        server = asyncio.create_task(serve_dicom_stream(b, tgt, move_receiver=receiver))
        ws = Workstation(a)
        await ws.send(
            Request(op="retrieve", root="study", transfer_syntax=EXPLICIT,
                    dataset=ident("STUDY", StudyInstanceUID=CT_STUDY))
        )  # fmt: skip
        for _ in range(250):  # the C-MOVE is registered
            if receiver._routes:
                break
            await asyncio.sleep(0.02)
        (msg_id,) = receiver._routes
        injected = await asyncio.to_thread(inject, msg_id)
        msgs = await ws.all()
        await server
    finally:
        receiver.stop()
    return msgs, injected


def delivered(msgs: list[Message]) -> list[str]:
    return [m.sop_instance for m in msgs if isinstance(m, Instance)]


def assert_only_the_study(msgs: list[Message]) -> None:
    assert sorted(delivered(msgs)) == sorted(i.sop_instance for i in CT)
    final = msgs[-1]
    assert isinstance(final, FinalResponse) and final.status == 0 and final.completed == 5


async def test_a_store_naming_no_move_is_not_routed_to_the_only_running_one(
    pacs: EmbeddedPacs,
) -> None:
    receiver = MoveReceiver(MOVE_AE, ("127.0.0.1", 0), timeout=10)
    msgs, status = await move_with_injection(
        pacs, receiver, lambda _id: store(receiver.port, OTHER)
    )
    assert status == st.STORE_NOT_AUTHORIZED
    assert_only_the_study(msgs)
    assert receiver.refused == 1


async def test_a_store_not_from_the_pacs_ae_is_refused_even_naming_the_running_move(
    pacs: EmbeddedPacs,
) -> None:
    receiver = MoveReceiver(
        MOVE_AE, ("127.0.0.1", 0), timeout=10, senders=MoveSenders.for_pacs(move_target(pacs))
    )

    def inject(msg_id: int) -> list[int | None]:
        return [
            store(receiver.port, OTHER, calling="EVILHOST", originator=("RELAY", msg_id)),
            store(receiver.port, OTHER, called="ANY-SCP", originator=("RELAY", msg_id)),
            store(receiver.port, OTHER, originator=("WHOEVER", msg_id)),
        ]

    msgs, statuses = await move_with_injection(pacs, receiver, inject)
    assert statuses == [None, None, st.STORE_NOT_AUTHORIZED]
    assert_only_the_study(msgs)


def test_a_connection_from_another_address_is_closed_before_it_associates() -> None:
    receiver = MoveReceiver(
        MOVE_AE, ("127.0.0.1", 0), timeout=5, senders=MoveSenders(["127.0.0.1"], [PACS_AE])
    )
    receiver.start()
    try:
        # Linux routes all of 127/8 to the loopback: 127.0.0.2 is another host here.
        assert store(receiver.port, OTHER, source="127.0.0.2") is None
        assert receiver.strangers == 1
        # The PACS itself associates (its store names no C-MOVE of ours: refused).
        assert store(receiver.port, OTHER) == st.STORE_NOT_AUTHORIZED
    finally:
        receiver.stop()


def test_strangers_are_counted_each_and_logged_in_a_limited_number_of_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A host that keeps connecting to the storage SCP cannot fill the agent's log."""
    receiver = MoveReceiver(
        MOVE_AE, ("127.0.0.1", 0), timeout=5, senders=MoveSenders(["127.0.0.1"], [PACS_AE])
    )
    receiver.start()
    tries = 3 * LOG_BURST
    try:
        with caplog.at_level("WARNING", logger="relay.dicom.intake"):
            for _ in range(tries):
                with socket.create_connection(
                    ("127.0.0.1", receiver.port), timeout=5, source_address=("127.0.0.2", 0)
                ) as conn:
                    assert conn.recv(1) == b""  # closed unread
            assert receiver.strangers == tries
    finally:
        receiver.stop()
    lines = [r for r in caplog.records if "not the PACS" in r.getMessage()]
    assert len(lines) == LOG_BURST  # the rest counted, said by the next line let through


def test_the_moves_routed_at_once_are_bounded() -> None:
    receiver = MoveReceiver(MOVE_AE, ("127.0.0.1", 0), max_moves=2)
    ids = [contexts.next_message_id() for _ in range(3)]
    receiver.register(ids[0], cast(Intake, None))
    receiver.register(ids[1], cast(Intake, None))
    with pytest.raises(MoveRoutesFull):
        receiver.register(ids[2], cast(Intake, None))
    assert not contexts.hold_message_id(ids[0]) and contexts.hold_message_id(ids[2])
    contexts.release_message_id(ids[2])  # not held by the refused registration
    receiver.unregister(ids[0])
    receiver.register(ids[2], cast(Intake, None))
    for msg_id in ids[1:]:
        receiver.unregister(msg_id)
    assert MAX_MOVES >= MAX_PACS_OPERATIONS  # never reached through the dispatcher
    with pytest.raises(ValueError):
        MoveReceiver(MOVE_AE, ("127.0.0.1", 0), max_moves=MAX_MOVES + 1)


async def test_a_move_beyond_the_routes_is_refused_before_the_pacs_sees_it(
    pacs: EmbeddedPacs,
) -> None:
    receiver = MoveReceiver(MOVE_AE, ("127.0.0.1", 0), timeout=10, max_moves=1)
    other = contexts.next_message_id()
    receiver.register(other, cast(Intake, None))  # another C-MOVE holds the one route
    receiver.start()
    try:
        pacs.destinations[MOVE_AE] = ("127.0.0.1", receiver.port)
        a, b = pipe()
        server = asyncio.create_task(
            serve_dicom_stream(b, move_target(pacs), move_receiver=receiver)
        )
        ws = Workstation(a)
        await ws.send(
            Request(op="retrieve", root="study", transfer_syntax=EXPLICIT,
                    dataset=ident("STUDY", StudyInstanceUID=CT_STUDY))
        )  # fmt: skip
        msgs = await ws.all()
        await server
    finally:
        receiver.stop()
        receiver.unregister(other)
    assert delivered(msgs) == []
    final = msgs[-1]
    assert isinstance(final, FinalResponse) and final.status == st.SUBOPS_FAILED
    assert receiver._routes == {}


def test_move_senders_are_names_addresses_and_networks() -> None:
    senders = MoveSenders(["localhost", "10.1.2.0/24", "2001:db8::7"], ["PACS"], ["RELAY"])
    assert senders.admits("127.0.0.1") and senders.admits("::ffff:127.0.0.1")
    assert senders.admits("10.1.2.200") and senders.admits("2001:db8::7")
    assert not senders.admits("10.1.3.1") and not senders.admits("not an address")
    assert senders.originators == {"PACS", "RELAY"}


def test_message_ids_are_unpredictable_and_not_reused() -> None:
    ids = [contexts.next_message_id() for _ in range(200)]
    assert len(set(ids)) == len(ids) and all(1 <= i <= 0xFFFF for i in ids)
    steps = {b - a for a, b in itertools.pairwise(ids)}
    assert len(steps) > 100  # not a counter
    assert contexts.hold_message_id(ids[0]) and not contexts.hold_message_id(ids[0])
    contexts.release_message_id(ids[0])


async def test_instances_outside_the_retrieve_or_beyond_its_count_are_not_delivered() -> None:
    out: Channel[Message] = Channel(asyncio.get_running_loop(), 16)
    intake = Intake(
        out, MessageCodec(), NullStats(), stall_timeout=5,
        aborted=threading.Event(), cancel=threading.Event(),
    )  # fmt: skip
    intake.limit_to(query("STUDY", StudyInstanceUID=CT_STUDY))

    def deliver(inst: samples.EncodedInstance) -> int:
        return intake.deliver(inst.sop_class, inst.sop_instance, EXPLICIT, inst.data)

    assert await asyncio.to_thread(deliver, OTHER) == STORE_NOT_REQUESTED  # another study
    intake.announce(3)  # the PACS says 3 sub-operations (the refused one was the first)
    assert await asyncio.to_thread(deliver, CT[0]) == st.SUCCESS
    assert await asyncio.to_thread(deliver, CT[1]) == st.SUCCESS
    assert await asyncio.to_thread(deliver, CT[2]) == STORE_NOT_REQUESTED  # a fourth
    assert len(out) == 2 and intake.unrequested == 2
    intake.limit_to(query("SERIES", StudyInstanceUID=CT_STUDY, SeriesInstanceUID="1.2.3"))
    assert await asyncio.to_thread(deliver, CT[3]) == STORE_NOT_REQUESTED  # not that series


_CHILD = r"""
import sys, time
from relay.dicom.intake import MoveReceiver, MoveSenders
r = MoveReceiver("RELAYMOVE", ("127.0.0.1", 0), timeout=10, max_dataset=1 << 20,
                 senders=MoveSenders(["127.0.0.1"], ["RELAYPACS"], ["RELAY"]))
r.start()
print(r.port, flush=True)
sys.stdin.read()
print(r.strangers, r.oversized, flush=True)
"""
BIG = 96 << 20


def _big_instance(size: int = BIG) -> samples.EncodedInstance:
    cls, iuid = "1.2.840.10008.5.1.4.1.1.7", "1.2.3.4.5"
    data = (
        struct.pack("<HH2sH", 8, 0x16, b"UI", 26) + cls.encode() + b"\0"
        + struct.pack("<HH2sH", 8, 0x18, b"UI", 10) + iuid.encode() + b"\0"
        + struct.pack("<HH2sHI", 0x7FE0, 0x10, b"OB", 0, size) + bytes(size)
    )  # fmt: skip
    return samples.EncodedInstance(cls, iuid, EXPLICIT, data)


def _peak_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) >> 10 for line in f if line.startswith("VmHWM"))


def _one_pdu_store(port: int, inst: samples.EncodedInstance) -> int | None:
    """A C-STORE from the PACS's address and AE that ignores our maximum PDU length."""
    assoc = AE(ae_title=PACS_AE).associate(
        "127.0.0.1", port, contexts=[build_context(inst.sop_class, [EXPLICIT])], ae_title=MOVE_AE
    )
    assert assoc.is_established
    for item in assoc.acceptor.user_information:  # as if we had announced no limit: one PDU
        if isinstance(item, MaximumLengthNotification):
            item.maximum_length_received = 0
    ds = rawds.EncodedDataset(inst.sop_class, inst.sop_instance, EXPLICIT, inst.data)
    status = assoc.send_c_store(ds, originator_aet="RELAY", originator_id=7)
    assoc.release()
    return int(status.Status) if "Status" in status else None


def test_a_pdu_over_the_maximum_length_is_cut_at_its_header_and_counted() -> None:
    """Counted in `oversized` as a C-STORE over max_dataset is: both cut an association."""
    max_pdu = 16 * 1024
    receiver = MoveReceiver(
        MOVE_AE, ("127.0.0.1", 0), timeout=5, max_pdu=max_pdu,
        senders=MoveSenders(["127.0.0.1"], [PACS_AE], ["RELAY"]),
    )  # fmt: skip
    receiver.start()
    try:  # one PDU past max_pdu and its slack, far below max_dataset
        assert _one_pdu_store(receiver.port, _big_instance(max_pdu + PDU_SLACK + 1024)) is None
        assert receiver.oversized == 1
    finally:
        receiver.stop()


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak memory from /proc")
def test_big_stores_are_cut_while_they_arrive() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        port = int(child.stdout.readline())
        before = _peak_mib(child.pid)
        big = _big_instance()
        # A stranger: closed before it associates, nothing read.
        assert store(port, big, source="127.0.0.2") is None
        # The PACS, over max_dataset: fragments of our maximum PDU length, cut past it.
        assert store(port, big, originator=("RELAY", 7)) == -1
        # The PACS, in one PDU of BIG bytes: cut at its header.
        assert _one_pdu_store(port, big) is None
        peak = _peak_mib(child.pid)
        child.stdin.close()
        strangers, oversized = map(int, child.stdout.readline().split())
    finally:
        child.kill()
        child.wait()
    assert (strangers, oversized) == (1, 2)  # over max_dataset, and one PDU over the maximum
    assert peak - before < (BIG >> 20) // 3, (before, peak)


# -- what a retrieve holds of the UIDs it skips and delivers ------------------------------

_TINY_CLASS = "1.2.840.10008.5.1.4.1.1.7"


def _tiny(uid: str) -> bytes:
    """The smallest instance an intake takes: its SOP class and instance (`uid`, even)."""
    return (
        struct.pack("<HH2sH", 8, 0x16, b"UI", 26) + _TINY_CLASS.encode() + b"\0"
        + struct.pack("<HH2sH", 8, 0x18, b"UI", len(uid)) + uid.encode()
    )  # fmt: skip


def _uids(n: int, start: int = 0) -> list[str]:
    return [f"1.2.826.0.1.3680043.8.498.{i:038d}" for i in range(start, start + n)]  # 64 each


def _intake(depth: int, skip: UidSet | None = None) -> tuple[Intake, Channel[Message]]:
    loop = asyncio.new_event_loop()  # the channel's loop side is not used: threads only
    loop.close()
    out: Channel[Message] = Channel(loop, depth)
    intake = Intake(
        out, MessageCodec(), NullStats(), stall_timeout=5,
        aborted=threading.Event(), cancel=threading.Event(), skip=skip or UidSet(),
    )  # fmt: skip
    return intake, out


def test_the_uids_delivered_are_held_as_16_byte_digests() -> None:
    """A retrieve notes every UID it sends on, for a second retrieve to pass over: 5,000
    of them hold 16 bytes each (a set of the strings held 218 bytes a UID here, 145 at
    the 65,535 a retrieve may deliver: 9.5 MiB; one device runs 32 retrieves)."""
    sent = [_tiny(u) for u in _uids(5_000)]
    intake, out = _intake(depth=100)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for start in range(0, len(sent), 100):
            for i in range(start, start + 100):  # each UID a new string, as pynetdicom's
                uid = _uids(1, start=i)[0]
                assert intake.deliver(_TINY_CLASS, uid, EXPLICIT, sent[i]) == st.SUCCESS
            for _ in range(100):
                out.get_sync(1)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert intake.instances == len(sent)
    assert held / len(sent) < 24, f"{held / len(sent):.1f} bytes a UID"


def test_what_was_delivered_is_passed_over_by_the_next_retrieve() -> None:
    """A C-GET run again with the study's own contexts (pacs_ops) sends on only what the
    first run did not: the skip list and the first run's deliveries are passed over."""
    skipped, first, later = _uids(3), _uids(3, start=3), _uids(3, start=6)
    intake, out = _intake(depth=16, skip=UidSet.of(skipped))
    for uid in skipped + first:
        assert intake.deliver(_TINY_CLASS, uid, EXPLICIT, _tiny(uid)) == st.SUCCESS
    assert (len(out), intake.skipped) == (3, 3)
    assert intake.pass_over_delivered()  # the same retrieve, run again
    for uid in skipped + first + later:
        assert intake.deliver(_TINY_CLASS, uid, EXPLICIT, _tiny(uid)) == st.SUCCESS
    assert (len(out), intake.skipped) == (6, 9)  # only the later ones went on
    assert len(intake.skip) == 6


def test_a_skip_list_and_the_uids_delivered_together_are_bounded() -> None:
    """An honest skip list and what a retrieve then delivers are different instances of
    one retrieve, so at most MAX_COUNT together: past that the delivered ones are not
    kept (no second retrieve), and a retrieve holds at most MAX_COUNT digests, 1 MiB."""
    skip = UidSet.of(_uids(MAX_COUNT - 1))
    for delivered, kept in ((1, True), (2, False)):
        intake, _ = _intake(depth=4, skip=skip)
        for uid in _uids(delivered, start=MAX_COUNT):
            assert intake.deliver(_TINY_CLASS, uid, EXPLICIT, _tiny(uid)) == st.SUCCESS
        assert intake.pass_over_delivered() is kept
    assert len(intake.skip) == MAX_COUNT - 1 and intake.skip.nbytes == (MAX_COUNT - 1) * 16
