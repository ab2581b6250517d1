"""Splicing a device stream to an agent stream, hop by hop, without a task per stream.

Each direction keeps the chunks that the destination cannot take yet. Credit goes back
to the source only when a chunk has been written to the destination link, so the queue
of one direction never exceeds the source's stream window: a slow reader slows its
writer, and nothing piles up in the DMZ.

A device's splices also share one budget (`DeviceUsage.buffered`, both directions of all
its streams): a chunk that takes it over `per_device.buffered` resets that stream with
LIMIT_EXCEEDED, so no device can hold more of the gateway's memory, or of an agent
link's window, than its cap. Each queued chunk counts CHUNK_COST bytes besides its data
(the bytes object and its queue slot): a device sending 1-byte DATA frames would
otherwise hold about 40 times what the budget counts. An enrollment stream (its PC is not
authenticated) has a budget of its own (`limits.ENROLL_BUFFERED`): no splice is unbudgeted.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Final

from gateway.limits import DeviceUsage
from gateway.metrics import Tally
from relay.net.aio import Stream
from relay.proto import ErrorCode

CHUNK_COST: Final = 64  # bytes a queued chunk holds besides its data (measured: ~41)


class _Direction:
    __slots__ = ("bytes", "dst", "eof", "queue", "queued", "src")

    def __init__(self, src: Stream, dst: Stream, counter: Tally) -> None:
        self.src = src
        self.dst = dst
        self.queue: deque[bytes] = deque()
        self.queued = 0  # bytes `queue` holds: its data, and CHUNK_COST per chunk
        self.eof = False
        self.bytes = counter


class Splice:
    """Listener for both streams of one device-to-agent pair."""

    def __init__(
        self,
        device: Stream,
        agent: Stream,
        *,
        upstream: Tally,
        downstream: Tally,
        on_reset: Callable[[int], None],
        on_done: Callable[[], None],
        budget: DeviceUsage,
        over_budget: Callable[[DeviceUsage], bool],
    ) -> None:
        self._dirs = {
            device: _Direction(device, agent, upstream),
            agent: _Direction(agent, device, downstream),
        }
        self._on_reset = on_reset
        self._on_done = on_done
        self._budget = budget
        self._over_budget = over_budget
        self._done = False
        device.listener = self
        agent.listener = self

    # StreamListener

    def on_data(self, stream: Stream, data: bytes) -> None:
        d = self._dirs[stream]
        d.queue.append(data)
        cost = len(data) + CHUNK_COST
        d.queued += cost
        budget = self._budget
        budget.buffered += cost
        if len(d.queue) == 1:
            self._pump(d)
        if d.queued and self._over_budget(budget):
            stream.reset(ErrorCode.LIMIT_EXCEEDED)  # on_reset resets the other side

    def on_end(self, stream: Stream) -> None:
        d = self._dirs[stream]
        d.eof = True
        self._pump(d)

    def on_credit(self, stream: Stream) -> None:
        # `stream` gained credit as a destination: move what waits for it.
        for d in self._dirs.values():
            if d.dst is stream:
                self._pump(d)

    def on_reset(self, stream: Stream, code: int) -> None:
        if self._done:
            return
        # Done before the other side is reset: its reset comes back here (its listener is
        # this splice), and must find the pair finished, or it would count the reset and
        # release the device's stream a second time.
        self._done = True
        for d in self._dirs.values():
            self._dequeued(d, d.queued)
            d.queue.clear()
            if d.src is not stream:
                d.src.reset(code)
        self._on_reset(code)
        self._on_done()

    # internals

    def _pump(self, d: _Direction) -> None:
        queue, dst = d.queue, d.dst
        while queue:
            credit = dst.send_credit()
            if credit <= 0:
                return
            chunk = queue[0]
            if len(chunk) <= credit:
                queue.popleft()
                freed = len(chunk) + CHUNK_COST
            else:
                queue[0] = chunk[credit:]
                chunk = chunk[:credit]
                freed = len(chunk)  # the rest still queued, as one chunk
            dst.send_nowait(chunk)
            self._dequeued(d, freed)
            d.src.acknowledge(len(chunk))
            d.bytes.value += len(chunk)
        if d.eof and not dst.local_closed and dst.reset_code is None:
            dst.send_nowait(b"", end_stream=True)
            if all(x.eof and not x.queue for x in self._dirs.values()):
                self._finish()

    def _dequeued(self, d: _Direction, size: int) -> None:
        d.queued -= size
        self._budget.buffered -= size

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            self._on_done()
