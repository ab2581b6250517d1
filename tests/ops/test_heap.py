"""relay.ops.heap on this machine's glibc: free heap is seen and trimmed past the slack."""

from __future__ import annotations

import asyncio

from relay.ops.heap import Heap, keep_trimmed


def test_freed_blocks_show_as_free_heap() -> None:
    heap = Heap()
    assert heap.available
    # Blocks under the default mmap threshold come from the heap; survivors of the same
    # size between them keep the freed space from being returned at the top.
    blocks = [(bytearray(100_000), bytearray(100_000)) for _ in range(200)]
    survivors = [small for _, small in blocks]
    during = heap.free_bytes()  # after the blocks took whatever holes the heap had
    del blocks
    assert heap.free_bytes() >= during + 10_000_000
    heap.trim()
    assert len(survivors) == 200


async def test_trims_only_past_the_slack() -> None:
    seen: list[int] = []
    trimmed = asyncio.Event()

    def on_trim(free: int) -> None:
        seen.append(free)
        trimmed.set()

    task = asyncio.create_task(keep_trimmed(1, interval=0.01, on_trim=on_trim))
    blocks = [(bytearray(100_000), bytearray(100_000)) for _ in range(50)]
    survivors = [small for _, small in blocks]
    del blocks
    await asyncio.wait_for(trimmed.wait(), 5)
    task.cancel()
    assert seen[0] > 1
    never: list[int] = []
    task = asyncio.create_task(keep_trimmed(1 << 40, interval=0.01, on_trim=never.append))
    await asyncio.sleep(0.1)
    task.cancel()
    assert never == [] and len(survivors) == 50
