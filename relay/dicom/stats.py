"""Metrics hooks for the DICOM layer: plain counters that the caller exports.

The lead wires these to Prometheus; this package never imports prometheus_client. Any object
with these three methods can be passed where a `DicomStats` is expected; they are called
from pynetdicom threads as well as from the event loop, so implementations must be
thread-safe.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol


class DicomStats(Protocol):
    def operation_done(self, op: str, status: int, seconds: float) -> None:
        """One DICOM operation finished. `op`: echo, find, get, move, store."""
        ...

    def bytes_transferred(self, direction: str, raw: int, wire: int) -> None:
        """One message through the codec: `direction` "out" (encoded) or "in" (decoded);
        `raw` counts the uncompressed message, `wire` the bytes on the stream."""
        ...

    def instance_relayed(self, size: int) -> None:
        """One instance passed on (agent: to the stream; workstation: to the viewer)."""
        ...


def status_category(status: int) -> str:
    """success | warning | failure | cancel | pending, per PS3.7 Annex C."""
    if status == 0x0000:
        return "success"
    if status == 0xFE00:
        return "cancel"
    if status in (0xFF00, 0xFF01):
        return "pending"
    if status == 0x0001 or 0xB000 <= status <= 0xBFFF or status in (0x0107, 0x0116):
        return "warning"
    return "failure"


@dataclass
class DicomCounters:
    """A thread-safe in-memory `DicomStats`, also used by the tests."""

    operations: Counter[tuple[str, str]] = field(default_factory=Counter)
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    latency_seconds: dict[str, list[float]] = field(default_factory=dict)
    raw_bytes: Counter[str] = field(default_factory=Counter)
    wire_bytes: Counter[str] = field(default_factory=Counter)
    instances: int = 0
    instance_bytes: int = 0
    max_latencies: int = 10_000  # per op, so a long-running process stays bounded
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def operation_done(self, op: str, status: int, seconds: float) -> None:
        with self._lock:
            self.operations[(op, status_category(status))] += 1
            self.statuses[(op, status)] += 1
            samples = self.latency_seconds.setdefault(op, [])
            if len(samples) < self.max_latencies:
                samples.append(seconds)

    def bytes_transferred(self, direction: str, raw: int, wire: int) -> None:
        with self._lock:
            self.raw_bytes[direction] += raw
            self.wire_bytes[direction] += wire

    def instance_relayed(self, size: int) -> None:
        with self._lock:
            self.instances += 1
            self.instance_bytes += size


class FanOutStats:
    """Sends every hook to several `DicomStats` (e.g. Prometheus and an audit counter)."""

    def __init__(self, *targets: DicomStats) -> None:
        self._targets = targets

    def operation_done(self, op: str, status: int, seconds: float) -> None:
        for t in self._targets:
            t.operation_done(op, status, seconds)

    def bytes_transferred(self, direction: str, raw: int, wire: int) -> None:
        for t in self._targets:
            t.bytes_transferred(direction, raw, wire)

    def instance_relayed(self, size: int) -> None:
        for t in self._targets:
            t.instance_relayed(size)


class NullStats:
    """The default: counts nothing."""

    def operation_done(self, op: str, status: int, seconds: float) -> None:
        pass

    def bytes_transferred(self, direction: str, raw: int, wire: int) -> None:
        pass

    def instance_relayed(self, size: int) -> None:
        pass
