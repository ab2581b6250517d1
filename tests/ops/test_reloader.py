"""relay.ops.reloader: prepare off the loop, apply on it, one round at a time, coalesced."""

from __future__ import annotations

import asyncio
import threading

import pytest

from relay.ops.reloader import Reloader, ReloadStopped

WAIT = 10.0


class Role:
    """A role's reload: `prepare` reads `source` (held while `gate` is clear)."""

    def __init__(self) -> None:
        self.source = "first"
        self.gate = threading.Event()
        self.entered = threading.Semaphore(0)  # one release per prepare that began
        self.prepared_in: list[threading.Thread] = []
        self.applied: list[str] = []
        self.refused: list[Exception] = []
        self.reloader = Reloader(self.prepare, self.apply, self.refuse, (ValueError,))

    def prepare(self) -> str:
        read = self.source  # the file as this round finds it
        self.prepared_in.append(threading.current_thread())
        self.entered.release()
        if not self.gate.wait(WAIT):
            raise TimeoutError("the test never let the prepare go")
        if read == "bad":
            raise ValueError("bad file")
        if read == "bug":
            raise KeyError("bug")
        return read

    def apply(self, prepared: str) -> bool:
        self.applied.append(prepared)
        return True

    def refuse(self, exc: Exception) -> bool:
        self.refused.append(exc)
        return False

    async def prepare_began(self) -> None:
        assert await asyncio.to_thread(self.entered.acquire, True, WAIT)


async def test_the_prepare_runs_in_a_thread_while_the_loop_goes_on() -> None:
    role = Role()
    outcome = role.reloader.request()
    await role.prepare_began()
    ticks = 0
    for _ in range(3):  # timers fire while the prepare is held
        await asyncio.sleep(0.001)
        ticks += 1
    assert ticks == 3 and not outcome.done() and role.applied == []
    assert role.prepared_in[0] is not threading.current_thread()
    role.gate.set()
    assert await asyncio.wait_for(outcome, WAIT)
    assert role.applied == ["first"] and not role.reloader.running


async def test_a_burst_of_requests_makes_at_most_one_more_round_with_the_last_file() -> None:
    role = Role()
    first = role.reloader.request()
    await role.prepare_began()
    later = [role.reloader.request() for _ in range(50)]
    role.source = "last"
    assert all(f is later[0] for f in later)  # one round waits, whatever the count
    role.gate.set()
    assert await asyncio.wait_for(first, WAIT) and await asyncio.wait_for(later[0], WAIT)
    assert role.reloader.prepares == 2 and role.applied == ["first", "last"]
    assert not role.reloader.running


async def test_an_awaited_reload_reads_the_files_after_it_was_asked() -> None:
    role = Role()
    role.reloader.request()
    await role.prepare_began()  # this round read "first" already
    role.source = "edited"
    waiting = asyncio.ensure_future(role.reloader.reload())
    role.gate.set()
    assert await asyncio.wait_for(waiting, WAIT)
    assert role.applied == ["first", "edited"]


async def test_a_failed_prepare_is_refused_and_nothing_applied() -> None:
    role = Role()
    role.source = "bad"
    role.gate.set()
    assert not await asyncio.wait_for(role.reloader.reload(), WAIT)
    assert role.applied == [] and [str(e) for e in role.refused] == ["bad file"]


async def test_an_unexpected_error_is_refused_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    role = Role()
    role.source = "bug"
    role.gate.set()
    assert not await asyncio.wait_for(role.reloader.reload(), WAIT)
    assert isinstance(role.refused[0], KeyError) and role.applied == []
    assert any(r.exc_info for r in caplog.records if "unexpected" in r.getMessage())


async def test_close_abandons_a_held_prepare_and_never_applies_it() -> None:
    role = Role()
    waiting = asyncio.ensure_future(role.reloader.reload())
    await role.prepare_began()
    queued = role.reloader.request()
    role.reloader.close()  # at once: the thread stays stuck in the prepare
    with pytest.raises(ReloadStopped):
        await asyncio.wait_for(waiting, WAIT)
    with pytest.raises(ReloadStopped):
        await queued
    with pytest.raises(ReloadStopped):
        await role.reloader.reload()  # after the stop: refused at once
    role.gate.set()  # the abandoned thread ends; its result goes nowhere
    await asyncio.to_thread(role.prepared_in[0].join, WAIT)
    await asyncio.sleep(0)  # its hand-over (if any) runs
    assert role.applied == [] and role.refused == [] and role.reloader.prepares == 1
