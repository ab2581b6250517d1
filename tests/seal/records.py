"""Cutting a TLS byte stream into records, for tests that tamper with sealed sessions
(in memory here, and in the hostile gateway of tests/seal/test_hostile_gateway.py)."""

from __future__ import annotations

from collections.abc import Callable

HEADER = 5
APPLICATION_DATA = 23


class RecordCutter:
    """Feed bytes; get whole records back (a partial one waits for the rest)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out = []
        while len(self._buf) >= HEADER:
            length = int.from_bytes(self._buf[3:5], "big")
            if len(self._buf) < HEADER + length:
                break
            out.append(bytes(self._buf[: HEADER + length]))
            del self._buf[: HEADER + length]
        return out


Tamper = Callable[[list[bytes]], list[bytes]]


class RecordTamper:
    """Applies `attack` once, to the application-data records after the first `skip`."""

    def __init__(self, attack: str, skip: int = 2, *, armed: bool = True) -> None:
        self.attack = attack
        self.skip = skip
        self.armed = armed  # records pass untouched (and uncounted) until armed
        self.seen = 0
        self.done = False
        self.held: bytes | None = None
        self.cutter = RecordCutter()

    def __call__(self, data: bytes) -> bytes:
        out: list[bytes] = []
        for record in self.cutter.feed(data):
            if record[0] != APPLICATION_DATA or self.done or not self.armed:
                out.append(record)
                continue
            self.seen += 1
            if self.seen <= self.skip:
                out.append(record)
                continue
            out += self._attack(record)
        return b"".join(out)

    def _attack(self, record: bytes) -> list[bytes]:
        if self.attack == "flip":
            self.done = True
            i = HEADER + (len(record) - HEADER) // 2
            return [record[:i] + bytes([record[i] ^ 0x01]) + record[i + 1 :]]
        if self.attack == "drop":
            self.done = True
            return []
        if self.attack == "replay":
            self.done = True
            return [record, record]
        if self.attack == "reorder":
            if self.held is None:
                self.held = record
                return []
            self.done = True
            return [record, self.held]
        raise ValueError(self.attack)


ATTACKS = ("flip", "drop", "replay", "reorder")
