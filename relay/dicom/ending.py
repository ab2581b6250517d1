"""Ending associations whatever the peer does, for both ends (the agent's with the PACS,
the workstation node's with viewers and C-MOVE destinations).

pynetdicom's A-ABORT waits for the peer to close the connection, up to its ARTIM timer,
and its A-RELEASE for the peer's answer as long; a connect it runs on the association's
DUL thread waits up to the connection timeout for a SYN the peer may never answer; and
its DUL threads are not daemons. So an association whose peer does not let go held the
thread that ended it, and the process's exit ("agent stopped", the radiologist closing
the workstation), that long. Here an abort gives the peer `ABORT_LINGER` to close, then
closes itself; `OpenAssociations` holds an owner's associations, those it requests from
their creation (`KeptAE`) and those it accepts from EVT_CONN_OPEN, so that its stop ends
all of them within a bound. Blocking calls: on a thread, never the loop.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.transport import T_CONNECT, AddressInformation, AssociationSocket

__all__ = [
    "ABORT_LINGER",
    "STOP_JOIN",
    "KeptAE",
    "OpenAssociations",
    "abort_within",
    "cut",
    "end_all",
    "idle",
]

# Seconds a peer has to close a connection after our A-ABORT (PS3.8 leaves the closing
# to it) before we shut the socket down ourselves.
ABORT_LINGER: Final = 0.5
# Seconds pynetdicom's threads of a closed connection get to end (they end at once once
# it is closed: a bound, not a wait).
STOP_JOIN: Final = 1.0
_STEP: Final = 0.01  # seconds between looks at pynetdicom's state while ending (as it does)


class _CuttableSocket(AssociationSocket):
    """pynetdicom's socket of an association we request, whose TCP connect can be cut.

    pynetdicom connects on the association's DUL thread (in state Sta1, before
    EVT_CONN_OPEN), blocking it up to `pacs.timeout` while the PACS leaves the SYN
    unanswered (its listen backlog full, a firewall that drops): a shutdown ends a
    connect under way at once (ECONNRESET), and a connect not yet begun once cut fails
    at once, through pynetdicom's own failed-connect path (Evt17)."""

    def __init__(self, assoc: Association, address: AddressInformation) -> None:
        self._cut_lock = threading.Lock()
        self._cut = False
        self._pending = True  # its connect has not ended (nor been given up)
        super().__init__(assoc, address=address)

    @property
    def pending(self) -> bool:
        """Whether its connect may yet run or is running (its thread then is no idle one)."""
        return self._pending

    def connect(self, primitive: T_CONNECT) -> None:
        with self._cut_lock:
            if self._cut and self.socket is not None:
                self.socket.close()  # pynetdicom's connect then fails at once (EBADF)
        try:
            super().connect(primitive)
        finally:
            self._pending = False

    def cut(self) -> None:
        """Shut the socket down, and fail a connect that has not begun (non-blocking). A
        connect that begins between its check and the syscall misses this shutdown:
        `end_all` cuts again until the association is idle."""
        with self._cut_lock:
            self._cut = True
            if self.socket is not None:
                with contextlib.suppress(OSError):
                    self.socket.shutdown(socket.SHUT_RDWR)

    def settle(self) -> None:
        """Its requester is done: the connect has ended, or will never run."""
        self._pending = False


class KeptAE(AE):
    """pynetdicom's AE whose requested association its `owners` hold from its creation
    (`_create_socket`, before pynetdicom starts its DUL thread and connects): holding it
    only from EVT_CONN_OPEN left a connect the PACS never answers out of their reach."""

    def __init__(self, ae_title: str, owners: Sequence[OpenAssociations]) -> None:
        super().__init__(ae_title=ae_title)
        self._owners = tuple(owners)
        self._assoc: Association | None = None

    def _create_socket(
        self, assoc: Association, address: AddressInformation, tls_args: Any
    ) -> AssociationSocket:
        sock = _CuttableSocket(assoc, address)
        sock.tls_args = tls_args
        self._assoc = assoc
        held = [owner.hold(assoc) for owner in self._owners]
        if not all(held):  # an owner has ended: it is not to connect
            sock.cut()
        return sock

    def requested(self) -> None:
        """(After `associate` returned or raised.) Its connect is over: owners let go of
        the association unless it is open (EVT_CONN_CLOSE lets go of that one), so they
        hold only what is open or being opened."""
        assoc = self._assoc
        if assoc is None:
            return
        sock = assoc.dul.socket
        if isinstance(sock, _CuttableSocket):
            sock.settle()
        if idle(assoc):
            for owner in self._owners:
                owner.discard(assoc)


def idle(assoc: Association) -> bool:
    """Whether nothing of the association holds the process: its connect is not pending
    and its connection is closed and its state machine idle (Sta1, or its DUL thread
    never ran or has ended). A connect runs in Sta1: that is no idle one."""
    dul = assoc.dul
    sock = dul.socket
    if isinstance(sock, _CuttableSocket) and sock.pending:
        return False
    return not dul.is_alive() or dul.state_machine.current_state == "Sta1"


def connecting(assoc: Association) -> bool:
    """Whether the association's TCP connect is pending (it sends nothing before it)."""
    sock = assoc.dul.socket
    return isinstance(sock, _CuttableSocket) and sock.pending


def cut(assoc: Association) -> None:
    """Shut the association's socket down, whatever its state: pynetdicom's reader sees
    the connection closed (PS3.8 Evt17) and its state machine goes idle; a pending
    connect fails (ECONNRESET), one not yet begun fails when it does. Non-blocking."""
    sock = assoc.dul.socket
    if isinstance(sock, _CuttableSocket):
        sock.cut()
        return
    raw = getattr(sock, "socket", None)
    if raw is not None:
        with contextlib.suppress(OSError):
            raw.shutdown(socket.SHUT_RDWR)


def _wait(done: Callable[[], bool], deadline: float) -> bool:
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(_STEP)
    return True


def _cut_until_idle(assoc: Association, deadline: float) -> bool:
    """Cut `assoc` until it is idle or `deadline` passes: a connect that began just after
    a cut (its socket not yet connecting, the shutdown a no-op) is met by the next."""

    def cut_idle() -> bool:
        if idle(assoc):
            return True
        cut(assoc)
        return False

    return _wait(cut_idle, deadline)


def _stop_threads(assocs: Sequence[Association], deadline: float) -> None:
    """Stop the DUL threads of associations whose state machine is idle (pynetdicom's
    `kill`, which returns at once then), within `deadline`."""
    for assoc in assocs:
        if _cut_until_idle(assoc, deadline):
            with contextlib.suppress(Exception):
                assoc.kill()


def abort_within(assoc: Association, linger: float = ABORT_LINGER) -> None:
    """A-ABORT `assoc` and have its connection closed within `linger` seconds (blocking):
    the PACS's own close if it comes, else ours (`cut`)."""
    end_all([assoc], linger)


def end_all(assocs: Sequence[Association], linger: float = ABORT_LINGER) -> None:
    """End every association in `assocs` within about `linger` + STOP_JOIN seconds
    (blocking), whatever the peer does: a pending connect cut at once, an A-ABORT to each
    that is established, `linger` for the peers to close, then `cut` what they left
    open."""
    for assoc in assocs:
        with contextlib.suppress(Exception):
            if connecting(assoc):
                cut(assoc)
            elif assoc.is_established:
                assoc.abort(block=False)  # queued for the DUL thread: returns at once
    _wait(lambda: all(map(idle, assocs)), time.monotonic() + linger)
    for assoc in assocs:
        if not idle(assoc):
            cut(assoc)
    _stop_threads(assocs, time.monotonic() + STOP_JOIN)


class OpenAssociations:
    """The associations of one owner (the agent's DICOM service, one operation) whose
    connection is open or being opened: those we request (`associate`) from their
    creation, before the TCP connect (one whose SYN a PACS never answers is here too),
    those we accept from EVT_CONN_OPEN; until their close: so that all of them can be
    ended at once. Holds only what is open or being opened (the owner's limits bound
    that); after `close()`, an association created or a connection opened is cut at
    once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: set[Association] = set()
        self._closed = False

    def handlers(self) -> list[tuple[Any, Callable[[Any], None]]]:
        """pynetdicom event handlers to pass to the associations to keep."""
        return [(evt.EVT_CONN_OPEN, self._opened), (evt.EVT_CONN_CLOSE, self._gone)]

    def hold(self, assoc: Association) -> bool:
        """Hold `assoc` (one being created); False if closed: it is then not to open."""
        with self._lock:
            if not self._closed:
                self._open.add(assoc)
            return not self._closed

    def discard(self, assoc: Association) -> None:
        """Let go of `assoc` (its connection has closed, or never opened)."""
        with self._lock:
            self._open.discard(assoc)

    def _opened(self, event: Any) -> None:
        if not self.hold(event.assoc):
            cut(event.assoc)

    def _gone(self, event: Any) -> None:
        self.discard(event.assoc)

    def held(self) -> list[Association]:
        """Those whose connection is still open (or whose threads still run)."""
        with self._lock:
            self._open = {a for a in self._open if not idle(a)}
            return list(self._open)

    def close(self) -> None:
        """Keep no more: a connection that opens from now on is cut at once."""
        with self._lock:
            self._closed = True

    def cut_requests(self) -> None:
        """`close()`, and cut the associations still being requested (non-blocking):
        their requester is waiting for an A-ASSOCIATE answer that may never come."""
        self.close()
        for assoc in self.held():
            if not assoc.is_established:
                cut(assoc)

    def end_all(self, linger: float = ABORT_LINGER) -> int:
        """`close()`, then end every association held (`end_all`, blocking, bounded);
        how many there were."""
        self.close()
        return self.end_held(linger)

    def end_held(self, linger: float = ABORT_LINGER) -> int:
        """End every association held now (`end_all`, blocking, bounded), holding on to
        those to come (a long-lived owner of short ones: the readiness C-ECHO's); how
        many there were."""
        assocs = self.held()
        end_all(assocs, linger)
        return len(assocs)
