"""`PacsOperation` (relay.dicom.pacs_ops) on its own: what happens around a retried request
and at the operation's end, against the embedded PACS."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import build_context
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from relay.dicom import pacs_assoc, pacs_ops
from relay.dicom import status as st
from relay.dicom.bridge import Channel, ChannelClosed
from relay.dicom.codec import FinalResponse, Message, MessageCodec, Request
from relay.dicom.pacs_ops import PacsOperation
from relay.dicom.spare import SpareAssociation
from relay_dev.pacs import EmbeddedPacs, MemoryStore

from .test_agent import CT, CT_STUDY, MR, retrieve, target
from .test_spare import find
from .test_survey import RARE, STUDY


@pytest.fixture
def pacs() -> Iterator[EmbeddedPacs]:
    with EmbeddedPacs(MemoryStore(CT + MR)) as p:
        yield p


async def operate(op: PacsOperation, out: Channel[Message]) -> list[Message]:
    """Run `op` on a thread as the agent does, taking what it produces."""
    thread = asyncio.create_task(asyncio.to_thread(op.run))
    msgs: list[Message] = []
    async with asyncio.timeout(20):
        with contextlib.suppress(ChannelClosed):
            while True:
                msgs.append(await out.get())
        await thread  # raises what the thread raised
    return msgs


def operation(
    pacs: EmbeddedPacs, request: Request, **kw: Any
) -> tuple[PacsOperation, Channel[Message]]:
    out: Channel[Message] = Channel(asyncio.get_running_loop(), 64)
    return PacsOperation(target(pacs), request, MessageCodec(), out, **kw), out


async def test_leaving_a_spare_never_kills_the_operation_thread(
    pacs: EmbeddedPacs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spare is opened after the final is queued, outside the operation's own error
    handling: a failure to build its contexts is logged, the thread ends normally."""

    def broken(*_: object) -> tuple[list[Any], list[Any]]:
        raise ValueError("'transfer_syntax' contains an invalid UID")

    monkeypatch.setattr(pacs_ops, "spare_contexts", broken)
    spare = SpareAssociation(5)
    op, out = operation(pacs, find(), spare=spare)
    msgs = await operate(op, out)
    assert isinstance(msgs[-1], FinalResponse) and msgs[-1].status == 0
    assert spare.vacant()  # nothing opened, nothing left opening
    spare.close()


async def test_storage_contexts_that_cannot_be_built_end_in_a_status(
    pacs: EmbeddedPacs, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: object) -> list[Any]:
        raise ValueError("'transfer_syntax' contains an invalid UID")

    monkeypatch.setattr(pacs_ops, "remembered_storage", broken)
    op, out = operation(pacs, retrieve(StudyInstanceUID=CT_STUDY))
    msgs = await operate(op, out)
    final = msgs[-1]
    assert isinstance(final, FinalResponse)
    assert final.status == st.PACS_NO_RESPONSE and "storage contexts" in final.comment
    assert pacs.events.associations == 0  # nothing was asked of the PACS


class CancelledOnRetry(PacsOperation):
    """The viewer cancels just as the retried request's association is up, before that
    request goes; what goes on that association is recorded in order."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, *args: Any, stale: bool = False, **kw: Any
    ) -> None:
        super().__init__(*args, **kw)
        self.monkeypatch = monkeypatch
        self.stale = stale  # the first request goes unanswered, as on a spare the PACS ended
        self.mains = 0
        self.sent: list[str] = []

    def _associate(self, cxs: Any, **kw: Any) -> Association | FinalResponse:
        assoc = super()._associate(cxs, **kw)
        if not kw.get("main", True) or isinstance(assoc, FinalResponse):
            return assoc
        self.mains += 1
        if self.mains == 1 and self.stale:
            self._took_spare = True

            def ended(*_: object, **__: object) -> Iterator[tuple[Dataset, None]]:
                yield Dataset(), None  # pynetdicom's answer when the PACS aborted

            self.monkeypatch.setattr(assoc, "send_c_find", ended)
        elif self.mains == 2:
            for name in ("send_c_find", "send_c_get", "send_c_cancel"):
                self.monkeypatch.setattr(assoc, name, self._recording(name, getattr(assoc, name)))
            self.cancel()
        return assoc

    def _recording(self, name: str, send: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(*args: Any, **kw: Any) -> Any:
            self.sent.append(name.removeprefix("send_c_"))
            return send(*args, **kw)

        return recorded


@pytest.mark.parametrize("kind", ["find, spare stale", "get, second C-GET"])
async def test_a_cancel_as_a_request_is_retried_follows_that_request(
    monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A request goes again on a new association (the spare had ended; a C-GET's contexts
    missed a class). A cancel that comes once that association is up but before the
    request went must not go first (the PACS would drop it, and the retried request
    would run to its end): it follows the request."""
    with EmbeddedPacs(MemoryStore(CT + MR + RARE)) as pacs:
        if kind.startswith("find"):
            request, op_name = find(), "find"
        else:
            request, op_name = retrieve(StudyInstanceUID=STUDY), "get"
        out: Channel[Message] = Channel(asyncio.get_running_loop(), 64)
        op = CancelledOnRetry(
            monkeypatch, target(pacs), request, MessageCodec(), out, stale=op_name == "find"
        )
        msgs = await operate(op, out)
    assert op.mains == 2
    assert op.sent == [op_name, "cancel"]
    assert op.cancel_sent.is_set()
    assert isinstance(msgs[-1], FinalResponse)


class LateReactor(threading.Event):
    """An association's reactor checkpoint; once `late`, the reactor's next turn (the
    one kill() starts) goes on only once a message waits (at most 0.3 s): a reactor
    thread scheduled late, as on a loaded machine, which then takes that message."""

    def __init__(self, assoc: Association) -> None:
        super().__init__()
        self.assoc = assoc
        self.late = False

    def wait(self, timeout: float | None = None) -> bool:
        woke = super().wait(timeout)
        if self.late and threading.current_thread() is self.assoc:
            deadline = time.monotonic() + 0.3
            while not self.assoc.dimse.msg_queue.qsize() and time.monotonic() < deadline:
                time.sleep(0.005)
        return woke


def test_an_abort_wakes_the_operation_waiting_for_the_pacs_however_late_the_reactor(
    pacs: EmbeddedPacs,
) -> None:
    """The operation's thread, awaiting a C-GET's next response, was woken by the
    (None, None) put after the abort; pynetdicom's reactor, restarted by kill() for a
    last turn, could take it first, and the thread (with the agent's stream task) waited
    out the whole DIMSE timeout after the workstation had gone: seen as a 10 s teardown
    of test_the_dicomweb_source_answers_502_then_goes_without_the_codec."""
    assoc = pacs_assoc.associate(target(pacs), [build_context(Verification)])
    assert assoc.is_established
    assoc.dimse_timeout = 5
    checkpoint = LateReactor(assoc)
    checkpoint.set()
    assoc._reactor_checkpoint = checkpoint  # taken up on the reactor's next turn
    time.sleep(0.02)
    checkpoint.clear()  # paused, as during a C-GET (pynetdicom's send_c_get)
    checkpoint.late = True
    aborter = threading.Thread(target=pacs_ops._abort, args=(assoc,))
    aborter.start()
    assoc.join(2)  # the reactor's last turn is over: whatever it took is gone
    started = time.monotonic()
    assert assoc.dimse.get_msg(block=True) == (None, None)
    assert time.monotonic() - started < 2
    aborter.join(2)
