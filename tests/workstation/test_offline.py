"""Offline: with the link known down, the Tunnel fails a new open at once, saying so.

It waited its whole open timeout (15 s) before: a radiologist working offline waited
that long per click for anything not cached. A blip (the session just lost, no attempt
failed yet) still waits, and gets its stream once the session is back. The keeper runs
against the agent's real session server over loopback; its clock is the test's.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.agent.sessions import SessionServer
from relay.wire import HEADER_TARGET
from relay.workstation.session import OFFLINE_AFTER, SessionKeeper, known_down
from relay.workstation.tunnel import OFFLINE_POLL, Tunnel, TunnelOffline
from tests.ends_helpers import wait_until
from tests.pki_helpers import SitePki, make_pki
from tests.workstation.session_agent import Kept, context, keeper_for, running_agent

HEADERS = {HEADER_TARGET: "tcp:none"}
LONG = 600.0  # an open timeout no test may wait out


class Clock:
    """Monotonic time the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> SitePki:
    return make_pki(Path(tmp_path_factory.mktemp("pki")))


@pytest.fixture
async def up(site: SitePki) -> AsyncIterator[tuple[SessionKeeper, Kept, SessionServer, Clock]]:
    """A keeper with its session up, on the test's clock."""
    clock = Clock()
    async with running_agent(site) as (server, kept):
        keeper = keeper_for(kept, context(site, site.device("offline")), site, clock)
        keeper.start()
        try:
            await wait_until(keeper.up.is_set)
            yield keeper, kept, server, clock
        finally:
            await keeper.close(0.5)


def test_known_down_needs_a_failed_attempt_and_the_time() -> None:
    assert not known_down(down_for=0.0, failed=0)
    assert not known_down(down_for=OFFLINE_AFTER * 10, failed=0)  # a reconnect in flight
    assert not known_down(down_for=OFFLINE_AFTER / 2, failed=5)  # a blip: still waits
    assert known_down(down_for=OFFLINE_AFTER, failed=1)


async def _lose_session(keeper: SessionKeeper, kept: Kept, server: SessionServer) -> None:
    """The gateway link goes (no redial succeeds) and the session with it."""
    kept.up.clear()
    for link in list(server.sessions):
        link.close()
    await wait_until(lambda: not keeper.up.is_set())


async def test_a_blip_waits_and_a_known_outage_fails_the_waiting_open_at_once(
    up: tuple[SessionKeeper, Kept, SessionServer, Clock],
) -> None:
    keeper, kept, server, clock = up
    tunnel = Tunnel(keeper, open_timeout=LONG)
    await _lose_session(keeper, kept, server)
    assert keeper.offline() is None  # just lost: a blip so far

    opening = asyncio.create_task(tunnel.open_stream(HEADERS))
    await asyncio.sleep(OFFLINE_POLL * 2)  # several looks at the state: it waits
    assert not opening.done()

    kept.stats.failures += 1  # a redial failed ...
    kept.stats.last_error = "connection refused"
    assert keeper.offline() is None
    clock.now += OFFLINE_AFTER  # ... and the outage has lasted: known down
    async with asyncio.timeout(10):  # the open timeout is LONG: the old Tunnel waited it
        with pytest.raises(TunnelOffline, match=r"offline: .*connection refused"):
            await opening
    assert tunnel.stats.offline == 1 and tunnel.stats.unavailable == 1

    # While it stays down, a new open fails before waiting at all.
    with pytest.raises(TunnelOffline):
        await tunnel.open_stream(HEADERS, timeout=LONG)
    assert tunnel.stats.offline == 2


async def test_back_online_opens_go_through_and_the_next_drop_is_a_blip_again(
    up: tuple[SessionKeeper, Kept, SessionServer, Clock],
) -> None:
    keeper, kept, server, clock = up
    tunnel = Tunnel(keeper, open_timeout=LONG)
    await _lose_session(keeper, kept, server)
    kept.stats.failures += 1
    clock.now += OFFLINE_AFTER
    assert keeper.offline() is not None

    kept.up.set()  # the gateway link is back: the keeper's next session opens
    await wait_until(keeper.up.is_set)
    assert keeper.offline() is None
    stream = await tunnel.open_stream(HEADERS)
    stream.reset(0)

    # Lost again, long after the first outage: not known down until an attempt fails.
    clock.now += OFFLINE_AFTER * 10
    await _lose_session(keeper, kept, server)
    assert keeper.offline() is None
    opening = asyncio.create_task(tunnel.open_stream(HEADERS))
    await asyncio.sleep(OFFLINE_POLL * 2)
    assert not opening.done()
    kept.up.set()  # the reconnect in flight succeeds: the waiting open gets its stream
    async with asyncio.timeout(10):
        stream = await opening
    stream.reset(0)
    assert tunnel.stats.offline == 0
