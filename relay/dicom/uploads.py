"""The bytes of devices' requests the agent holds: per device and for all devices.

A request is held whole (a C-STORE's instance, up to `DicomLimits.max_message`, 512 MiB)
from its first byte until its operation ends: the PACS gets it from memory. The
dispatcher bounds the streams (32 a device, `pacs.max_operations` in all), not their
bytes, so one device uploading 32 instances of 512 MiB at once made the agent hold
16 GiB, and all devices 32 GiB. The budget is charged as bytes arrive (pace.py's reader),
so a device holds what it sent, and given back when the stream's task ends. Beyond it the
stream is reset with LIMIT_EXCEEDED (the workstation shows "agent busy"), not made to
wait: a wait would hold what the stream has already sent.
"""

from __future__ import annotations

import zlib
from collections import Counter
from typing import Final

UPLOAD_BYTES: Final = 2 << 30
"""Request bytes held for all devices at once (2 GiB: four uploads of the largest
instance `max_message` allows). The agent's memory for them is at most about twice that:
a message's buffer grows by doubling (codec.read_payload), and its decoded dataset is a
copy of its body for a moment."""
DEVICE_UPLOAD_BYTES: Final = UPLOAD_BYTES // 2
"""...and for one device (1 GiB: two of the largest instances, or the workstation's own
two STOW-RS uploads at once at `dicomweb.max_upload`), over all its streams: no device
takes the whole budget."""


_INFLATE_STEP: Final = 1 << 20


def inflated_size(data: bytes, limit: int) -> int:
    """How many bytes a deflated dataset inflates to, counted in steps of 1 MiB and never
    held whole; at most `limit` + 1 (past the limit the operation refuses it). A deflated
    upload of 500 KB inflates to 512 MiB of zeros wherever it is read (its check, its audit
    keys): the budget is charged that before anything inflates it. A bad stream counts as
    its own size (its check refuses it)."""
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    size, rest = 0, data
    try:
        while size <= limit:
            size += len(d.decompress(rest, _INFLATE_STEP))
            rest = d.unconsumed_tail
            if d.eof or not rest:
                break
    except zlib.error:
        return len(data)
    return min(size, limit + 1)


class UploadBudgetFull(Exception):
    """A request's bytes would take the device or the agent past its budget."""


class UploadBudget:
    """Bytes of requests held, by device (an entry only while a device holds some)."""

    def __init__(self, total: int = UPLOAD_BYTES, per_device: int = DEVICE_UPLOAD_BYTES):
        if total < 1 or per_device < 1:
            raise ValueError("budgets must be positive")
        self.total = total
        self.per_device = per_device
        self.held = 0
        self.by_device: Counter[str] = Counter()
        self.refused = 0  # requests refused for the budget, since start

    def charge(self, device: str, size: int) -> None:
        """Hold `size` more bytes for `device`; UploadBudgetFull (nothing held) beyond."""
        if self.by_device[device] + size > self.per_device:
            self.refused += 1
            raise UploadBudgetFull(f"this device's requests past {self.per_device} bytes")
        if self.held + size > self.total:
            self.refused += 1
            raise UploadBudgetFull(f"all devices' requests past {self.total} bytes")
        self.by_device[device] += size
        self.held += size

    def release(self, device: str, size: int) -> None:
        """Give back `size` bytes `charge` held for `device`."""
        if size <= 0:
            return
        self.held -= size
        self.by_device[device] -= size
        if self.by_device[device] <= 0:
            del self.by_device[device]
