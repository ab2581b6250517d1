"""Forwarded connections' unread bytes, all together, within one budget.

A forward whose local program stops reading holds its stream's whole window (1 MiB)
unread, and those bytes count against no shared window (they hold almost no link
credit, so that stalled forwards cannot freeze the session): 256 of them held 256 MiB
for the 60 s stall timeout. The session's ForwardBudget now resets the longest-unread
stream once they pass 16 MiB together, and an active forward is left alone.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from relay.net.aio import Stream
from relay.net.bytestream import StreamResetError
from relay.proto import ErrorCode
from relay.wire import HEADER_TARGET, tcp_target
from relay.workstation.forwardbudget import FORWARD_BUFFER_LIMIT, ForwardBudget
from tests.workstation.test_session_windows import CHUNK, SETTINGS, _flood, _session_pair

WINDOW = SETTINGS.stream_window
STALLED = FORWARD_BUFFER_LIMIT // WINDOW + 8  # 24 stalled downloads: 24 MiB unread before
ACTIVE_BYTES = 32 * 1024 * 1024  # the active download, twice the budget
FORWARD = {HEADER_TARGET: tcp_target("archive")}


class _Fake:
    def __init__(self, name: str) -> None:
        self.name = name
        self.buffered = 0
        self.budget: ForwardBudget | None = None
        self.reset_with: int | None = None

    def reset(self, code: int) -> None:
        self.reset_with = code
        assert self.budget is not None
        self.budget.gone(self, self.buffered)
        self.buffered = 0


def _arrive(budget: ForwardBudget, stream: _Fake, size: int) -> None:
    stream.budget = budget
    stream.buffered += size
    budget.arrived(stream, size)


def _take(budget: ForwardBudget, stream: _Fake, size: int) -> None:
    stream.buffered -= size
    budget.taken(stream, size)


def test_the_longest_unread_goes_first_and_a_reader_moves_to_the_back() -> None:
    budget = ForwardBudget(limit=100, reset_code=ErrorCode.CANCEL)
    a, b, c = _Fake("a"), _Fake("b"), _Fake("c")
    _arrive(budget, a, 40)
    _arrive(budget, b, 40)
    _take(budget, a, 10)  # a's program reads: b is now the longest unread
    _arrive(budget, c, 40)  # 110 > 100
    assert (a.reset_with, b.reset_with, c.reset_with) == (None, ErrorCode.CANCEL, None)
    assert budget.held == 70 and budget.evicted == 1
    _take(budget, a, 30)
    _take(budget, c, 40)
    assert budget.held == 0 and not budget._unread  # nothing kept once all is read


def test_one_forward_alone_never_meets_the_budget() -> None:
    budget = ForwardBudget()
    alone = _Fake("alone")
    for _ in range(1000):  # a long download, its window full at every moment
        _arrive(budget, alone, WINDOW - alone.buffered)
        _take(budget, alone, CHUNK)
    assert alone.reset_with is None and budget.evicted == 0


async def _settled(streams: list[Stream], within: float = 20.0) -> int:
    """Until the bytes the stalled streams hold stop changing; their sum."""
    last, still = -1, 0
    async with asyncio.timeout(within):
        while still < 3:
            await asyncio.sleep(0.1)
            held = sum(s.buffered for s in streams)
            still = still + 1 if held == last else 0
            last = held
    return last


async def test_stalled_forwards_hold_at_most_the_budget_and_an_active_one_runs() -> None:
    workstation, accepted, agent, server = await _session_pair()
    floods: list[asyncio.Task[None]] = []
    try:
        await asyncio.sleep(0.1)  # SETTINGS exchanged
        stalled = [workstation.open_stream(FORWARD) for _ in range(STALLED)]
        for stream in stalled:
            await stream.write(b"GET /archive")  # and then never reads
        async with asyncio.timeout(5):
            downloads = [await accepted.get() for _ in range(STALLED)]
        floods = [asyncio.create_task(_flood(s)) for s in downloads]

        active = workstation.open_stream(FORWARD)
        await active.write(b"GET /report")
        async with asyncio.timeout(5):
            served = await accepted.get()

        async def serve() -> None:
            for _ in range(ACTIVE_BYTES // CHUNK):
                await served.write(b"r" * CHUNK)
            await served.write_eof()

        floods.append(asyncio.create_task(serve()))
        got = 0
        async with asyncio.timeout(60):
            while chunk := await active.read():
                got += len(chunk)
        assert got == ACTIVE_BYTES  # never reset, every byte

        held = await _settled(stalled)
        budget = workstation.forward_budget
        assert held == budget.held <= FORWARD_BUFFER_LIMIT  # was STALLED MiB
        reset = [s for s in stalled if s.reset_code is not None]
        assert len(reset) == budget.evicted >= STALLED - FORWARD_BUFFER_LIMIT // WINDOW
        assert {s.reset_code for s in reset} == {ErrorCode.CANCEL}
        with pytest.raises(StreamResetError):
            await reset[0].read()
    finally:
        for task in floods:
            task.cancel()
        await asyncio.gather(*floods, return_exceptions=True)
        with contextlib.suppress(Exception):
            workstation.abort()
        agent.abort()
        server.close()
