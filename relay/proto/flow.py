"""Credit-based flow control, one `Window` per direction per stream and per link.

The sender spends credit; the receiver hands it back as the application consumes data,
in batches (`threshold`) so that a fast stream costs few WINDOW_UPDATE frames.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.proto.frames import MAX_WINDOW


@dataclass(slots=True)
class SendWindow:
    """How much we may still send before the peer grants more."""

    credit: int

    def spend(self, n: int) -> None:
        if n > self.credit:
            raise ValueError("spending beyond credit")
        self.credit -= n

    def grant(self, n: int) -> bool:
        """Add credit; False if it would overflow the protocol's maximum window."""
        if self.credit + n > MAX_WINDOW:
            return False
        self.credit += n
        return True


@dataclass(slots=True)
class ReceiveWindow:
    """How much the peer may still send, and credit consumed but not yet returned."""

    size: int
    available: int
    pending: int = 0

    @classmethod
    def of(cls, size: int) -> ReceiveWindow:
        return cls(size=size, available=size)

    def receive(self, n: int) -> bool:
        """Account for n received bytes; False if the peer exceeded its credit."""
        if n > self.available:
            return False
        self.available -= n
        return True

    def consume(self, n: int) -> int:
        """The application consumed n bytes. Returns credit to grant now (0 to batch)."""
        self.pending += n
        if self.pending >= max(1, self.size // 4):
            return self.flush()
        return 0

    def return_now(self, n: int) -> int:
        """Credit for n bytes to grant at once, with what was batched: bytes the
        receiver keeps but does not count against this window (the link's window, for
        what a widened stream holds beyond its base window)."""
        self.pending += n
        return self.flush()

    def flush(self) -> int:
        granted, self.pending = self.pending, 0
        self.available += granted
        return granted
