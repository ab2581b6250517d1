"""The bounded channel between pynetdicom threads and the event loop."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from relay.dicom.bridge import Channel, ChannelClosed, Woken


async def test_bound_blocks_a_thread_producer_until_the_loop_consumes() -> None:
    ch: Channel[int] = Channel(asyncio.get_running_loop(), 2)
    ch.put_sync(1, 1)
    ch.put_sync(2, 1)
    with pytest.raises(TimeoutError):
        ch.put_sync(3, 0.05)  # full: the producer waits, nothing is buffered beyond 2
    assert len(ch) == 2
    done = threading.Event()

    def produce() -> None:
        ch.put_sync(3, 10)
        done.set()

    t = threading.Thread(target=produce)
    t.start()
    await asyncio.sleep(0.05)
    assert not done.is_set()
    assert await ch.get() == 1
    await asyncio.to_thread(done.wait, 5)
    assert done.is_set()
    assert [await ch.get(), await ch.get()] == [2, 3]
    t.join(5)


async def test_bound_blocks_the_loop_producer_until_a_thread_consumes() -> None:
    ch: Channel[int] = Channel(asyncio.get_running_loop(), 1)
    await ch.put(1)
    blocked = asyncio.create_task(ch.put(2))
    await asyncio.sleep(0.02)
    assert not blocked.done()
    got = await asyncio.to_thread(ch.get_sync, 5)
    assert got == 1
    await asyncio.wait_for(blocked, 5)
    assert await asyncio.to_thread(ch.get_sync, 5) == 2


async def test_order_is_kept_across_threads() -> None:
    ch: Channel[int] = Channel(asyncio.get_running_loop(), 3)
    n = 2000

    def produce() -> None:
        for i in range(n):
            ch.put_sync(i, 10)
        ch.close()

    t = threading.Thread(target=produce)
    t.start()
    got = []
    while True:
        try:
            got.append(await ch.get())
        except ChannelClosed:
            break
    t.join(5)
    assert got == list(range(n))


async def test_close_drains_then_reports_the_reason() -> None:
    ch: Channel[str] = Channel(asyncio.get_running_loop(), 4)
    await ch.put("a")
    ch.close("done")
    with pytest.raises(ChannelClosed):
        await ch.put("b")
    assert ch.get_sync(1) == "a"
    with pytest.raises(ChannelClosed) as info:
        ch.get_sync(1)
    assert info.value.reason == "done"


async def test_abort_drops_items_and_releases_a_blocked_producer() -> None:
    ch: Channel[bytes] = Channel(asyncio.get_running_loop(), 1)
    ch.put_sync(b"x" * 1000, 1)
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            ch.put_sync(b"y", 30)
        except ChannelClosed as exc:
            errors.append(exc)

    t = threading.Thread(target=produce)
    t.start()
    await asyncio.sleep(0.05)
    started = time.monotonic()
    ch.abort("consumer gone")
    await asyncio.to_thread(t.join, 5)
    assert time.monotonic() - started < 5
    assert len(errors) == 1
    assert len(ch) == 0
    with pytest.raises(ChannelClosed):
        await ch.get()


async def test_a_waiting_loop_consumer_wakes_on_close() -> None:
    ch: Channel[int] = Channel(asyncio.get_running_loop(), 1)
    waiter = asyncio.create_task(ch.get())
    await asyncio.sleep(0.01)
    threading.Thread(target=ch.close).start()
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(waiter, 5)


def test_size_must_be_positive() -> None:
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(ValueError):
            Channel(loop, 0)
    finally:
        loop.close()


async def test_wake_releases_a_waiting_thread_consumer_without_an_item() -> None:
    ch: Channel[int] = Channel(asyncio.get_running_loop(), 2)
    waiting = threading.Event()
    outcome: list[BaseException] = []

    def consume() -> None:
        waiting.set()
        try:
            ch.get_sync(60)
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=consume)
    t.start()
    await asyncio.to_thread(waiting.wait, 10)
    while not outcome:  # a wake before the consumer waits is not kept: wake until it returns
        ch.wake()
        await asyncio.to_thread(t.join, 0.05)
    t.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], Woken)
    ch.put_sync(5, 1)
    assert ch.get_sync(1) == 5  # a queued item is returned, not a wake-up
