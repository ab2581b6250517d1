"""The whole DICOM path in one process: DicomNode <-> pipe() <-> serve_dicom_stream <-> PACS.

`Chain` stands in for the tunnel: each stream the node opens is an in-memory pipe whose
other end the agent serves. It can also play a broken tunnel: refuse to open streams, or
reset a stream after a number of bytes (a link dropped mid-retrieval).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from relay.dicom.agent import OperationSummary, serve_dicom_stream
from relay.dicom.codec import DicomLimits
from relay.dicom.intake import MoveReceiver
from relay.dicom.node import DicomNode
from relay.dicom.pacs_target import PacsTarget
from relay.dicom.session import RESUME_WINDOW
from relay.dicom.spare import SpareAssociation
from relay.dicom.stats import DicomCounters
from relay.net.bytestream import ByteStream, StreamResetError, pipe


class DroppingStream:
    """A workstation stream end that resets (like a dropped tunnel) after `limit` bytes."""

    def __init__(self, inner: ByteStream, limit: int) -> None:
        self.inner = inner
        self.limit = limit
        self.seen = 0

    @property
    def headers(self) -> Mapping[str, str]:
        return self.inner.headers

    async def read(self, max_bytes: int = 65536) -> bytes:
        data = await self.inner.read(max_bytes)
        self.seen += len(data)
        if self.seen > self.limit:
            self.inner.reset(2)
            raise StreamResetError(2, "tunnel dropped (test)")
        return data

    async def write(self, data: bytes) -> None:
        await self.inner.write(data)

    async def write_eof(self) -> None:
        await self.inner.write_eof()

    def reset(self, code: int) -> None:
        self.inner.reset(code)


async def until(predicate: Callable[[], bool], limit: float = 20) -> None:
    """Poll `predicate` until true; AssertionError after `limit` seconds."""
    for _ in range(int(limit / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


@dataclass
class Chain:
    pacs: PacsTarget
    destinations: dict[str, tuple[str, int]] = field(default_factory=dict)
    node_timeout: float = 30.0
    limits: DicomLimits | None = None
    drop_after: int | None = None  # bytes read by the workstation before the link drops
    drop_streams: int | None = None  # how many streams drop (None: every one)
    resume_window: float = RESUME_WINDOW
    max_streams: int | None = None  # later opens fail as if the link never came back
    link_up: bool = True
    move_receiver: MoveReceiver | None = None
    spare: SpareAssociation | None = None  # the agent's (relay.dicom.spare)
    pipe_limit: int = 256 * 1024
    summaries: list[OperationSummary] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    agent_stats: DicomCounters = field(default_factory=DicomCounters)
    node_stats: DicomCounters = field(default_factory=DicomCounters)
    node: DicomNode | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def open_stream(self, headers: Mapping[str, str]) -> ByteStream:
        self.headers.append(dict(headers))
        if not self.link_up or (
            self.max_streams is not None and len(self.headers) > self.max_streams
        ):
            raise ConnectionError("no link to the gateway (test)")
        a, b = pipe(headers, limit=self.pipe_limit)
        task = asyncio.create_task(self._serve(b))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        dropped = self.drop_streams is None or len(self.headers) <= self.drop_streams
        if self.drop_after is not None and dropped:
            return DroppingStream(a, self.drop_after)
        return a

    async def _serve(self, stream: ByteStream) -> None:
        summary = await serve_dicom_stream(
            stream,
            self.pacs,
            stats=self.agent_stats,
            limits=self.limits,
            move_receiver=self.move_receiver,
            spare=self.spare,
        )
        self.summaries.append(summary)

    async def start(self) -> DicomNode:
        self.node = DicomNode(
            self.open_stream,
            listen=("127.0.0.1", 0),
            ae_title="RELAY",
            destinations=self.destinations,
            timeout=self.node_timeout,
            stats=self.node_stats,
            limits=self.limits,
            resume_window=self.resume_window,
        )
        await self.node.start()
        return self.node

    @property
    def port(self) -> int:
        assert self.node is not None
        return self.node.address[1]

    async def settle(self, limit: float = 20) -> None:
        """Wait (at most `limit` seconds) for every agent-side stream to finish."""
        if self._tasks:
            await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), limit)

    async def stop(self) -> None:
        if self.node is not None:
            await self.node.stop()
        with contextlib.suppress(TimeoutError):
            await self.settle(10)
        for task in self._tasks:
            task.cancel()
