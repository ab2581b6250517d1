"""pynetdicom's reactor pause, without its race (the C-STORE answers a C-MOVE lost).

pynetdicom (3.0.4) runs a reactor thread per association that takes DIMSE messages off
the association's queue. A `send_c_store` on another thread pauses it first: it clears
`_reactor_checkpoint` (an Event), then spins until `_is_paused`, and then waits for its
answer on the same queue. The reactor sets `_is_paused = True` just before it waits on
the checkpoint and False once the wait returns; when the checkpoint was still set at its
wait, the sender can see the stale True and go on while the reactor goes on to read the
queue. The reactor then takes the C-STORE-RSP ("Received unexpected C_STORE service
message") and the sender waits for it until its DIMSE timeout: a viewer's C-MOVE hangs
with instances to go (seen under load, about once in a few hundred C-MOVEs in the test
suite).

`Checkpoint` stands in for that Event on every association we request: the node's to
C-MOVE destinations and the agent's to the PACS (every `send_*` pauses the same way; a
C-FIND match taken so is lost). Its `clear()` returns only once the reactor is waiting on
it (or is the caller, or has ended), so that `_is_paused` is then true and stays so until
`set()`.
"""

from __future__ import annotations

import threading
from typing import Any, Final

__all__ = ["Checkpoint", "install"]

#: How often `clear()` looks whether the reactor has ended instead (seconds): the reactor
#: itself wakes it when it parks, so this only bounds a wait on a thread that died.
_LOOK: Final = 0.05


class Checkpoint:
    """The Event methods pynetdicom's Association uses (`set`, `clear`, `is_set`,
    `wait`), with a `clear()` that waits for `reactor` to park in `wait()`."""

    def __init__(self, reactor: threading.Thread) -> None:
        self._reactor = reactor
        self._cond = threading.Condition()
        self._flag = True
        self._parked = False  # the reactor is inside wait() with the flag clear

    def is_set(self) -> bool:
        with self._cond:
            return self._flag

    def set(self) -> None:
        with self._cond:
            self._flag = True
            self._cond.notify_all()

    def clear(self) -> None:
        """Clear, then return once the reactor waits (it cannot take a message now),
        or at once from the reactor itself (pynetdicom's own release on a timeout)."""
        with self._cond:
            self._flag = False
            if threading.current_thread() is self._reactor:
                return
            while not self._parked and self._reactor.is_alive() and not self._flag:
                self._cond.wait(_LOOK)

    def wait(self, timeout: float | None = None) -> bool:
        """The reactor's park: blocks while clear (pynetdicom calls it without a
        timeout); says to `clear()` that it is parked."""
        with self._cond:
            if self._flag:
                return True
            self._parked = True
            self._cond.notify_all()
            try:
                return self._cond.wait_for(lambda: self._flag, timeout)
            finally:
                self._parked = False


def install(event: Any) -> None:
    """EVT_CONN_OPEN handler of an association we request: its reactor (the association's
    own thread, which starts its loop only once the association is established) gets a
    `Checkpoint`."""
    assoc = event.assoc
    assoc._reactor_checkpoint = Checkpoint(assoc)
