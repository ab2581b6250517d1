"""Splicing a device stream to an agent stream, hop by hop, without a task per stream.

Each direction keeps the chunks that the destination cannot take yet. Credit goes back
to the source only when a chunk has been written to the destination link, so the queue
of one direction never exceeds the source's stream window: a slow reader slows its
writer, and nothing piles up in the DMZ.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from prometheus_client import Counter

from relay.net.aio import Stream


class _Direction:
    __slots__ = ("bytes", "dst", "eof", "queue", "src")

    def __init__(self, src: Stream, dst: Stream, counter: Counter) -> None:
        self.src = src
        self.dst = dst
        self.queue: deque[bytes] = deque()
        self.eof = False
        self.bytes = counter


class Splice:
    """Listener for both streams of one device-to-agent pair."""

    def __init__(
        self,
        device: Stream,
        agent: Stream,
        *,
        upstream: Counter,
        downstream: Counter,
        on_reset: Callable[[int], None],
        on_done: Callable[[], None],
    ) -> None:
        self._dirs = {
            device: _Direction(device, agent, upstream),
            agent: _Direction(agent, device, downstream),
        }
        self._on_reset = on_reset
        self._on_done = on_done
        self._done = False
        device.listener = self
        agent.listener = self

    # StreamListener

    def on_data(self, stream: Stream, data: bytes) -> None:
        d = self._dirs[stream]
        d.queue.append(data)
        if len(d.queue) == 1:
            self._pump(d)

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
        for d in self._dirs.values():
            d.queue.clear()
            if d.src is not stream:
                d.src.reset(code)
        self._on_reset(code)
        self._finish()

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
            else:
                queue[0] = chunk[credit:]
                chunk = chunk[:credit]
            dst.send_nowait(chunk)
            d.src.acknowledge(len(chunk))
            d.bytes.inc(len(chunk))
        if d.eof and not dst.local_closed and dst.reset_code is None:
            dst.send_nowait(b"", end_stream=True)
            if all(x.eof and not x.queue for x in self._dirs.values()):
                self._finish()

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            self._on_done()
