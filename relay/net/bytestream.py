"""The byte-stream interface that applications at the ends (agent, workstation) program against.

A relay stream behaves like one TCP connection with half-close and reset. Keeping the
interface this small lets DICOM, TCP forwarding and compression be written and tested
without a tunnel (see `pipe()`), and then run unchanged over `relay.net.aio.Stream`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping
from typing import Protocol


class StreamResetError(Exception):
    """The stream was aborted by either side; `code` is a `relay.proto.ErrorCode` value."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message or f"stream reset (code {code})")
        self.code = code


class ByteStream(Protocol):
    """One bidirectional, ordered, flow-controlled byte stream."""

    @property
    def headers(self) -> Mapping[str, str]:
        """What the opener asked for (target, codec, ...), as seen by this end."""
        ...

    async def read(self, max_bytes: int = 65536) -> bytes:
        """Up to `max_bytes`; b"" once the peer has half-closed. Raises StreamResetError."""
        ...

    async def write(self, data: bytes) -> None:
        """Queue `data`, waiting while the peer grants no credit. Raises StreamResetError."""
        ...

    async def write_eof(self) -> None:
        """Half-close: the peer reads b"" after all data written so far."""
        ...

    def reset(self, code: int) -> None:
        """Abort both directions at once; pending data is dropped."""
        ...


async def read_exactly(stream: ByteStream, n: int) -> bytes:
    """Exactly `n` bytes, or asyncio.IncompleteReadError if the peer half-closes first."""
    parts: list[bytes] = []
    have = 0
    while have < n:
        chunk = await stream.read(n - have)
        if not chunk:
            raise asyncio.IncompleteReadError(b"".join(parts), n)
        parts.append(chunk)
        have += len(chunk)
    return b"".join(parts)


class _PipeEnd:
    """One end of an in-memory stream pair with a bounded buffer per direction."""

    def __init__(self, headers: Mapping[str, str], limit: int) -> None:
        self._headers = dict(headers)
        self._limit = limit
        self._inbox: deque[bytes] = deque()
        self._inbox_bytes = 0
        self._eof = False
        self._reset: int | None = None
        self._changed = asyncio.Event()
        self.peer: _PipeEnd

    @property
    def headers(self) -> Mapping[str, str]:
        return self._headers

    def _notify(self) -> None:
        self._changed.set()

    async def _wait(self) -> None:
        self._changed.clear()
        await self._changed.wait()

    async def read(self, max_bytes: int = 65536) -> bytes:
        while True:
            if self._reset is not None:
                raise StreamResetError(self._reset)
            if self._inbox:
                chunk = self._inbox.popleft()
                if len(chunk) > max_bytes:
                    self._inbox.appendleft(chunk[max_bytes:])
                    chunk = chunk[:max_bytes]
                self._inbox_bytes -= len(chunk)
                self.peer._notify()
                return chunk
            if self._eof:
                return b""
            await self._wait()

    async def write(self, data: bytes) -> None:
        peer = self.peer
        view = memoryview(data)
        while view:
            if self._reset is not None:
                raise StreamResetError(self._reset)
            room = self._limit - peer._inbox_bytes
            if room <= 0:
                await self._wait()
                continue
            part = bytes(view[:room])
            view = view[room:]
            peer._inbox.append(part)
            peer._inbox_bytes += len(part)
            peer._notify()

    async def write_eof(self) -> None:
        self.peer._eof = True
        self.peer._notify()

    def reset(self, code: int) -> None:
        for end in (self, self.peer):
            if end._reset is None:
                end._reset = code
            end._notify()


def pipe(
    headers: Mapping[str, str] | None = None, limit: int = 256 * 1024
) -> tuple[ByteStream, ByteStream]:
    """Two connected in-memory ends, for tests of what runs on top of a stream."""
    a = _PipeEnd(headers or {}, limit)
    b = _PipeEnd(headers or {}, limit)
    a.peer, b.peer = b, a
    return a, b
