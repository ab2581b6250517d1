"""The security set's refusal budget across restarts: a new process charges its buckets
with the refusals the file got in full (relay/agent/audit/budget.py, `recall`), so a
restart, or a crash loop, is no way around the budget."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from relay.agent.audit import AUDIT_FILE, AuditLog, Outcome, read_events, trail
from relay.agent.audit.budget import (
    KIND_BURST,
    KIND_REFILL,
    RECALL_WINDOW,
    SOURCE_BURST,
    RefusalBudget,
    written_refusal,
)
from relay.agent.audit.events import AuditEvent, Participant
from relay.agent.audit.files import SetListing, merged_events, trail_sets
from relay.agent.audit.trail import _KINDS
from relay.agent.config import PkiFiles
from relay.agent.service import Agent, run_agent
from tests.ends_helpers import WAIT, agent_config
from tests.pki_helpers import HOST, make_pki

AGENT = "spiffe://hospital.test/agent/main"
T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def _open(path: Path) -> AuditLog:
    """The agent's trail as a (re)started process opens it."""
    return AuditLog(path / AUDIT_FILE, source_id=AGENT, site="main")


def _refuse(audit: AuditLog, at: datetime, peer: str) -> None:
    audit.enrollment(now=at, device="ws1", token_id=None, peer=peer, outcome=Outcome.MINOR_FAILURE)


def _source(n: int) -> str:
    return f"10.0.{n // 250}.{n % 250 + 1}:40000"


def _written_in_full(path: Path) -> int:
    return sum(
        1
        for e in read_events(path / AUDIT_FILE)
        if e["kind"] == "enrollment" and "aggregate" not in e
    )


def test_a_restart_does_not_refill_the_kind_budget(tmp_path: Path) -> None:
    """A flood from made-up sources spends the kind's burst; the process dies (no
    close). The restarted one writes the next refusal into an aggregate, not in full:
    it used to start with a full bucket, KIND_BURST more each restart."""
    first = _open(tmp_path)
    for n in range(KIND_BURST + 50):
        _refuse(first, T0 + timedelta(seconds=n / 10), _source(n))
    assert _written_in_full(tmp_path) == KIND_BURST
    del first  # a crash: its pending aggregate is lost with it

    restarted = _open(tmp_path)
    _refuse(restarted, T0 + timedelta(seconds=30), "192.0.2.7:40000")
    assert _written_in_full(tmp_path) == KIND_BURST
    assert restarted.budget.pending == 1  # counted, written when due


def test_a_crash_loop_writes_no_more_than_one_process_would(tmp_path: Path) -> None:
    """Ten restarts a minute apart, each flooded: the refusals written in full are what
    one process's kind bucket allows over that time, not ten bursts."""
    restarts = 10
    for r in range(restarts):
        audit = _open(tmp_path)
        for n in range(KIND_BURST):
            _refuse(audit, T0 + timedelta(minutes=r, seconds=n / 10), _source(n + 100 * r))
    elapsed = timedelta(minutes=restarts)
    assert _written_in_full(tmp_path) <= KIND_BURST + elapsed / KIND_REFILL + 1


def test_a_source_over_its_budget_stays_over_it_after_a_restart(tmp_path: Path) -> None:
    first = _open(tmp_path)
    for n in range(SOURCE_BURST + 5):
        _refuse(first, T0 + timedelta(seconds=n), "203.0.113.9:40000")
    first.close()  # a clean stop writes its aggregate
    assert _written_in_full(tmp_path) == SOURCE_BURST

    restarted = _open(tmp_path)
    _refuse(restarted, T0 + timedelta(minutes=1), "203.0.113.9:40001")  # same address
    assert _written_in_full(tmp_path) == SOURCE_BURST
    _refuse(restarted, T0 + timedelta(minutes=1), "198.51.100.1:40000")  # another one
    assert _written_in_full(tmp_path) == SOURCE_BURST + 1


def test_after_a_quiet_window_a_restart_starts_with_the_whole_budget(tmp_path: Path) -> None:
    """The recall charges only the window: refusals older than it are not held against
    anyone, so an honest restart later loses nothing."""
    first = _open(tmp_path)
    for n in range(KIND_BURST + 5):
        _refuse(first, T0 + timedelta(seconds=n), _source(n))
    first.close()

    later = T0 + RECALL_WINDOW + timedelta(minutes=1)
    restarted = _open(tmp_path)
    for _ in range(SOURCE_BURST):
        _refuse(restarted, later, "192.0.2.7:40000")
    assert _written_in_full(tmp_path) == KIND_BURST + SOURCE_BURST


def _event(kind: str, outcome: Outcome, requestor: Participant, **extra: Any) -> AuditEvent:
    event_id, action, types = _KINDS[kind]
    return AuditEvent(
        kind=kind,
        event_id=event_id,
        action=action,
        at=T0,
        outcome=outcome,
        type_codes=types,
        participants=(requestor,),
        **extra,
    )


def test_what_is_recalled_is_what_took_a_token() -> None:
    """Refusals written in full are charged; successes, major failures, aggregates and
    the kinds limited upstream are not; the source is read as source_of gives it."""
    pc = Participant("ws1", requestor=True, address="[2001:db8::1]:4")

    def line(outcome: Outcome, kind: str = "enrollment", **extra: Any) -> dict[str, object]:
        return _event(kind, outcome, pc, **extra).to_json(AGENT)

    assert written_refusal(line(Outcome.MINOR_FAILURE)) == ("enrollment", "2001:db8::1")
    assert written_refusal(line(Outcome.SERIOUS_FAILURE)) == ("enrollment", "2001:db8::1")
    assert written_refusal(line(Outcome.SUCCESS)) is None
    assert written_refusal(line(Outcome.MAJOR_FAILURE)) is None
    assert written_refusal(line(Outcome.MINOR_FAILURE, aggregate={"count": 3})) is None
    assert written_refusal(line(Outcome.MINOR_FAILURE, "auth_refused")) is None
    no_address = _event("renewal", Outcome.MINOR_FAILURE, Participant("ws2", requestor=True))
    assert written_refusal(no_address.to_json(AGENT)) == ("renewal", "ws2")


def test_a_recalled_bucket_never_holds_more_than_a_full_one() -> None:
    """Charged from empty at the window's start: a kind with one refusal in the window
    has a full bucket less that one, whatever the sources asking next."""
    budget = RefusalBudget()
    budget.recall([("renewal", "d", T0 - timedelta(seconds=1))], T0 - RECALL_WINDOW)
    admitted = sum(
        budget.admit(_event("renewal", Outcome.MINOR_FAILURE, Participant(f"d{n}", requestor=True)))
        is None
        for n in range(KIND_BURST + 10)
    )
    assert admitted == KIND_BURST - 1


def test_the_recall_reads_no_more_than_its_bound_whatever_the_lines_say(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lines the recall skips (dated ahead of our clock, after it was set back; torn) are
    read too, and count against MAX_RECALL_LINES: they were not counted, so a security set
    written an hour ahead was read whole (110 MiB at the defaults) before the first
    refusal, on the agent's event loop."""
    bound = 40
    monkeypatch.setattr(trail, "MAX_RECALL_LINES", bound)
    ahead = _open(tmp_path)
    for n in range(5 * bound):  # written while the clock was an hour ahead
        ahead.enrollment(now=T0 + timedelta(hours=1, seconds=n), device="ws1", token_id=None,
                         peer=_source(n), outcome=Outcome.SUCCESS)  # fmt: skip
    pulled = 0

    def counted(*args: Any, **kwargs: Any) -> Iterator[dict[str, Any] | None]:
        nonlocal pulled
        for line in merged_events(*args, **kwargs):
            pulled += 1
            yield line

    monkeypatch.setattr(trail, "merged_events", counted)
    restarted = _open(tmp_path)  # the clock set back to T0
    _refuse(restarted, T0, "192.0.2.7:40000")
    assert 0 < pulled <= bound + 1
    assert restarted.budget.pending == 0  # nothing in the window: written in full


def test_a_refusal_logged_while_the_read_back_runs_waits_for_it_and_is_charged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent reads the budget back in a worker thread (`recall_budget`); a refusal
    logged meanwhile (another thread) waits on the recall lock until the read is done,
    then is admitted against the charged budget: counted, not written in full, and the
    security set is not read a second time."""
    first = _open(tmp_path)
    for n in range(KIND_BURST):
        _refuse(first, T0 + timedelta(seconds=n / 10), _source(n))
    restarted = _open(tmp_path)
    reading, release = threading.Event(), threading.Event()
    reads = 0

    def held(*args: Any, **kwargs: Any) -> list[SetListing]:
        nonlocal reads
        reads += 1
        reading.set()
        assert release.wait(WAIT)
        return trail_sets(*args, **kwargs)

    monkeypatch.setattr(trail, "trail_sets", held)
    waiting = threading.Event()
    lock = restarted._recall_lock

    class NotedLock:
        """The recall lock, noting a second thread's arrival at it."""

        def __enter__(self) -> None:
            if threading.current_thread() is refusal:
                waiting.set()
            lock.acquire()

        def __exit__(self, *exc: object) -> None:
            lock.release()

    restarted._recall_lock = NotedLock()  # type: ignore[assignment]
    at = T0 + timedelta(seconds=30)
    recall = threading.Thread(target=restarted.recall_budget, args=(at,))
    refusal = threading.Thread(target=_refuse, args=(restarted, at, "192.0.2.7:40000"))
    recall.start()
    assert reading.wait(WAIT)
    refusal.start()
    assert waiting.wait(WAIT)  # it reached the lock while the read holds it
    release.set()
    recall.join(WAIT)
    refusal.join(WAIT)
    assert not recall.is_alive() and not refusal.is_alive()
    assert reads == 1
    assert _written_in_full(tmp_path) == KIND_BURST and restarted.budget.pending == 1


async def test_the_agent_reads_the_budget_back_off_its_loop_before_it_takes_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole agent (`run_agent`, `pki:` set) restarted after a flood of refusals:
    by the time it has started (before any link, page or refusal) the security set was
    read back, once, in a thread other than the loop's, and the next refusal is counted
    into an aggregate at once. It used to be read by the first refusal, on the loop."""
    site = make_pki(tmp_path / "pki")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    now = datetime.now(UTC)
    earlier = _open(state)
    for n in range(KIND_BURST + 50):  # the earlier process's flood, just now; it crashed
        _refuse(earlier, now - timedelta(seconds=30 - n / 10), _source(n))
    assert _written_in_full(state) == KIND_BURST
    del earlier
    threads: list[int] = []
    real = AuditLog.recall_budget

    def recording(self: AuditLog, at: datetime) -> None:
        threads.append(threading.get_ident())
        real(self, at)

    monkeypatch.setattr(AuditLog, "recall_budget", recording)
    with socket.socket() as unused:  # a gateway address nothing listens on
        unused.bind((HOST, 0))
        port = unused.getsockname()[1]
    config = replace(
        agent_config(site, tmp_path, [port], {}),
        pki=PkiFiles(site.ca, site.directory / "ca.key"),
    )
    stop = asyncio.Event()
    started: asyncio.Future[Agent] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        run_agent(config, stop=stop, handlers={}, started=started.set_result, handle_signals=False)
    )
    try:
        agent = await asyncio.wait_for(started, WAIT)
        assert agent.authority is not None
        audit = agent.authority.audit
        assert audit._recalled and len(threads) == 1
        assert threads[0] != threading.get_ident()  # not the loop's thread
        _refuse(audit, datetime.now(UTC), "192.0.2.7:40000")
        assert audit.budget.pending == 1 and _written_in_full(state) == KIND_BURST
        assert len(threads) == 2  # the refusal's call found it done (read nothing)
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT)
