"""One budget for the unread bytes of all forwarded connections together.

A forwarded connection's stream may hold its whole receive window unread (1 MiB at the
workstation) while its local program takes nothing, and those bytes hold almost no link
window (relay.workstation.session.FORWARD_LINK_CREDIT): so that stalled forwards cannot
freeze the session, they count against no shared window at all. Up to
relay.workstation.forward.MAX_CONNECTIONS (256) of them could then hold 256 MiB for the
60 s stall timeout. `ForwardBudget` bounds the sum: when a stream's new bytes take it
past `limit`, the stream whose program has taken nothing for longest (its buffer non-empty
and unread since before any other's) is reset, then the next, until the sum fits.

One forward alone never meets it (it holds at most its 1 MiB window, far below `limit`),
and an active one reads: its entry moves to the back at every read. No clock: the order
of reads is the time. Entries exist only while a stream holds bytes, so nothing stays
referenced after a connection ends.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final, Protocol

__all__ = ["FORWARD_BUFFER_LIMIT", "Buffered", "ForwardBudget"]

FORWARD_BUFFER_LIMIT: Final = 16 * 1024 * 1024
"""Unread bytes all forwarded connections may hold together: sixteen stalled windows, the
size of the session's link window (the worst case was 256 MiB)."""


class Buffered(Protocol):
    """What the budget sees of a stream: its unread bytes, and how to drop them."""

    @property
    def buffered(self) -> int: ...

    def reset(self, code: int) -> None: ...


class ForwardBudget:
    """See the module docstring. `arrived`, `taken`, `gone` are the stream's calls."""

    def __init__(self, limit: int = FORWARD_BUFFER_LIMIT, *, reset_code: int = 0) -> None:
        self.limit = limit
        self.reset_code = reset_code
        self.held = 0  # unread bytes of every stream here
        self.evicted = 0  # streams reset to keep `held` within `limit`
        self._unread: OrderedDict[Buffered, None] = OrderedDict()  # longest unread first

    def arrived(self, stream: Buffered, size: int) -> None:
        """`size` bytes came for `stream` (already in its buffer)."""
        self.held += size
        if stream not in self._unread:
            self._unread[stream] = None
        while self.held > self.limit and self._unread:
            victim = next(iter(self._unread))
            unread = victim.buffered
            self.evicted += 1
            victim.reset(self.reset_code)  # its gone() takes it off, bytes and all
            if victim in self._unread:  # one that did not call gone(): forget it here
                self.held -= unread
                del self._unread[victim]

    def taken(self, stream: Buffered, size: int) -> None:
        """Its program took `size` bytes: it is read now, to the back of the order."""
        self.held -= size
        if stream.buffered > 0:
            self._unread[stream] = None
            self._unread.move_to_end(stream)
        else:
            self._unread.pop(stream, None)

    def gone(self, stream: Buffered, size: int) -> None:
        """The stream was reset with `size` bytes unread (they are dropped)."""
        self.held -= size
        self._unread.pop(stream, None)
