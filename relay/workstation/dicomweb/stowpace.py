"""The pace a STOW-RS upload must keep while the workstation reads it.

Each read of an upload had to bring bytes within `dicomweb.timeout` (the stall), but
nothing bounded the whole: a client sending a byte every `timeout - 1` seconds held an
upload slot (`app.STOW_UPLOADS`), its connection and what it had sent for as long as it
liked (months within `max_upload`). Now the upload must also keep the agent's pace for a
device's DICOM request (relay.dicom.pace: `MIN_REQUEST_RATE` after a first `stall` of
grace), on a clock that runs only while the handler waits for the client's bytes: storing
a part upstream (the PACS through the tunnel, which may take long) and checking it are the
workstation's time, not the client's, and do not count against it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from relay.dicom.pace import MIN_REQUEST_RATE, pace_deadline

__all__ = ["UploadPace", "UploadStalled", "UploadTooSlow"]

T = TypeVar("T")


class UploadStalled(Exception):
    """Nothing came for `stall` seconds."""


class UploadTooSlow(Exception):
    """The upload came slower than the minimum rate (the text says how slow)."""


class UploadPace:
    """Reads of one upload, each bounded by the stall and by the minimum-rate deadline.

    `arrived()` is how many bytes of the body have come (aiohttp's count as they reach
    the request's stream, read or not: the multipart reader holds a part's last bytes
    back until it has seen what follows them, so the bytes read lag behind, and a client
    that sent a part and then stopped looked too slow rather than stalled); `waited` the
    seconds spent waiting for them. The next read must end by
    ``pace_deadline(0, received, stall, min_rate)`` on the `waited` clock, so an upload of
    n bytes waits for its client at most ``stall + n / min_rate`` seconds."""

    def __init__(
        self, stall: float, min_rate: float = MIN_REQUEST_RATE, *, arrived: Callable[[], int]
    ) -> None:
        if stall <= 0 or min_rate <= 0:
            raise ValueError("stall and min_rate must be positive")
        self.stall = stall
        self.min_rate = min_rate
        self.waited = 0.0
        self._arrived = arrived
        self._loop = asyncio.get_running_loop()

    @property
    def received(self) -> int:
        return self._arrived()

    async def read(self, reading: Callable[[], Awaitable[T]]) -> T:
        """`reading()` (a read of the client's bytes), waited for within what is left of
        the stall and the pace; the wait counts on the `waited` clock. UploadStalled or
        UploadTooSlow when it does not come in time (the read is cancelled)."""
        by_rate = pace_deadline(0.0, self.received, self.stall, self.min_rate) - self.waited
        if by_rate <= 0:
            raise UploadTooSlow(self._slow())
        started = self._loop.time()
        try:
            async with asyncio.timeout(min(self.stall, by_rate)):
                return await reading()
        except TimeoutError:
            stalled = self.stall <= by_rate
        finally:
            self.waited += self._loop.time() - started
        if stalled:
            raise UploadStalled(f"nothing received for {self.stall:g} s")
        raise UploadTooSlow(self._slow())

    def _slow(self) -> str:
        return (
            f"the upload came slower than {self.min_rate / 1024:g} KiB/s "
            f"({self.received} bytes in {self.waited:.0f} s of waiting for them)"
        )
