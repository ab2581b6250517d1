"""The reactor pause without pynetdicom's race (relay.dicom.checkpoint): once `clear()`
has returned and the sender sees `_is_paused`, the reactor takes nothing until `set()`."""

from __future__ import annotations

import threading
import time
from typing import Any

from pynetdicom import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from relay.dicom.checkpoint import Checkpoint
from relay.dicom.pacs_assoc import associate
from relay.dicom.pacs_target import PacsTarget
from relay_dev.pacs import EmbeddedPacs

CYCLES = 3000


class Reactor(threading.Thread):
    """pynetdicom's `_run_reactor` loop, reduced: mark paused, wait, unmark, take."""

    def __init__(self, make: Any) -> None:
        super().__init__(daemon=True)
        self.checkpoint = make(self)
        self.is_paused = False
        self.taken = 0
        self.stop = False

    def run(self) -> None:
        while not self.stop:
            self.is_paused = True
            self.checkpoint.wait()
            self.is_paused = False
            self.taken += 1  # get_msg(block=False): what a paused reactor must not do


def pause_and_count_steals(reactor: Reactor, cycles: int) -> int:
    """pynetdicom's sender: clear, spin until paused, then (as its answer is awaited)
    look whether the reactor took anything meanwhile; set. The times it did."""
    steals = 0
    for _ in range(cycles):
        reactor.checkpoint.clear()
        while not reactor.is_paused:
            time.sleep(0)
        before = reactor.taken
        time.sleep(0)  # the sender's send_msg and wait for the answer
        if reactor.taken != before:
            steals += 1
        reactor.checkpoint.set()
    return steals


def run(make: Any, cycles: int = CYCLES) -> int:
    reactor = Reactor(make)
    reactor.start()
    try:
        return pause_and_count_steals(reactor, cycles)
    finally:
        reactor.stop = True
        reactor.checkpoint.set()
        reactor.join(5)


def test_a_paused_reactor_takes_nothing_until_set() -> None:
    assert run(Checkpoint) == 0


def test_with_pynetdicoms_event_the_paused_reactor_takes_messages() -> None:
    """The race this module removes, in the same model: with a threading.Event the
    sender goes on while the reactor still reads (nearly every cycle here, where the
    reactor does not sleep between looks; 1 ms in pynetdicom makes it rare there)."""

    def event(_reactor: threading.Thread) -> threading.Event:
        e = threading.Event()
        e.set()
        return e

    assert run(event, cycles=300) > 0


def test_clear_from_the_reactor_itself_or_after_its_end_returns_at_once() -> None:
    done = threading.Event()

    class Self(threading.Thread):
        def run(self) -> None:
            Checkpoint(self).clear()  # pynetdicom's release() on its own network timeout
            done.set()

    t = Self(daemon=True)
    t.start()
    assert done.wait(5)
    ended = threading.Thread(target=lambda: None)
    ended.start()
    ended.join()
    started = time.monotonic()
    Checkpoint(ended).clear()
    assert time.monotonic() - started < 1.0


def test_set_releases_a_waiting_reactor_and_wait_returns_true() -> None:
    ended = threading.Thread(target=lambda: None)
    ended.start()
    ended.join()
    checkpoint = Checkpoint(ended)
    assert checkpoint.is_set() and checkpoint.wait()
    out: list[bool] = []
    checkpoint.clear()  # returns at once: its reactor has ended
    assert not checkpoint.is_set()
    waiter = threading.Thread(target=lambda: out.append(checkpoint.wait()), daemon=True)
    waiter.start()
    time.sleep(0.05)
    assert out == []
    checkpoint.set()
    waiter.join(5)
    assert out == [True]


def test_the_agents_associations_with_the_pacs_pause_with_a_checkpoint() -> None:
    """Every association the agent requests (relay.dicom.pacs_assoc) has its reactor
    paused by a Checkpoint, from before its first `send_*`, and its messages still flow:
    a C-FIND's matches or a C-GET's responses are never taken by its reactor."""
    with EmbeddedPacs() as pacs:
        target = PacsTarget(ae_title=pacs.ae_title, host="127.0.0.1", port=pacs.port, timeout=10)
        assoc = associate(target, [build_context(Verification)])
        try:
            assert assoc.is_established
            assert isinstance(assoc._reactor_checkpoint, Checkpoint)  # pynetdicom's hook
            statuses = [assoc.send_c_echo().Status for _ in range(50)]
            assert statuses == [0x0000] * 50
        finally:
            assoc.release()
