"""The pace a device's request must keep while the agent reads it.

A request (a C-STORE's whole instance, up to `DicomLimits.max_message`) was read under one
deadline, `pacs.timeout` (30 s): an honest upload that needed longer (100 MiB over a
10 Mbit/s uplink) was refused, and a device trickling a byte now and then held its
stream for the whole timeout whatever it sent. Now a request is read at a pace: each read
brings bytes within `stall` seconds (`pacs.timeout`), and the bytes so far must keep a
minimum rate after a first `stall` of grace: the reading ends by
``started + stall + received / min_rate``. So a request of n bytes takes at most
``stall + n / min_rate`` seconds, and one that is sent faster is never cut.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Final

from relay.dicom.uploads import UploadBudget
from relay.net.bytestream import ByteStream

MIN_REQUEST_RATE: Final = 16 * 1024
"""Bytes a second a device's request must average after its first `stall` seconds (a
128 kbit/s uplink). Eight uploads at once, the workstation's DICOM node's associations,
each get that over a 1 Mbit/s uplink; a 512 MiB instance (`max_message`) may take up to
9 h at it, and holds the device's own operation slot (never the site's: those are taken
once the request is read, relay.agent.dispatch.admit_request) and memory for what came.
The workstation holds a STOW-RS upload to the same pace (relay.workstation.dicomweb.stowpace)."""


def pace_deadline(started: float, received: int, stall: float, min_rate: float) -> float:
    """When a request that began at `started` and has brought `received` bytes must have
    brought its next one (before any stall limit)."""
    return started + stall + received / min_rate


class PacedReader:
    """`stream` for reading a request: every read is bounded by the stall and by the
    minimum-rate deadline (TimeoutError, saying which); writes and resets pass through."""

    def __init__(
        self,
        stream: ByteStream,
        stall: float,
        min_rate: float = MIN_REQUEST_RATE,
        *,
        budget: UploadBudget | None = None,
        device: str = "",
    ) -> None:
        """`budget`: charged for `device` with every byte read (UploadBudgetFull beyond:
        the read's bytes are not charged), until `release`."""
        if stall <= 0 or min_rate <= 0:
            raise ValueError("stall and min_rate must be positive")
        self.stream = stream
        self.stall = stall
        self.min_rate = min_rate
        self.budget = budget
        self.device = device
        self.received = 0
        self.charged = 0
        self._loop = asyncio.get_running_loop()
        self.started = self._loop.time()

    @property
    def headers(self) -> Mapping[str, str]:
        return self.stream.headers

    def deadline(self) -> float:
        return pace_deadline(self.started, self.received, self.stall, self.min_rate)

    async def read(self, max_bytes: int = 65536) -> bytes:
        now = self._loop.time()
        by_rate = self.deadline() - now
        if by_rate <= 0:
            raise TimeoutError(self._slow())
        try:
            async with asyncio.timeout(min(self.stall, by_rate)):
                data = await self.stream.read(max_bytes)
        except TimeoutError:
            if self.stall <= by_rate:
                raise TimeoutError(f"nothing sent for {self.stall:g} s") from None
            raise TimeoutError(self._slow()) from None
        self.received += len(data)
        if self.budget is not None and data:
            self.budget.charge(self.device, len(data))
            self.charged += len(data)
        return data

    def hold(self, size: int) -> None:
        """Charge the budget up to `size` bytes in all: what the request holds once
        decoded, which a compressed one's wire bytes (all that `read` charged) understate
        (zeros squeeze 1,000 to 1). UploadBudgetFull beyond."""
        more = size - self.charged
        if self.budget is not None and more > 0:
            self.budget.charge(self.device, more)
            self.charged += more

    def release(self) -> None:
        """Give back what the reads charged (the request is no longer held)."""
        if self.budget is not None:
            self.budget.release(self.device, self.charged)
        self.charged = 0

    def _slow(self) -> str:
        return (
            f"the request came slower than {self.min_rate / 1024:g} KiB/s "
            f"({self.received} bytes in {self._loop.time() - self.started:.0f} s)"
        )

    async def write(self, data: bytes) -> None:
        await self.stream.write(data)

    async def write_eof(self) -> None:
        await self.stream.write_eof()

    def reset(self, code: int) -> None:
        self.stream.reset(code)
