"""What a hostile device's DICOM request may make the agent hold, against the embedded
PACS over a pipe: identifiers are capped (0xC007) before they are read or inflated, a
deflated dataset inflates within the codec's limits, a C-FIND the viewer does not read
is cancelled before its matches pile up, a resumed retrieve's skip list is held as
digests, and the PACS's odd final still reaches the viewer."""

from __future__ import annotations

import asyncio
import struct
import tracemalloc
import zlib
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import zstandard
from pydicom.dataset import Dataset

from relay.dicom import pacs_ops, rawds
from relay.dicom import status as st
from relay.dicom.agent import serve_dicom_stream
from relay.dicom.codec import (
    MAX_COUNT,
    DicomLimits,
    Instance,
    MessageType,
    Pending,
    Request,
    Skip,
)
from relay.net.bytestream import pipe
from relay_dev import samples
from relay_dev.pacs import EmbeddedPacs, MemoryStore

from .helpers import EXPLICIT
from .test_agent import CT, Workstation, final_of, ident, retrieve, run, study_uid, target

DEFLATED = "1.2.840.10008.1.2.1.99"


@pytest.fixture
def pacs() -> Iterator[EmbeddedPacs]:
    with EmbeddedPacs(MemoryStore(CT)) as p:
        yield p


@pytest.fixture
def inflated(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(limit, bytes out) of every inflate in this process, wherever it is called from."""
    seen: list[tuple[int, int]] = []
    real = rawds.inflate

    def recording(data: bytes, limit: int) -> bytes:
        try:
            out = real(data, limit)
        except rawds.InflatedTooLarge:
            seen.append((limit, limit))
            raise
        seen.append((limit, len(out)))
        return out

    monkeypatch.setattr(rawds, "inflate", recording)
    return seen


def padded(dataset: bytes, size: int) -> bytes:
    """`dataset` and a private OB element of `size` zero bytes: what squeezes to nothing."""
    return dataset + struct.pack("<HH2sHI", 0x0009, 0x1000, b"OB", 0, size) + bytes(size)


def deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def find_request(dataset: bytes, ts: str = EXPLICIT) -> Request:
    return Request(op="find", root="study", transfer_syntax=ts, dataset=dataset)


async def test_a_big_identifier_is_refused_from_its_header_unread(pacs: EmbeddedPacs) -> None:
    """A 10 KB zstd frame held a 300 MiB identifier, which the agent inflated, decoded
    and encoded again (3.6 GiB). Now the REQUEST's header (its op) bounds its body to
    `max_identifier` before any of it is read: the device sends the message's first
    bytes only, and is answered 0xC007 at once."""
    limits = DicomLimits()
    header = b'{"op":"find","root":"study","ts":"1.2.840.10008.1.2.1"}'
    body = 300 << 20
    length = 5 + len(header) + body
    head = struct.pack(">IBBBH", length, 1, MessageType.REQUEST, 1, len(header)) + header
    a, b = pipe()
    server = asyncio.create_task(serve_dicom_stream(b, target(pacs), limits=limits))
    await a.write(head)  # and nothing of the body
    msgs = await Workstation(a).all()
    final = final_of(msgs)
    assert final.status == st.BAD_IDENTIFIER
    assert f"limit {limits.max_identifier}" in final.comment
    summary = await asyncio.wait_for(server, 20)
    assert summary.status == st.BAD_IDENTIFIER
    assert pacs.events.associations == 0


async def test_a_zstd_identifier_past_the_cap_is_refused_before_decompressing(
    pacs: EmbeddedPacs,
) -> None:
    """The codec compresses it (a store may be that big): the agent refuses it from the
    frame's declared size."""
    data = padded(ident("STUDY", StudyInstanceUID=""), 1 << 20)
    msgs, _ = await run(target(pacs), find_request(data))
    final = final_of(msgs)
    assert final.status == st.BAD_IDENTIFIER and "identifier of" in final.comment
    assert pacs.events.associations == 0


async def test_an_identifier_within_the_cap_still_goes(pacs: EmbeddedPacs) -> None:
    data = padded(ident("STUDY", StudyInstanceUID=""), 64 << 10)  # zstd'ed to ~100 bytes
    assert zstandard.ZstdCompressor().compress(data)  # (what the codec sends)
    msgs, _ = await run(target(pacs), find_request(data))
    assert final_of(msgs).status == 0
    assert pacs.events.finds == 1


async def test_a_deflated_identifier_inflates_at_most_to_the_cap(
    pacs: EmbeddedPacs, inflated: list[tuple[int, int]]
) -> None:
    """A 300 MiB identifier deflates to 300 KB and inflated up to 1 GiB, whatever the
    limits said (+3.3 GiB for a find); the audit keys inflated it again."""
    limits = DicomLimits()
    data = deflate(padded(ident("STUDY", StudyInstanceUID=""), 1 << 20))
    assert len(data) < limits.max_identifier
    msgs, summary = await run(target(pacs), find_request(data, DEFLATED), limits=limits)
    final = final_of(msgs)
    assert final.status == st.BAD_IDENTIFIER and "inflates past" in final.comment
    assert pacs.events.associations == 0
    summary.keys()  # the audit trail's look at it
    assert inflated and all(limit <= limits.max_identifier for limit, _ in inflated)
    assert all(out <= limits.max_identifier for _, out in inflated)


async def test_a_deflated_identifier_within_the_cap_is_inflated_once(
    pacs: EmbeddedPacs, inflated: list[tuple[int, int]]
) -> None:
    data = deflate(ident("STUDY", StudyInstanceUID=""))
    msgs, _ = await run(target(pacs), find_request(data, DEFLATED))
    assert final_of(msgs).status == 0 and pacs.events.finds == 1
    assert len(inflated) == 1  # checked and decoded from one inflate


async def test_a_deflated_upload_inflates_at_most_to_max_dataset(
    pacs: EmbeddedPacs, inflated: list[tuple[int, int]]
) -> None:
    """With max_dataset 1 MiB, a 306 KB upload inflated to 300 MiB and went to the
    PACS; here one of 1 MiB + 64 KiB of zeros against a 256 KiB limit."""
    limits = DicomLimits(max_dataset=256 << 10)
    inst = CT[0]
    data = deflate(padded(inst.data, 1 << 20))
    req = Request(op="store", transfer_syntax=DEFLATED, dataset=data, sop_class=inst.sop_class,
                  sop_instance=inst.sop_instance)  # fmt: skip
    msgs, summary = await run(target(pacs), req, limits=limits)
    final = final_of(msgs)
    assert final.status == st.STORE_CANNOT_UNDERSTAND and "larger than" in final.comment
    assert pacs.events.stores == 0
    keys = summary.keys()  # the audit trail's look at it: within the same limit
    assert keys["SOPInstanceUID"] == inst.sop_instance
    assert inflated and all(limit <= limits.max_dataset for limit, _ in inflated)


async def test_a_find_the_viewer_does_not_read_is_cancelled_before_matches_pile_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pynetdicom queues every match the PACS sends, without bound, while the channel to
    a device that reads nothing is full (6,694 matches after 10 s; the whole result set
    for up to stall_timeout). Past MAX_FIND_BACKLOG the query is cancelled at the PACS
    and ends 0xA700, long before the stall timeout."""
    monkeypatch.setattr(pacs_ops, "MAX_FIND_BACKLOG", 20, raising=False)  # (the old code)
    looked: list[int] = [0]
    real = getattr(pacs_ops, "backlog", len)

    def backlog(assoc: Any) -> int:
        looked.append(real(assoc))
        return looked[-1]

    monkeypatch.setattr(pacs_ops, "backlog", backlog, raising=False)
    study = samples.make_study(300, rows=8, cols=8)
    with EmbeddedPacs(MemoryStore(study), find_delay=0.01) as p:  # it ends after the cancel
        a, b = pipe(limit=2048)  # a viewer that reads nothing: the pipe fills at once
        server = asyncio.create_task(
            serve_dicom_stream(b, target(p, stall_timeout=60), limits=DicomLimits(queue_depth=2))
        )
        ws = Workstation(a)
        request = ident("IMAGE", StudyInstanceUID="", SeriesInstanceUID="", SOPInstanceUID="")
        await ws.send(find_request(request))
        assert await asyncio.to_thread(p.events.cancelled.wait, 20)
        msgs = await ws.all()
        summary = await asyncio.wait_for(server, 20)
    final = final_of(msgs)
    assert final.status == 0xA700
    assert "more than 20 matches" in final.comment
    assert summary.seconds < 30  # not the stall timeout
    assert max(looked) > 20
    assert sum(isinstance(m, Pending) for m in msgs) < 300


class OddPacs(EmbeddedPacs):
    """Ends every C-GET with 0xA702, a Failed SOP Instance UID List and a comment."""

    def __init__(self, failed: list[str], comment: str = "") -> None:
        super().__init__(MemoryStore(CT))
        self.failed = failed
        self.comment = comment

    def _on_get(self, event: Any) -> Iterator[Any]:
        yield 2
        status = Dataset()
        status.Status = st.SUBOPS_FAILED
        status.NumberOfFailedSuboperations = 2
        status.NumberOfCompletedSuboperations = 0
        status.NumberOfWarningSuboperations = 0
        if self.comment:
            status.ErrorComment = self.comment
        failed = Dataset()
        failed.FailedSOPInstanceUIDList = self.failed
        yield status, failed


@pytest.mark.parametrize(
    "bad", ["1.2." + "3" * 70, "1.2.3.4a", "1.2.3 4"], ids=["long", "letter", "space"]
)
async def test_a_pacs_failed_uid_that_is_no_uid_does_not_lose_the_final(bad: str) -> None:
    """The FINAL failed to encode, the stream was reset, and the viewer got a relay
    failure instead of the PACS's 0xA702 and its list."""
    with OddPacs([CT[0].sop_instance, bad]) as p:
        msgs, summary = await run(target(p, survey=False, spare_association=0),
                                  retrieve(StudyInstanceUID=study_uid(CT)))  # fmt: skip
    final = final_of(msgs)
    assert final.status == st.SUBOPS_FAILED == summary.status
    assert final.failed_instances == (CT[0].sop_instance,)
    assert final.failed == 2  # the PACS's count stays


async def test_a_pacs_comment_and_failed_list_are_cut_to_what_encodes() -> None:
    """An Error Comment with control characters, past max_text; 1,024 UIDs of 64
    characters: more than a 16 KiB header holds."""
    limits = DicomLimits()
    uids = [f"1.2.9{i:059d}" for i in range(limits.max_list)]
    with OddPacs(uids, "bad\x00\x1b[2J" + "x" * 5000) as p:
        msgs, _ = await run(target(p, survey=False, spare_association=0),
                            retrieve(StudyInstanceUID=study_uid(CT)), limits=limits)  # fmt: skip
    final = final_of(msgs)
    assert final.status == st.SUBOPS_FAILED
    assert final.comment.startswith("bad[2Jxxx") and len(final.comment) == limits.max_text
    assert 100 < len(final.failed_instances) < len(uids)
    assert final.failed_instances == tuple(uids[: len(final.failed_instances)])


async def test_an_identifier_pydicom_cannot_decode_is_named_by_its_error_type(
    pacs: EmbeddedPacs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pydicom's error texts may quote the identifier's values: not in the FINAL."""

    def failing(*_: object, **__: object) -> Dataset:
        raise ValueError("Invalid value for VR PN: 'DOE^JANE'")

    monkeypatch.setattr(rawds, "decode_dataset", failing)
    msgs, _ = await run(target(pacs), find_request(ident("STUDY", PatientName="DOE^JANE")))
    final = final_of(msgs)
    assert final.status == st.BAD_IDENTIFIER
    assert final.comment == "cannot decode the identifier (ValueError)"
    assert pacs.events.finds == 0


async def _held_while_resuming(pacs: EmbeddedPacs, skip: Skip) -> int:
    """What the agent holds (tracemalloc: every thread, the PACS's too) once a resumed
    retrieve with this skip list is running: its first instance has reached the viewer."""
    a, b = pipe()
    ws = Workstation(a)
    request = replace(retrieve(StudyInstanceUID=study_uid(CT)), resume=True)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        server = asyncio.create_task(serve_dicom_stream(b, target(pacs, survey=False)))
        await ws.send(request)
        await ws.send(skip)
        while not isinstance(await ws.recv(), Instance):
            pass
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    msgs = await ws.all()
    summary = await asyncio.wait_for(server, 20)
    assert summary.status == st.SUCCESS and summary.instances == len(CT), summary
    assert final_of(msgs).completed == len(CT)
    return held


async def test_a_resumed_retrieve_holds_its_skip_list_as_digests(pacs: EmbeddedPacs) -> None:
    """A device's skip list of `max_skip` (65,535) UIDs of 64 characters, none in the
    study: while the retrieve runs the agent holds 16 bytes a UID more than with an empty
    list (the strings in a frozenset, and the message's tuple of them kept beside it, held
    153 bytes a UID: 10 MiB a stream, and a device may run 32)."""
    many = Skip(tuple(f"1.2.826.0.1.3680043.8.498.{i:038d}" for i in range(MAX_COUNT)))
    await _held_while_resuming(pacs, Skip(()))  # warms what the first retrieve allocates
    empty = await _held_while_resuming(pacs, Skip(()))
    full = await _held_while_resuming(pacs, many)
    assert (full - empty) / MAX_COUNT < 24, f"{(full - empty) / MAX_COUNT:.1f} bytes a UID"
