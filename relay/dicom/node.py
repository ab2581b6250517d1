"""The workstation's local DICOM node: what viewers talk to, relayed to the agent.

A pynetdicom AE on loopback accepts C-ECHO, C-FIND, C-GET and C-MOVE (Patient Root and
Study Root, all levels), C-STORE and C-CANCEL. Each viewer request becomes one relay stream
(`open_stream(headers)`), and results come back as they arrive:

- C-FIND matches are passed on one by one.
- C-GET: the agent's instances are sent as C-STORE sub-operations on the viewer's own
  association, with the PACS's dataset bytes unchanged when the viewer accepted that
  transfer syntax (see `rawds`); pending responses carry the counts as they change.
- C-MOVE: the same, delivered by C-STORE to the destination AE from `destinations`
  (an unknown AE gets 0xA801). The destination is checked first (`move_check`): one that
  is known but does not accept an association gets 0xC008 naming it, and the agent is
  never asked. The PACS never connects to the workstation.
- C-STORE from the viewer (an upload) is checked and forwarded to the PACS.
- C-CANCEL from the viewer is forwarded; the agent cancels at the PACS. A C-STORE to a
  C-MOVE destination still unanswered `_CUT_AFTER` seconds after it is cut (pynetdicom
  would wait for it up to `timeout`).
- A C-MOVE destination that stops answering (a C-STORE unanswered within `timeout`:
  pynetdicom aborts its association) ends the C-MOVE at once with 0xC008, the agent's
  retrieve cancelled and the rest counted failed, instead of pulling the whole study
  only to count it failed.
- A final failure, warning or cancel lists the sub-operations that failed at the viewer
  or destination, then the agent's (`_SubOps`, bounded by `_failed_list`).

If the relay drops mid-retrieval (the link is lost, or the stream is reset for a
link-level reason), a C-GET or C-MOVE is resumed: the node opens a new stream (the tunnel
reconnects, possibly to another gateway behind a load balancer) and sends the request
again with the SOP Instance UIDs the viewer already has (a `Skip` message); the agent
retrieves again and sends only the others. The viewer's association stays up and sees
each instance once. An instance cut by the drop was never decoded, so it is fetched again
whole. If no stream carries the retrieve on within `resume_window` seconds, the operation
ends with a failure status and failed counts (never success for a partial retrieval), and
every wait is bounded. A DICOM failure from the PACS is reported, never resumed.

Stopping drains (`drain(grace)`, from the workstation's shutdown while its session still
carries streams): new associations are refused at once, the requests already received
run to their last response within the grace, and only what is left is aborted: each
operation still running is answered with a failure first (one served from the cache, or
pausing before it resumes, looks at the node's stopping itself), and its viewer, like one
answered during the drain, has a moment to release its association before the
associations still open are aborted (see `stop`). Every association of the node (the
viewers', a C-MOVE's with its destination, the destination check's) is then ended
within about a second and a half whatever its peer does (`ending.end_all`: an
A-ABORT, a moment for the peer to close, then the socket shut down): pynetdicom's
connection threads are not daemons, and one blocked on a hung peer's socket held the
workstation's exit for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any, Final, Protocol

from pydicom.dataset import Dataset
from pynetdicom import AE, build_context, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from relay.dicom import checkpoint, contexts, move_check, rawds
from relay.dicom import status as st
from relay.dicom.codec import (
    VERSION,
    DicomLimits,
    FinalResponse,
    Instance,
    Message,
    MessageCodec,
    Pending,
    Request,
    Skip,
)
from relay.dicom.ending import OpenAssociations, cut
from relay.dicom.exclusive import start_exclusive_server
from relay.dicom.offer import CodecOffer
from relay.dicom.session import (
    MAX_RESUME_WINDOW,
    RESUME_WINDOW,
    STOPPING_REASON,
    OpenStream,
    Session,
    SessionEnded,
)
from relay.dicom.stats import DicomStats, NullStats
from relay.ops.listening import announce
from relay.wire import HEADER_DICOM_VERSION, HEADER_TARGET, TARGET_DICOM

#: Whether a viewer's connection (its address, ours) may be served; blocking.
Admit = Callable[[tuple[str, int], tuple[str, int]], bool]

log = logging.getLogger(__name__)

_POLL: Final = 0.1  # how often a handler pausing between resumes looks at the viewer
# A handler waiting for the agent is woken by the viewer's C-CANCEL or the end of its
# association (see DicomNode._wake); it also looks by itself this often, in case a wake-up
# came a moment before pynetdicom recorded the C-CANCEL.
_LOOK: Final = 1.0
_C_CANCEL: Final = 0x0FFF  # Command Field of C-CANCEL-RQ
# Command Fields of the requests a viewer sends us (C-STORE, C-GET, C-FIND, C-MOVE,
# C-ECHO); each one's response has bit 15 set.
_REQUESTS: Final = frozenset({0x0001, 0x0010, 0x0020, 0x0021, 0x0030})
_RESPONSE: Final = 0x8000
_PENDING: Final = frozenset({0xFF00, 0xFF01})
_RETRIEVE_RESPONSES: Final = frozenset({0x8010, 0x8021})  # C-GET-RSP, C-MOVE-RSP
# A Failed SOP Instance UID List holds at most DicomLimits.max_list UIDs, and at most this
# many characters (UIDs and separators): an explicit VR UI value has a 16-bit length.
_MAX_LIST_CHARS: Final = 0xFFFE
_DRAIN_POLL: Final = 0.05  # how often a drain looks whether the operations are done
# When stopping, how long operations cut short have to send their final (failure)
# response, and how long after its last answer a viewer has to release its association,
# before what is still open is aborted (see DicomNode.stop).
_LEAVE: Final = 1.0
_STOP_POLL: Final = 0.01
# Seconds beyond the node's timeout that a viewer may be silent between messages (it
# waits on us while we wait on the agent), and that any peer, a viewer or a C-MOVE
# destination, may stall in the middle of a PDU or stop taking what we send before its
# connection is ended (contexts.bounded_stalls): a hung peer must not hold a connection
# thread and an association slot for ever.
STALL_SLACK: Final = 60.0
MAX_RESUMES: Final = 32  # resumes of one retrieve that got a stream, whatever the window
_RESUME_PAUSE: Final = (0.1, 2.0)  # first and longest pause between attempts to reopen
PROBE_TIMEOUT: Final = 10.0  # at most this long to find a C-MOVE destination down
_DESTINATION_LOST: Final = "move destination stopped answering"
# After a viewer's C-CANCEL, a C-STORE to a C-MOVE destination still unanswered this long
# is cut (see _SubOps.cancelled): a destination answers in milliseconds, a large
# instance over a slow network in seconds.
_CUT_AFTER: Final = 2.0


class CachedInstanceItem(Protocol):
    """One instance the local cache will serve: its identity and a reader of its bytes."""

    @property
    def sop_class(self) -> str: ...
    @property
    def sop_instance(self) -> str: ...
    @property
    def transfer_syntax(self) -> str: ...
    @property
    def read(self) -> Any: ...


class LocalCache(Protocol):
    """What the node asks of the workstation's cache (relay.workstation.cache.serve)."""

    def offline(self) -> bool: ...
    def plan(self, identifier: Dataset) -> Sequence[CachedInstanceItem] | None: ...
    def find(self, identifier: Dataset) -> list[Dataset]: ...


def _status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment and code not in (st.SUCCESS, st.PENDING, st.CANCEL):
        ds.ErrorComment = comment[:64]  # LO
    return ds


def _retrieve_end(code: int, comment: str = "") -> Dataset:
    """The status of a C-GET's or C-MOVE's final response, Cancel aside: without Number
    of Remaining Sub-operations, which a Warning, Failure or Success shall not contain
    (PS3.4 C.4.2.1.6, C.4.3.1.5). pynetdicom's final keeps the value of its last
    pending response unless the handler's status clears it (None: left out)."""
    ds = _status(code, comment)
    ds.NumberOfRemainingSuboperations = None
    return ds


def _failed_list(uids: Iterable[str], limit: int) -> Dataset:
    """The identifier of a final response: the failed UIDs, once each, the first `limit`
    (and `_MAX_LIST_CHARS`): the counts say how many failed, the list cannot always."""
    kept: dict[str, None] = {}
    chars = 0
    for uid in uids:
        if uid in kept:
            continue
        if len(kept) >= limit or chars + len(uid) + 1 > _MAX_LIST_CHARS:
            break
        kept[uid] = None
        chars += len(uid) + 1
    ds = Dataset()
    ds.FailedSOPInstanceUIDList = list(kept)
    return ds


class _SubOps:
    """What pynetdicom did with the instances a C-GET or C-MOVE handler yielded.

    pynetdicom sends each as a C-STORE sub-operation and tells the handler nothing, and it
    lists the failed ones in the final response only when the handler's final carries no
    list; ours always does (the agent's failures), so it must hold these too (PS3.4
    C.4.2.1.4.2, C.4.3.1.3.2). Its pending response after each sub-operation carries its
    count of failures, and is sent on the handler's thread before the handler resumes
    (DicomNode._on_sent sets `reported`): one more than before means the instance last
    yielded failed.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.reported = 0  # pynetdicom's count of failed sub-operations
        self._counted = 0
        self.failed: list[str] = []  # the first `limit` that failed here
        self.in_flight: str | None = None  # yielded, pynetdicom has not resumed us yet
        self._yields = 0
        self.destination: Any = None  # a C-MOVE's association with its destination
        # The retrieve ends in Cancel before any count of its sub-operations was known:
        # how many remain is unknown, so its Cancel response must not say (_on_sent).
        self.remaining_unknown = False

    def yielded(self, uid: str) -> None:
        self.in_flight = uid
        self._yields += 1

    def settle(self) -> bool:
        """Once the handler resumes: whether the instance it yielded last failed."""
        uid, self.in_flight = self.in_flight, None
        if uid is None or self.reported <= self._counted:
            return False
        self._counted = self.reported
        if len(self.failed) < self.limit:
            self.failed.append(uid)
        return True

    def none_completed(self, yielded: int) -> bool:
        """Whether none of the `yielded` sub-operations completed: each one failed
        (pynetdicom's count of failures, once every one has been settled)."""
        return yielded <= self.reported

    def destination_opened(self, event: Any) -> None:
        """EVT_CONN_OPEN of the association pynetdicom opens to a C-MOVE destination."""
        self.destination = event.assoc

    def destination_lost(self) -> bool:
        """Whether that association is over: every later sub-operation would fail at once
        (pynetdicom aborts it when a C-STORE gets no answer within the node's timeout)."""
        return self.destination is not None and not self.destination.is_established

    def cancelled(self) -> None:
        """The viewer cancelled: a C-STORE to the destination still unanswered
        `_CUT_AFTER` seconds later is cut (pynetdicom would wait for its answer up to the
        node's timeout before it looks at the C-CANCEL). One answered by then counts as
        it should: it arrived."""
        if self.in_flight is None or self.destination is None:
            return
        timer = threading.Timer(_CUT_AFTER, self._cut_stalled_store, args=(self._yields,))
        timer.daemon = True
        timer.start()

    def _cut_stalled_store(self, ticket: int) -> None:
        """End pynetdicom's wait for the answer to the C-STORE yielded as `ticket`.

        The (None, None) its DIMSE queue gets when the peer aborts ends that wait now:
        pynetdicom then aborts the association itself, and the sub-operation fails
        (counted and listed). (An abort from here would not do: it restarts the
        association's reactor, which may take that (None, None) first.)
        """
        assoc = self.destination
        if ticket != self._yields or self.in_flight is None or not assoc.is_established:
            return
        log.info("viewer cancelled; cutting the unanswered C-STORE to the move destination")
        with contextlib.suppress(Exception):
            assoc.dimse.msg_queue.put((None, None))


class DicomNode:
    """The local DICOM node of the workstation; `await start()`, `await stop()`."""

    def __init__(
        self,
        open_stream: OpenStream,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        listen: str | tuple[str, int] = ("127.0.0.1", 11112),
        ae_title: str = "RELAY",
        destinations: Mapping[str, str | tuple[str, int]] | None = None,
        max_associations: int = 8,
        timeout: float = 120.0,
        stats: DicomStats | None = None,
        limits: DicomLimits | None = None,
        headers: Mapping[str, str] | None = None,
        resume_window: float = RESUME_WINDOW,
        cache: LocalCache | None = None,
        offer: CodecOffer | None = None,
        admit: Admit | None = None,
    ) -> None:
        """`timeout` bounds every wait on the agent (a silent agent fails the operation
        after that long) and on the viewer; `headers` are added to each stream's headers;
        `resume_window` bounds how long a retrieve whose stream broke waits for a new one
        (0 disables resuming); `offer`: the pixel codecs to announce (the workstation's,
        shared with its other paths); `admit(peer, local)`: whether a viewer's connection
        may be served (called on its connection's thread; False ends it before its
        association is read)."""
        self.admit = admit
        if not 0 <= resume_window <= MAX_RESUME_WINDOW:
            raise ValueError(f"resume_window must be 0-{MAX_RESUME_WINDOW:.0f} s")
        self.resume_window = resume_window
        self.cache = cache
        self.offer = offer or CodecOffer()
        self.offer.load()  # now, not in the viewer's first request (numpy: ~60 ms)
        rawds.install()
        if not 1 <= len(ae_title.strip()) <= 16:
            raise ValueError("dicom.ae_title must be 1 to 16 characters")
        if max_associations < 1:
            raise ValueError("max_associations must be at least 1")
        self.open_stream = open_stream
        self._loop = loop
        self.listen = contexts.parse_address(listen, "dicom.listen")
        self.ae_title = ae_title.strip()
        self.destinations = {
            k.strip(): contexts.parse_address(v, f"dicom.destinations.{k}")
            for k, v in (destinations or {}).items()
        }
        self.max_associations = max_associations
        self.timeout = timeout
        self.stats: DicomStats = stats or NullStats()
        self.limits = limits or DicomLimits()
        self.codec = MessageCodec(self.limits, stats=self.stats, accept_pixels=True)
        self.headers = {
            HEADER_TARGET: TARGET_DICOM,
            HEADER_DICOM_VERSION: str(VERSION),
            **(headers or {}),
        }
        self._ae: AE | None = None
        self._server: Any = None
        # Every association open (viewers', C-MOVE destinations', the destination check's),
        # ended at stop whatever the peer does; a new one per start (it ends closed).
        self._open = OpenAssociations()
        self._listening = False  # until drain() closes the listener
        # The sessions of running operations, for stop(); a session leaves the set when
        # its handler lets go of it (no callback from the session back into the node).
        self._sessions: weakref.WeakSet[Session] = weakref.WeakSet()
        self._sessions_lock = threading.Lock()
        # The viewers' requests not yet finally answered, per association (for drain()):
        # from pynetdicom's receipt of the request to its sending of the last response.
        self._requests: dict[Any, set[int]] = {}
        # When each association's last request was finally answered (time.monotonic()),
        # and when the drain began: who stop() gives a moment to release.
        self._answered: dict[Any, float] = {}
        self._draining_since: float | None = None
        self._stopping = False  # a request that comes now is answered with a failure
        # The C-GET and C-MOVE handlers running, by (viewer association, message ID): what
        # pynetdicom's responses say of their sub-operations (see _SubOps).
        self._subops: dict[tuple[Any, int], _SubOps] = {}

    # -- lifecycle ----------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """Where the node listens (the real port once started, if 0 was asked)."""
        if self._server is None:
            return self.listen
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "DicomNode not started"
        return self._loop

    async def start(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._draining_since = None
        self._open = OpenAssociations()
        contexts.prepare_pynetdicom()
        ae = AE(ae_title=self.ae_title)
        ae.maximum_associations = self.max_associations
        ae.maximum_pdu_size = 0
        ae.acse_timeout = ae.dimse_timeout = ae.connection_timeout = self.timeout
        ae.network_timeout = self.timeout + STALL_SLACK  # silent while we wait on the agent
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._admit),  # first: nothing is read from a refused one
            contexts.NODELAY,
            contexts.bounded_stalls(ae.network_timeout),
            (evt.EVT_DIMSE_RECV, self._on_dimse),
            (evt.EVT_DIMSE_SENT, self._on_sent),
            (evt.EVT_ABORTED, self._ended),
            (evt.EVT_RELEASED, self._ended),
            (evt.EVT_CONN_CLOSE, self._ended),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_GET, self._on_get),
            (evt.EVT_C_MOVE, self._on_move),
            (evt.EVT_C_STORE, self._on_store),
            *self._open.handlers(),
        ]
        self._ae = ae
        move_check.register(ae, self._check_move)
        supported = contexts.scp_contexts(
            storage_role_selection=True, extra=list(contexts.MODELS.values())
        )
        self._server = await asyncio.to_thread(  # Windows: a port no other process shares
            start_exclusive_server, ae, self.listen, evt_handlers=handlers, contexts=supported
        )
        self._listening = True
        announce("dicom", self.address, ae_title=self.ae_title)

    def _admit(self, event: Any) -> None:
        """EVT_CONN_OPEN of a viewer's connection: one `admit` refuses is shut down at
        once, so pynetdicom ends it (PS3.8 Evt17) without reading its A-ASSOCIATE-RQ."""
        if self.admit is None:
            return
        raw = getattr(getattr(getattr(event.assoc, "dul", None), "socket", None), "socket", None)
        if not isinstance(raw, socket.socket):
            return
        try:
            peer, local = raw.getpeername()[:2], raw.getsockname()[:2]
            admitted = self.admit((str(peer[0]), int(peer[1])), (str(local[0]), int(local[1])))
        except OSError:  # gone already
            admitted = False
        if not admitted:
            with contextlib.suppress(OSError):
                raw.shutdown(socket.SHUT_RDWR)

    async def drain(self, grace: float) -> None:
        """Stop as a drain should: refuse new associations at once, let the requests
        already received run to their last response within `grace` seconds, then stop
        (which aborts what is left). The relay session must still take streams meanwhile:
        a retrieval may need to resume, a viewer to send its next request."""
        server = self._server if self._listening else None
        self._listening = False
        if self._draining_since is None:
            self._draining_since = time.monotonic()
        if server is not None:
            await asyncio.to_thread(server.shutdown)  # the listener; associations stay
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, grace)
        # Polled: the count changes on pynetdicom's threads, which stay free of loop calls.
        while self.requests_open() and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(_DRAIN_POLL)
        left = self.requests_open()
        if left:
            log.warning("drain grace over: aborting %d DICOM operations", left)
        await self.stop()

    def requests_open(self) -> int:
        """Viewers' requests received and not yet finally answered."""
        with self._sessions_lock:
            self._forget_ended()
            return sum(len(ids) for ids in self._requests.values())

    def _forget_ended(self) -> None:
        """(With `_sessions_lock` held.) Drop the associations that are over."""
        for assoc in [a for a in self._requests if not a.is_established]:
            del self._requests[assoc]
            self._answered.pop(assoc, None)

    async def stop(self) -> None:
        """End every operation now, then every association (drain() first waits for the
        operations).

        The operations still running are cut short and answered with a failure; the
        associations are aborted only once those answers are sent and their viewers have
        had `_LEAVE` seconds after their last answer to release, as a viewer does after
        its answer: an A-ABORT sent with (or just after) an answer collides with the
        viewer's A-RELEASE-RQ, and pynetdicom's SCU then waits its whole ACSE timeout for
        a release reply that never comes (its reactor takes the A-ABORT that its
        release() waits for). A viewer idle since before the drain is aborted at once, an
        operation that does not answer within `_LEAVE` too.
        """
        self._stopping = True
        started = time.monotonic()
        since = started if self._draining_since is None else self._draining_since
        self._abort_sessions()
        if self._ae is None:
            return
        while self._leaving(since, started):  # noqa: ASYNC110 (pynetdicom's threads)
            await asyncio.sleep(_STOP_POLL)
        self._abort_sessions()
        ae, self._ae = self._ae, None
        server = self._server if self._listening else None  # (drain() closed it before)
        self._server, self._listening = None, False
        await asyncio.to_thread(self._end_associations, ae, server)

    def _end_associations(self, ae: AE, server: Any) -> None:
        """Stop listening, then end every association still open within about
        `ending.ABORT_LINGER` + `STOP_JOIN` seconds, whatever its peer does (blocking).

        Not pynetdicom's `ae.shutdown()`: it aborts one association after another, each
        waiting for its DUL thread to go idle, and a DUL thread blocked on the socket of a
        hung viewer or destination (a PDU cut short, a send it no longer reads: sockets
        pynetdicom leaves without a timeout) never does; those threads are not daemons,
        so they held the workstation's exit too."""
        if server is not None:
            server.shutdown()
        ended = self._open.end_all()
        for assoc in ae.active_associations:  # accepted as the listener closed: not yet held
            cut(assoc)
        if ended:
            log.info("ended %d DICOM associations still open at stop", ended)

    def _abort_sessions(self) -> None:
        with self._sessions_lock:
            sessions = list(self._sessions)
        for s in sessions:
            s.abort_now()

    def _leaving(self, since: float, started: float) -> bool:
        """Whether stop() still waits: for an operation to send its final answer (until
        `_LEAVE` after `started`), or for a viewer answered since `since` to release
        (until `_LEAVE` after that answer, at most `2 * _LEAVE` after `started`)."""
        now = time.monotonic()
        with self._sessions_lock:
            self._forget_ended()
            for assoc, ids in self._requests.items():
                if ids:
                    if now < started + _LEAVE:
                        return True
                    continue
                answered = self._answered.get(assoc)
                if answered is None or answered < since:
                    continue  # idle since before the drain: aborted at once
                if now < min(answered + _LEAVE, started + 2 * _LEAVE):
                    return True
        return False

    async def __aenter__(self) -> DicomNode:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- sessions -----------------------------------------------------------------

    def _kept(self, *handlers: Any) -> list[Any]:
        """The event handlers of an association the node requests (to a C-MOVE
        destination): `handlers`, and the node's hold on it (ended at stop)."""
        stalls = contexts.bounded_stalls(self.timeout + STALL_SLACK)
        pause = (evt.EVT_CONN_OPEN, checkpoint.install)  # its C-STORE answers never stolen
        return [contexts.NODELAY, stalls, pause, *handlers, *self._open.handlers()]

    def _session(
        self,
        request: Request,
        *,
        follow: Sequence[Message] = (),
        open_timeout: float | None = None,
    ) -> Session:
        session = Session(
            self.loop,
            self.open_stream,
            {**self.offer.header(), **self.headers},
            request,
            self.codec,
            open_timeout=self.timeout if open_timeout is None else open_timeout,
            follow=follow,
        )
        with self._sessions_lock:
            self._sessions.add(session)
        if self._stopping:  # answered at once with a failure; no stream is opened
            session.abort_now()
        else:
            session.start()
        return session

    def _unary(self, request: Request) -> FinalResponse:
        """A request with one final answer (echo, store), from a handler thread."""
        session = self._session(request)
        try:
            return session.next_final(self.timeout)
        except SessionEnded as exc:
            return FinalResponse(exc.status, exc.reason)
        finally:
            session.close()

    # -- handlers (pynetdicom threads) --------------------------------------------

    def _on_dimse(self, event: Any) -> None:
        """A viewer's request: count it open (for drain). Its C-CANCEL: wake the handlers
        waiting on the agent (they check whose)."""
        command = getattr(event.message, "command_set", None)
        if command is None:
            return
        field = command.get("CommandField")
        if field == _C_CANCEL:
            with self._sessions_lock:
                key = (event.assoc, command.get("MessageIDBeingRespondedTo"))
                subops = self._subops.get(key)
            if subops is not None:
                subops.cancelled()
            self._wake(event)
        elif field in _REQUESTS and event.assoc.is_acceptor:
            with self._sessions_lock:
                self._requests.setdefault(event.assoc, set()).add(int(command.MessageID))

    def _on_sent(self, event: Any) -> None:
        """Our last response to a viewer's request (not Pending): no longer open."""
        command = getattr(event.message, "command_set", None)
        if command is None:
            return
        field = command.get("CommandField")
        if not isinstance(field, int) or not field & _RESPONSE:
            return
        if field in _RETRIEVE_RESPONSES and command.get("Status") in _PENDING:
            self._count_failed(event.assoc, command)
            return
        if field in _RETRIEVE_RESPONSES and command.get("Status") == st.CANCEL:
            self._unknown_remaining(event.assoc, event.message)
        if (field & ~_RESPONSE) not in _REQUESTS or command.get("Status") in _PENDING:
            return
        with self._sessions_lock:
            ids = self._requests.get(event.assoc)
            if ids is not None:
                ids.discard(int(command.MessageIDBeingRespondedTo))
                self._answered[event.assoc] = time.monotonic()

    def _count_failed(self, assoc: Any, command: Dataset) -> None:
        """A pending C-GET/C-MOVE response: pynetdicom's count of failed sub-operations."""
        with self._sessions_lock:
            subops = self._subops.get((assoc, command.get("MessageIDBeingRespondedTo")))
        failed = command.get("NumberOfFailedSuboperations")
        if subops is not None and isinstance(failed, int):
            subops.reported = failed

    def _unknown_remaining(self, assoc: Any, message: Any) -> None:
        """A C-GET's or C-MOVE's Cancel response, about to be encoded: without Number of
        Remaining Sub-operations when the retrieve never learnt how many there are.

        pynetdicom's Cancel always says its own count, which is then the one notional
        sub-operation the handler announced (_Retrieval step 3), not the true number
        (PS3.4 C.4.2.1.6, C.4.3.1.5: in a Cancel response it may be left out). EVT_DIMSE_SENT
        comes after the command set is built and before it is encoded, the only place
        it can still be changed."""
        command = message.command_set
        with self._sessions_lock:
            subops = self._subops.get((assoc, command.get("MessageIDBeingRespondedTo")))
        if subops is None or not subops.remaining_unknown:
            return
        if "NumberOfRemainingSuboperations" in command:
            del command.NumberOfRemainingSuboperations
            message._set_command_group_length()  # pynetdicom 3.0's (pinned <3.1)

    @contextlib.contextmanager
    def _tracking(self, event: Any) -> Iterator[_SubOps]:
        """The sub-operations of a C-GET or C-MOVE, followed while its handler runs."""
        subops = _SubOps(self.limits.max_list)
        key = (event.assoc, int(event.request.MessageID))
        with self._sessions_lock:
            self._subops[key] = subops
        try:
            yield subops
        finally:
            with self._sessions_lock:
                if self._subops.get(key) is subops:
                    del self._subops[key]

    def _ended(self, event: Any) -> None:
        """A viewer's association ended: nothing more to answer on it; wake its handlers."""
        with self._sessions_lock:
            self._requests.pop(event.assoc, None)
            self._answered.pop(event.assoc, None)
            for key in [k for k in self._subops if k[0] is event.assoc]:
                del self._subops[key]
        self._wake(event)

    def _wake(self, event: Any) -> None:
        """Some viewer cancelled or left: every waiting handler looks whether it was its own."""
        with self._sessions_lock:
            sessions = list(self._sessions)
        for session in sessions:
            session.wake()

    def _on_echo(self, event: Any) -> Dataset:
        started = time.monotonic()
        final = self._unary(Request(op="echo", calling_ae=_calling(event)))
        code = st.for_echo(final.status)
        self.stats.operation_done("echo", code, time.monotonic() - started)
        return _status(code, final.comment)

    def _on_store(self, event: Any) -> Dataset:
        """An upload from the viewer, forwarded to the PACS."""
        started = time.monotonic()
        req = event.request
        ts = str(event.context.transfer_syntax)
        data = req.DataSet.getvalue()
        sop_class, sop_instance = str(req.AffectedSOPClassUID), str(req.AffectedSOPInstanceUID)
        if len(data) > self.limits.max_dataset:
            final = FinalResponse(st.STORE_OUT_OF_RESOURCES, "dataset larger than the relay limit")
        else:
            try:
                rawds.check_instance(data, ts, sop_class, sop_instance)
            except rawds.MalformedDataset as exc:
                final = FinalResponse(_store_refusal(exc), f"malformed dataset: {exc}")
            else:
                final = self._unary(
                    Request(
                        op="store",
                        transfer_syntax=ts,
                        dataset=data,
                        sop_class=sop_class,
                        sop_instance=sop_instance,
                        priority=int(req.Priority or 0),
                        move_originator_ae=str(
                            req.MoveOriginatorApplicationEntityTitle or ""
                        ).strip()[:16],
                        move_originator_id=req.MoveOriginatorMessageID,
                        calling_ae=_calling(event),
                    )
                )
        code = st.for_store(final.status)
        self.stats.operation_done("store", code, time.monotonic() - started)
        return _status(code, final.comment)

    def _check_move(self, request: Any) -> move_check.Refusal | None:
        """Before a C-MOVE starts: refuse it if its destination is known but down."""
        name = str(request.MoveDestination or "").strip()
        destination = self.destinations.get(name)
        if destination is None:
            return None  # unknown: the handler answers 0xA801
        started = time.monotonic()
        why = move_check.probe(
            self.ae_title,
            name,
            destination,
            min(self.timeout, PROBE_TIMEOUT),
            handlers=self._open.handlers(),
        )
        if why is None:
            return None
        host, port = destination
        log.warning("C-MOVE refused: destination %s at %s:%d %s", name, host, port, why)
        code = st.MOVE_DESTINATION_UNREACHABLE
        self.stats.operation_done("move", code, time.monotonic() - started)
        return move_check.Refusal(code, f"move destination {name} at {host}:{port} {why}")

    def _request_for(self, event: Any, op: str) -> Request | Dataset:
        key = contexts.model_key(str(event.request.AffectedSOPClassUID))
        if key is None:
            return _status(0x0122 if op == "find" else st.RELAY_UNSUPPORTED,
                           "unsupported query model")  # fmt: skip
        identifier = event.request.Identifier
        data = identifier.getvalue() if identifier is not None else b""
        return Request(
            op=op,  # type: ignore[arg-type]
            root=key[0],  # type: ignore[arg-type]
            transfer_syntax=str(event.context.transfer_syntax),
            dataset=data,
            priority=int(event.request.Priority or 0),
            calling_ae=_calling(event),
        )

    def _on_find(self, event: Any) -> Iterator[tuple[Dataset | int, Dataset | None]]:
        started = time.monotonic()
        request = self._request_for(event, "find")
        if isinstance(request, Dataset):
            yield request, None
            return
        if self.cache is not None and self.cache.offline():
            yield from self._find_in_cache(event, started)
            return
        session = self._session(request)
        waiter = _Waiter(session, event, self.timeout)
        code = st.SUCCESS
        try:
            while True:
                msg = waiter.next()
                if isinstance(msg, FinalResponse):
                    code = msg.status
                    if waiter.cancelled and _ok(code):
                        # The matches that came after the viewer's C-CANCEL were dropped:
                        # Success would claim a complete result set (PS3.4 C.4.1.3.1).
                        code = st.CANCEL
                    yield _status(code, msg.comment), None
                    return
                if isinstance(msg, Pending) and msg.dataset:
                    if waiter.cancelled:
                        continue  # the viewer no longer wants matches; wait for the end
                    try:
                        match = rawds.decode_dataset(msg.dataset, msg.transfer_syntax)
                    except Exception as exc:
                        code = st.RELAY_PROTOCOL
                        yield _status(code, f"bad match from the agent: {exc}"), None
                        return
                    yield msg.status, match  # the PACS's: 0xFF01 with a warning
                elif isinstance(msg, Instance):
                    code = st.RELAY_PROTOCOL
                    yield _status(code, "unexpected instance in a C-FIND"), None
                    return
        except SessionEnded as exc:
            code = exc.status
            yield _status(exc.status, waiter.reason(exc)), None
        finally:
            session.close()
            self.stats.operation_done("find", code, time.monotonic() - started)

    def _find_in_cache(self, event: Any, started: float) -> Iterator[Any]:
        """The link is down: answer from the cache's index, and say so in the log.

        The viewer's C-CANCEL is looked for before each match (pynetdicom leaves that to
        the handler): the answer is then Cancel, with no more matches."""
        assert self.cache is not None
        code = 0xC000
        try:
            try:
                found = self.cache.find(event.identifier)
            except Exception as exc:
                log.error("C-FIND from the cache failed: %s", type(exc).__name__)
                yield _status(code, "relay link down; cache query failed"), None
                return
            log.info("C-FIND answered from the cache (relay link down): %d matches", len(found))
            for n, match in enumerate(found):
                if event.is_cancelled:
                    log.info("viewer cancelled after %d of %d cached matches", n, len(found))
                    code = st.CANCEL
                    yield _status(code), None
                    return
                yield 0xFF00, match
            code = st.SUCCESS
            yield _status(code), None
        finally:
            self.stats.operation_done("find", code, time.monotonic() - started)

    def _cached(self, event: Any) -> Sequence[CachedInstanceItem] | None:
        if self.cache is None:
            return None
        try:
            return self.cache.plan(event.identifier)
        except Exception as exc:  # a cache fault must never cost the viewer its images
            log.error("cache lookup failed (%s); using the network", type(exc).__name__)
            return None

    def _serve_cached(
        self,
        event: Any,
        items: Sequence[CachedInstanceItem],
        destination: tuple[str, int] | None,
        subops: _SubOps,
    ) -> Iterator[Any]:
        """A complete, verified study from the cache: the PACS's bytes, at disk speed.

        The viewer's C-CANCEL is looked for before each instance (pynetdicom leaves that to
        the handler): the answer is then Cancel, with pynetdicom's counts (those not sent
        are Remaining) and its list of the sub-operations that failed (PS3.4 C.4.2.3.1,
        C.4.3.3.1). So is the node's stopping (no session tells this handler): the answer
        is then the failure every operation cut short gets, the instances not sent
        counted and listed as failed; and a C-MOVE destination gone (see _SubOps).
        """
        started = time.monotonic()
        op = "move" if destination else "get"
        limit = self.limits.max_list
        if destination is not None:
            cxs = contexts.storage_proposals(
                list(dict.fromkeys(i.sop_class for i in items)),
                list(dict.fromkeys(i.transfer_syntax for i in items)),
            )
            yield (
                destination[0],
                destination[1],
                {
                    "contexts": cxs,
                    "evt_handlers": self._kept((evt.EVT_CONN_OPEN, subops.destination_opened)),
                },
            )
        # pynetdicom stops asking for more after a final status, or when the viewer (or the
        # C-MOVE destination) is gone: the metrics then count what was set last.
        code = st.MOVE_DESTINATION_UNREACHABLE if destination else st.LINK_LOST
        sent = 0
        try:
            yield len(items)
            code = st.LINK_LOST
            for n, item in enumerate(items):
                lost = subops.settle() and subops.destination_lost()
                unsent = (i.sop_instance for i in items[n:])
                if event.is_cancelled:
                    log.info("viewer cancelled after %d of %d cached instances", n, len(items))
                    code = st.CANCEL
                    yield _status(code), None
                    return
                if self._stopping or lost:
                    code = st.MOVE_DESTINATION_UNREACHABLE if lost else st.LINK_LOST
                    why = _DESTINATION_LOST if lost else STOPPING_REASON
                    log.warning("cached %s stopped after %d of %d instances: %s",
                                op, n, len(items), why)  # fmt: skip
                    yield (
                        _retrieve_end(code, why),
                        _failed_list(itertools.chain(subops.failed, unsent), limit),
                    )
                    return
                try:
                    data = item.read()
                except Exception as exc:
                    log.error("cache file unreadable while serving (%s)", type(exc).__name__)
                    none = subops.none_completed(sent)  # then a failure: PS3.4 C.4.3.3.1
                    code = st.SUBOPS_FAILED if none else st.WARNING_SUBOPS
                    yield (
                        _retrieve_end(code, "cache file damaged while serving"),
                        _failed_list(itertools.chain(subops.failed, unsent), limit),
                    )
                    return
                self.stats.instance_relayed(len(data))
                sent += 1
                subops.yielded(item.sop_instance)
                yield (
                    0xFF00,
                    rawds.EncodedDataset(
                        item.sop_class, item.sop_instance, item.transfer_syntax, data
                    ),
                )
            subops.settle()
            code = st.WARNING_SUBOPS if subops.reported else st.SUCCESS
        finally:
            elapsed = time.monotonic() - started
            log.info("%s of %d of %d instances served from the cache in %.3f s",
                     op, sent, len(items), elapsed)  # fmt: skip
            self.stats.operation_done(op, code, elapsed)

    def _on_get(self, event: Any) -> Iterator[Any]:
        request = self._request_for(event, "retrieve")
        if isinstance(request, Dataset):
            yield 1
            yield request, None
            return
        cached = self._cached(event)
        with self._tracking(event) as subops:
            if cached:
                yield from self._serve_cached(event, cached, None, subops)
                return
            yield from _Retrieval(self, event, request, None, subops).run()

    def _on_move(self, event: Any) -> Iterator[Any]:
        dest_name = str(event.move_destination or "").strip()
        destination = self.destinations.get(dest_name)
        if destination is None:
            log.warning("C-MOVE to unknown destination %r refused", dest_name)
            self.stats.operation_done("move", st.MOVE_DESTINATION_UNKNOWN, 0.0)
            yield None, None  # pynetdicom answers 0xA801 Move Destination Unknown
            return
        request = self._request_for(event, "retrieve")
        if isinstance(request, Dataset):
            yield (
                destination[0],
                destination[1],
                {"contexts": [build_context(Verification)], "evt_handlers": self._kept()},
            )
            yield 1
            yield request, None
            return
        cached = self._cached(event)
        with self._tracking(event) as subops:
            if cached:
                yield from self._serve_cached(event, cached, destination, subops)
                return
            yield from _Retrieval(self, event, request, destination, subops).run()


def _store_refusal(exc: rawds.MalformedDataset) -> int:
    """A C-STORE refused for its dataset: 0xA900 if the dataset is of another SOP class
    than the command names, 0xC000 (cannot understand) otherwise (PS3.4 B.2.3)."""
    if isinstance(exc, rawds.SopClassMismatch):
        return st.STORE_DATASET_MISMATCH
    return st.STORE_CANNOT_UNDERSTAND


def _calling(event: Any) -> str:
    with contextlib.suppress(Exception):
        return str(event.assoc.requestor.ae_title).strip()[:16]
    return ""


class _Waiter:
    """Waits for the agent's next message while watching the viewer (cancel, abort, time)."""

    def __init__(self, session: Session, event: Any, timeout: float) -> None:
        self.session = session
        self.event = event
        self.timeout = timeout
        self.cancelled = False

    def check_cancel(self) -> bool:
        """True once the viewer has sent C-CANCEL; the first time, tell the agent."""
        if not self.cancelled and self.event.is_cancelled:
            log.info("viewer cancelled; cancelling at the agent")
            self.cancelled = True
            self.session.cancel()
        return self.cancelled

    def next(self) -> Any:
        idle_since = time.monotonic()
        while True:
            self.check_cancel()
            try:
                return self.session.next(_LOOK)
            except TimeoutError:
                pass
            now = time.monotonic()
            if not self.event.assoc.is_established:
                raise SessionEnded(st.LINK_LOST, "viewer association ended")
            if now - idle_since > self.timeout:
                raise SessionEnded(st.LINK_LOST, f"no response from the agent in {self.timeout}s")

    def reason(self, exc: SessionEnded) -> str:
        return self.session.error_reason or exc.reason


class _Retrieval:
    """The C-GET / C-MOVE handler body: counts first, then instances, then the end."""

    def __init__(
        self,
        node: DicomNode,
        event: Any,
        request: Request,
        destination: tuple[str, int] | None,
        subops: _SubOps,
    ) -> None:
        self.node = node
        self.subops = subops
        self.destination_lost = False  # a C-MOVE's destination went away mid-retrieve
        self.stopped = False  # the node stopped while a broken stream waited to resume
        self.event = event
        self.request = request
        self.destination = destination
        self.op = "move" if destination else "get"
        self.buffered: deque[Instance] = deque()
        self.total: int | None = None  # the PACS's count of sub-operations
        self.estimate: int | None = None  # the agent's survey, until the PACS says
        self.end: FinalResponse | None = None
        self.delivered = 0
        self.classes: dict[str, None] = {}
        self.syntaxes: dict[str, None] = {}
        self.seen: set[str] = set()  # every intact instance received: delivered or buffered
        self.resumes = 0  # resumes that got a stream (at most MAX_RESUMES)
        self.tries = 0  # attempts to resume, the pause between them growing with each
        self.unresumable = False  # more instances than max_skip: a break cannot resume
        self.resume_deadline: float | None = None  # set while a broken stream is replaced
        self.answered = False  # the agent has said something: the retrieve had begun
        # What the metrics count if pynetdicom closes us early (the viewer left, or the
        # destination of a C-MOVE refused pynetdicom's association): never success.
        self.code = st.LINK_LOST
        self.skipped: frozenset[str] = frozenset()  # what the current stream must not bring

    def run(self) -> Iterator[Any]:
        started = time.monotonic()
        waiter = _Waiter(self.node._session(self.request), self.event, self.node.timeout)
        try:
            yield from self._run(waiter)
        finally:
            waiter.session.close()
            self.node.stats.operation_done(self.op, self.code, time.monotonic() - started)

    def _take(self, waiter: _Waiter) -> None:
        """Read one message into our state."""
        try:
            msg = waiter.next()
        except SessionEnded as exc:
            if self._resume(waiter, exc):
                return
            if self.stopped:
                self.end = FinalResponse(st.LINK_LOST, STOPPING_REASON)
                return
            status = st.for_retrieve(exc.status, move=self.destination is not None)
            self.end = FinalResponse(status, waiter.reason(exc)[: self.node.limits.max_text])
            return
        self.answered = True
        if isinstance(msg, Instance):
            if msg.sop_instance in self.skipped:
                log.warning("instance the agent was told to skip; not delivered again")
                return
            self.resume_deadline = None  # progress: a later break gets a whole window
            if len(self.seen) < self.node.limits.max_skip:
                self.seen.add(msg.sop_instance)
            else:
                self.unresumable = True  # too many to list: a break can no longer resume
            self.buffered.append(msg)
            self.classes.setdefault(msg.sop_class, None)
            self.syntaxes.setdefault(msg.transfer_syntax, None)
        elif isinstance(msg, Pending):
            self.classes.update(dict.fromkeys(msg.sop_classes))
            self.syntaxes.update(dict.fromkeys(msg.transfer_syntaxes))
            counts = [c for c in (msg.remaining, msg.completed, msg.failed, msg.warning)
                      if c is not None]  # fmt: skip
            if msg.remaining is None:
                return
            if msg.estimate:
                self.estimate = sum(counts)
            elif self.total is None:
                self.total = sum(counts)
        elif isinstance(msg, FinalResponse):
            status = st.for_retrieve(msg.status, move=self.destination is not None)
            self.end = replace(msg, status=status)  # one pynetdicom sends as it should

    def _resume(self, waiter: _Waiter, exc: SessionEnded) -> bool:
        """After the stream broke: carry on over a new one if we may; False to give up.

        Returns once a new session is started (whether it works is seen on the next read),
        or with False when the break is not the relay's fault, the first stream never got
        an answer, the viewer cancelled or left, the node is stopping (`stopped`: the
        pause ends at once, for stop() gives an operation only `_LEAVE` to answer),
        everything announced is already here, or the resume window has passed.
        """
        node = self.node
        if exc.failed_codec:
            node.offer.distrust(exc.failed_codec)
        if exc.unopened and self.resumes:
            # The last resume found no stream (the link is down; the tunnel fails such
            # opens at once while it knows that): it carried nothing, so it used no try,
            # and an outage within resume_window is waited out however many tries it takes.
            self.resumes -= 1
        if (
            not exc.resumable
            or self.unresumable
            or node.resume_window <= 0
            or self.resumes >= MAX_RESUMES
        ):
            return False
        if not self.answered and not exc.failed_codec:
            return False  # never reached the agent: the tunnel already waited its own time
        if waiter.cancelled or (self.total is not None and len(self.seen) >= self.total):
            return False
        now = time.monotonic()
        if self.resume_deadline is None:
            self.resume_deadline = now + node.resume_window
            log.warning("retrieve interrupted (%s); resuming with %d instances already "
                        "received", exc.reason, len(self.seen))  # fmt: skip
        pause = min(_RESUME_PAUSE[1], _RESUME_PAUSE[0] * 2 ** min(self.tries, 8))
        while time.monotonic() < min(now + pause, self.resume_deadline):
            if waiter.check_cancel() or not self.event.assoc.is_established:
                return False
            if node._stopping:
                self.stopped = True
                return False
            time.sleep(_POLL)
        left = self.resume_deadline - time.monotonic()
        if left <= 0:
            log.warning("retrieve not resumed within %.0f s", node.resume_window)
            return False
        waiter.session.close()
        self.resumes += 1
        self.tries += 1
        self.skipped = frozenset(self.seen)
        waiter.session = node._session(
            replace(self.request, resume=True),
            follow=(Skip(tuple(self.skipped)),),
            open_timeout=min(left, node.timeout),
        )
        return True

    def _run(self, waiter: _Waiter) -> Iterator[Any]:
        depth = self.node.limits.queue_depth
        # 1. Learn how many sub-operations there will be (pynetdicom needs it up front).
        #    The PACS's own count comes with its first pending response, right after the
        #    first instance; the survey's estimate is only the fallback, since a study can
        #    grow between the survey and the retrieve.
        while self.total is None and self.end is None:
            self._take(waiter)
            if self.total is None and len(self.buffered) > depth:
                if self.estimate is not None:
                    self.total = max(self.estimate, len(self.buffered))
                else:
                    self.end = FinalResponse(st.NO_COUNTS, "the PACS gave no sub-operation counts")
        if self.total is None and self.end is not None:
            self.total = self._counted_by_final(self.end)
        # 2. For a C-MOVE, know the SOP classes and syntaxes before associating.
        if self.destination is not None:
            while (
                self.end is None and not self.buffered and not self.syntaxes and (self.total or 0)
            ):
                self._take(waiter)
            cxs = move_proposals(list(self.classes), list(self.syntaxes))
            opened = (evt.EVT_CONN_OPEN, self.subops.destination_opened)
            yield (
                self.destination[0],
                self.destination[1],
                {"contexts": cxs, "evt_handlers": self.node._kept(opened)},
            )
        # 3. A failure or cancel before any count: one notional sub-operation, so that
        #    pynetdicom sends our status instead of "Success, 0 sub-operations". A
        #    warning that counts nothing delivered nothing: a failure too (step 5's
        #    rule). The viewer's C-CANCEL wins over whatever the agent ended with, as in
        #    step 5. A cancel's response then leaves out how many remain (unknown, not 1).
        if not self.total:
            status = self._uncounted_status(waiter)
            if status != st.SUCCESS:
                end = self.end or FinalResponse(status)
                self.code = status
                self.subops.remaining_unknown = status == st.CANCEL
                yield 1
                yield (
                    _retrieve_end(status, end.comment),
                    _failed_list(end.failed_instances, self.node.limits.max_list),
                )
                return
            self.code = st.SUCCESS
            yield 0
            return
        if self.destination is not None:
            # pynetdicom associates with the destination now; if that fails it answers
            # 0xA801 and closes us here.
            self.code = st.MOVE_DESTINATION_UNREACHABLE
        yield self.total
        self.code = st.LINK_LOST
        # 4. Instances as they come; after a C-CANCEL, none, until the agent's end. The
        #    last announced instance waits for that end: pynetdicom closes the operation by
        #    itself once every announced sub-operation is done, so only while one is held
        #    back can a bad end, or more instances than announced, still be reported.
        overflow = False
        while not self.destination_lost:
            if waiter.check_cancel():
                self.buffered.clear()
            while self.buffered and self.delivered < self.total - 1:
                yield self._deliver(self.buffered.popleft())
                if self._lost_destination():
                    break
            if self.destination_lost:
                break
            if self.delivered + len(self.buffered) > self.total:
                overflow = True
                break
            if self.end is not None:
                break
            self._take(waiter)
        # 5. The end: never success unless everything announced was delivered. The list
        #    of failures: those here (at the viewer or destination), then the agent's.
        end = self.end or FinalResponse(st.WARNING_SUBOPS)
        failed = _failed_list(
            itertools.chain(self.subops.failed, end.failed_instances), self.node.limits.max_list
        )
        if waiter.check_cancel() or end.status == st.CANCEL:
            self.code = st.CANCEL
            yield _status(st.CANCEL), failed
        elif self.destination_lost:
            self.code = st.MOVE_DESTINATION_UNREACHABLE
            waiter.session.cancel()  # the rest of the study would only be counted failed
            held = (i.sop_instance for i in self.buffered)
            yield (
                _retrieve_end(self.code, _DESTINATION_LOST),
                _failed_list(itertools.chain(self.subops.failed, held), self.node.limits.max_list),
            )
        elif overflow:
            self.code = self._partial()
            yield _retrieve_end(self.code, "the PACS sent more instances than it announced"), failed
        elif self.buffered and self.delivered + len(self.buffered) == self.total:
            # Everything announced has arrived intact, whatever happened afterwards.
            self.code = st.SUCCESS
            yield self._deliver(self.buffered.popleft())
        elif _ok(end.status):
            self.code = self._partial()
            comment = end.comment or "fewer instances than announced"
            yield _retrieve_end(self.code, comment), failed
        else:
            self.code = end.status
            yield _retrieve_end(end.status, end.comment), failed

    def _uncounted_status(self, waiter: _Waiter) -> int:
        """The end of a retrieve with no sub-operations counted: Cancel once the viewer
        cancelled (PS3.4 C.4.2.1.6, C.4.3.1.5: a cancelled retrieve never ends in
        Success), the agent's failure, Failure for a warning that delivered nothing, and
        Success only for a PACS that found nothing to send."""
        end = self.end
        if waiter.check_cancel() or (end is not None and end.status == st.CANCEL):
            return st.CANCEL
        if end is None or (_ok(end.status) and not 0xB000 <= end.status <= 0xBFFF):
            return st.SUCCESS
        return st.SUBOPS_FAILED if _ok(end.status) else end.status

    def _counted_by_final(self, end: FinalResponse) -> int | None:
        """The sub-operations of a retrieve that ended before any count: the final's
        (success, or a failure or cancel that counts them: a PACS that sends no pending
        response), or None for a failure that counts nothing, which gets one notional
        sub-operation (step 3). What came meanwhile is delivered either way."""
        if _ok(end.status):
            done = [end.completed, end.failed, end.warning]
            return max(len(self.buffered), sum(c for c in done if c is not None))
        counts = [c for c in (end.remaining, end.completed, end.failed, end.warning) if c]
        if not counts or end.status == st.NO_COUNTS:
            return None
        return max(len(self.buffered), sum(counts))

    def _partial(self) -> int:
        """The status of a retrieve that ran but did not deliver everything announced:
        Warning if some sub-operation completed at the viewer (or destination), Failure
        (0xA702) if none did (PS3.4 C.4.2.3.1, C.4.3.3.1), whatever the PACS called it."""
        if self.subops.none_completed(self.delivered):
            return st.SUBOPS_FAILED
        return st.WARNING_SUBOPS

    def _lost_destination(self) -> bool:
        """Once pynetdicom resumes us after a sub-operation: True (and `destination_lost`)
        if it failed because the C-MOVE destination's association is over."""
        if self.subops.settle() and self.subops.destination_lost():
            log.warning("C-MOVE destination gone after %d of %d instances; "
                        "cancelling the retrieve", self.delivered, self.total)  # fmt: skip
            self.destination_lost = True
        return self.destination_lost

    def _deliver(self, inst: Instance) -> tuple[int, rawds.EncodedDataset]:
        self.subops.yielded(inst.sop_instance)
        self.delivered += 1
        self.node.stats.instance_relayed(len(inst.dataset))
        ds = rawds.EncodedDataset(
            inst.sop_class, inst.sop_instance, inst.transfer_syntax, inst.dataset
        )
        return 0xFF00, ds


def move_proposals(classes: Sequence[str], syntaxes: Sequence[str]) -> list[PresentationContext]:
    """The contexts a C-MOVE proposes to its destination, at most 128.

    What is known first: the survey's classes, or only the first instance's when the PACS
    gave counts and the agent surveyed nothing; every syntax for those. Then the common
    classes in what is left, their likeliest syntaxes first: the study may hold others
    (a screen capture, a report, a presentation state) that nobody listed. An instance
    whose class still has no context fails its own sub-operation (pynetdicom counts it
    and lists it in the Failed SOP Instance UID List; the final status is 0xB000). No
    second association is opened for it: a destination that serves one association at a
    time (storescp without --fork) would not answer it while the first is open.
    """
    known = contexts.storage_proposals(classes, syntaxes) if classes else []
    rest = [c for c in contexts.COMMON_STORAGE if c not in set(classes)]
    left = contexts.MAX_CONTEXTS - len(known)
    if left <= 0 or not rest:
        return known
    return known + contexts.storage_proposals(rest, syntaxes, budget=left)


def _ok(code: int) -> bool:
    """Success or warning: the operation ran; failure statuses (and cancel) are not ok."""
    return code == st.SUCCESS or 0xB000 <= code <= 0xBFFF or code == 0x0001
