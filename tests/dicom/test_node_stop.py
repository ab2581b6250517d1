"""The workstation's DICOM node stops within a bound whatever a viewer or a C-MOVE
destination does: every association is ended (A-ABORT, then cut), also one whose peer
hung mid-PDU (pynetdicom's connection thread then sits in a recv on a socket without a
timeout), and none of pynetdicom's connection threads (not daemons: they hold the
process's exit, the radiologist's closing of the workstation) is left."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import pytest
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

from relay.dicom import contexts
from relay.dicom import node as node_mod
from relay.dicom.codec import MessageCodec, Request, read_message
from relay.dicom.contexts import MODELS
from relay.dicom.ending import ABORT_LINGER, STOP_JOIN
from relay.dicom.node import _LEAVE, DicomNode
from relay.net.bytestream import ByteStream, pipe

from . import viewer
from .chain import until
from .helpers import EXPLICIT, query, scu
from .test_node_scripted import STUDY, streaming

NODE = "STOPNODE"
GRACE = 0.2  # the drain's grace in these tests
# What a stop may take beyond its bounds (thread hops, a loaded machine); the node's own
# timeouts (20 s here) and a hung peer's (for ever) are far beyond it.
SLACK = 1.0
# The start of a P-DATA-TF PDU announcing 16 bytes, of which 2 come: the reader then
# waits in a recv for the rest.
PDU_CUT_SHORT = b"\x04\x00\x00\x00\x00\x10xx"


def node_connections() -> list[DULServiceProvider]:
    """pynetdicom's connection threads still running of the node's associations: those
    it accepted (viewers') and those it requested (destinations', the check's)."""
    return [
        t
        for t in threading.enumerate()
        if isinstance(t, DULServiceProvider)
        and t.is_alive()
        and (t.assoc.acceptor if t.assoc.is_acceptor else t.assoc.requestor).ae_title == NODE
    ]


def hang(assoc: Association, send: bytes = b"") -> socket.socket:
    """Make the peer of `assoc` a hung process: its connection thread stops (nothing
    read, answered or closed any more) with the connection left open, after `send`;
    its socket, to close at the end."""
    raw = assoc.dul.socket.socket  # type: ignore[union-attr]
    assert raw is not None
    assoc.dul._kill_thread = True
    assoc.dul.join(5)
    assert not assoc.dul.is_alive()
    if send:
        raw.sendall(send)
    return raw


async def silent(headers: Mapping[str, str]) -> ByteStream:
    a, _b = pipe(headers)
    return a


async def _drained(node: DicomNode) -> float:
    started = time.monotonic()
    await asyncio.wait_for(node.drain(GRACE), 15)
    return time.monotonic() - started


@contextlib.asynccontextmanager
async def node_with_a_viewer_hung_mid_pdu(node_timeout: float) -> AsyncIterator[DicomNode]:
    """A running node (its `node_timeout`) whose viewer hung after the start of a PDU: the
    node's connection thread waits in a recv for the rest. The node is stopped after."""
    node = DicomNode(silent, listen=("127.0.0.1", 0), ae_title=NODE, timeout=node_timeout)
    await node.start()
    raw: socket.socket | None = None
    try:
        assoc = await asyncio.to_thread(
            scu("VIEWER").associate,
            "127.0.0.1",
            node.address[1],
            contexts=[build_context(MODELS[("study", "find")])],
            ae_title=NODE,
        )
        assert assoc.is_established
        raw = hang(assoc, PDU_CUT_SHORT)
        yield node
    finally:
        if raw is not None:
            raw.close()
        await node.stop()


async def test_stop_ends_the_association_of_a_viewer_hung_mid_pdu() -> None:
    """The accepted socket has no timeout: the stop cuts the hung viewer's connection at
    once rather than waiting for ever."""
    async with node_with_a_viewer_hung_mid_pdu(node_timeout=20) as node:
        await asyncio.sleep(0.1)  # the node reads the PDU's header (loopback: well within)
        took = await _drained(node)
        assert took < GRACE + ABORT_LINGER + STOP_JOIN + SLACK
        assert node_connections() == []


async def test_a_viewer_hung_mid_pdu_is_cut_while_running(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not only at stop: a viewer that hangs in the middle of a PDU holds a connection
    thread and an association slot only for the node's timeout + STALL_SLACK (its
    connection had no timeout at all)."""
    monkeypatch.setattr(node_mod, "STALL_SLACK", 0.5)
    async with node_with_a_viewer_hung_mid_pdu(node_timeout=0.5):
        await until(lambda: node_connections() == [], 10)


@contextlib.contextmanager
def destination_hanging_mid_pdu() -> Iterator[tuple[threading.Event, int]]:
    """A storage SCP that, on the first C-STORE, hangs after sending the start of a PDU;
    the event is set then."""
    hung, done = threading.Event(), threading.Event()
    sockets: list[socket.socket] = []

    def on_store(event: Any) -> int:
        sockets.append(hang(event.assoc, PDU_CUT_SHORT))
        hung.set()
        done.wait(30)
        return 0xA700

    ae = AE(ae_title="DEST")
    ae.maximum_pdu_size = 0
    for sop in contexts.STORAGE_CLASSES[:100]:
        ae.add_supported_context(sop, [EXPLICIT])
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    assert server is not None
    try:
        yield hung, int(server.server_address[1])
    finally:
        done.set()
        for raw in sockets:
            raw.close()
        server.shutdown()


async def test_stop_ends_a_c_move_whose_destination_hung_mid_pdu() -> None:
    """The destination hangs mid-answer to a C-STORE: the node's connection thread to it
    waits in a recv (pynetdicom leaves the sockets it connects without a timeout) for
    ever; the drain ends the C-MOVE within its grace, `_LEAVE` for the answer, and the
    abort's bounds."""

    async def open_stream(headers: Mapping[str, str]) -> ByteStream:
        a, b = pipe(headers)

        async def agent() -> None:
            codec = MessageCodec()
            request = await read_message(b, codec)
            assert isinstance(request, Request)
            await streaming(STUDY, [0])(b, codec, request)

        asyncio.get_running_loop().create_task(agent())
        return a

    with destination_hanging_mid_pdu() as (hung, port):
        node = DicomNode(
            open_stream,
            listen=("127.0.0.1", 0),
            ae_title=NODE,
            timeout=20,
            destinations={"DEST": ("127.0.0.1", port)},
        )
        await node.start()
        try:
            moving = asyncio.create_task(
                asyncio.to_thread(
                    viewer.move, node.address[1], query("STUDY", StudyInstanceUID="1.2.3"), "DEST"
                )
            )
            await until(hung.is_set, 10)
            await asyncio.sleep(0.1)  # the node reads the PDU's header
            took = await _drained(node)
            assert took < GRACE + _LEAVE + ABORT_LINGER + STOP_JOIN + SLACK
            assert node_connections() == []
            await asyncio.wait_for(moving, 10)  # the viewer's association was aborted
        finally:
            await node.stop()


async def test_stop_ends_the_check_of_a_destination_that_never_answers() -> None:
    """A C-MOVE destination takes the TCP connection and never answers the node's check
    (its A-ASSOCIATE-RQ): the stop ends the check's association too, not leaving its
    connection thread to the check's timeout (10 s)."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            accepted.append(listener.accept()[0])

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    node = DicomNode(
        silent,
        listen=("127.0.0.1", 0),
        ae_title=NODE,
        timeout=20,
        destinations={"DEST": listener.getsockname()[:2]},
    )
    await node.start()
    try:
        moving = asyncio.create_task(
            asyncio.to_thread(
                viewer.move, node.address[1], query("STUDY", StudyInstanceUID="1.2.3"), "DEST"
            )
        )
        await until(lambda: bool(accepted), 10)
        took = await _drained(node)
        assert took < GRACE + _LEAVE + ABORT_LINGER + STOP_JOIN + SLACK
        assert node_connections() == []
        await asyncio.wait_for(moving, 10)
    finally:
        await node.stop()
        for raw in [*accepted, listener]:
            raw.close()
