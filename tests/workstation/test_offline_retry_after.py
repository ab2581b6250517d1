"""The offline 503 says when the next reconnect attempt is due.

A real Workstation dials a loopback port where nothing listens (its real KeptLink backs
off with the test's RNG: each pause is its backoff's ceiling); DICOMweb runs on its
Tunnel over real HTTP. Before, the offline 503 always said `Retry-After: 1` (the busy
path's) whatever the backoff: a viewer that honours it came back every second through
a backoff of minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from relay.net.backoff import ExponentialBackoff
from relay.ops.config import Address, Backoff
from relay.wire import HEADER_TARGET
from relay.workstation.dicomweb.server import DicomwebServer
from relay.workstation.dicomweb.settings import DicomwebConfig
from relay.workstation.service import Workstation
from relay.workstation.tunnel import (
    RETRY_AFTER_MAX,
    RETRY_AFTER_MIN,
    Tunnel,
    TunnelOffline,
    retry_after,
)
from tests.ends_helpers import WAIT, device_identity_dir, wait_until, workstation_config
from tests.pki_helpers import make_pki
from tests.workstation.session_agent import context, keeper_for, running_agent


class Ceiling:
    """An RNG whose every draw is the top of its range: the backoff's pause is its ceiling."""

    def uniform(self, a: float, b: float) -> float:
        return b


@contextlib.asynccontextmanager
async def offline(tmp_path: Path, initial: float) -> AsyncIterator[tuple[Workstation, str]]:
    """A started workstation known offline (its first dial refused, `offline_after` 0),
    backing off `initial` s before its next dial; the URL of DICOMweb on its Tunnel."""
    pki = make_pki(tmp_path / "pki")
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]  # nothing listens once the socket is closed
    config = dataclasses.replace(
        workstation_config(device_identity_dir(pki, tmp_path), tmp_path, closed_port),
        reconnect=Backoff(initial=initial, maximum=initial * 4),
    )
    ws = Workstation(config, rng=Ceiling())
    ws.session.offline_after = 0.0
    await ws.start()
    web = DicomwebServer(DicomwebConfig(Address("127.0.0.1", 0)), ws.tunnel.open_stream)
    await web.start()
    try:
        await wait_until(lambda: ws.kept.retry_at is not None)  # the dial failed: backing off
        assert ws.session.offline() is not None
        yield ws, web.url
    finally:
        await web.stop()
        await ws.shutdown(0.5)


async def _query(url: str) -> tuple[int, str | None, str]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/studies?PatientID=P1") as r:
        return r.status, r.headers.get("Retry-After"), await r.text()


async def test_the_offline_503_says_when_the_next_dial_is_due(tmp_path: Path) -> None:
    async with offline(tmp_path, initial=20.0) as (ws, url):
        due = ws.session.retry_in()
        assert due is not None and 0 < due <= 20.0
        status, after, reason = await _query(url)
        assert status == 503 and "offline" in reason
        # The dial's pause (20 s, drawn at its ceiling), counted down; not the busy 1 s.
        assert after is not None and RETRY_AFTER_MIN < int(after) <= 20


async def test_the_offline_503_waits_at_most_the_bound(tmp_path: Path) -> None:
    async with offline(tmp_path, initial=300.0) as (_, url):
        status, after, _ = await _query(url)
        assert status == 503 and after == str(RETRY_AFTER_MAX)


async def test_with_the_gateway_link_up_the_sessions_own_backoff_says_it(tmp_path: Path) -> None:
    """The gateway link is up but the sessions fail (here: our certificate is of another
    site, which the agent's TLS refuses): the next attempt is the keeper's own, after its
    backoff's pause."""
    site, other = make_pki(tmp_path / "pki"), make_pki(tmp_path / "other")
    async with running_agent(site) as (server, kept):
        keeper = keeper_for(kept, context(site, site.device("retry")), site)
        keeper.backoff = ExponentialBackoff(20.0, 40.0, rng=Ceiling())
        keeper.offline_after = 0.0
        keeper.start()
        try:
            await wait_until(keeper.up.is_set)
            assert keeper.retry_in() is None  # up: nothing scheduled
            keeper.ctx = context(other, other.device("stranger"))
            for link in list(server.sessions):  # the next session presents it
                link.close()
            await wait_until(lambda: keeper.retry_in() is not None)
            due = keeper.retry_in()
            assert due is not None and RETRY_AFTER_MIN < due <= 20.0
            tunnel = Tunnel(keeper, open_timeout=600.0)
            async with asyncio.timeout(WAIT):  # offline: at once, not after open_timeout
                with pytest.raises(TunnelOffline) as raised:
                    await tunnel.open_stream({HEADER_TARGET: "tcp:none"})
            assert RETRY_AFTER_MIN < raised.value.retry_after <= 20
        finally:
            await keeper.close(0.5)


@pytest.mark.parametrize(
    ("seconds", "header"),
    [(None, 1), (0.0, 1), (0.2, 1), (1.01, 2), (19.5, 20), (30.0, 30), (31.0, 30),
     (float("inf"), 1), (float("nan"), 1)],
)  # fmt: skip
def test_retry_after_is_whole_seconds_rounded_up_within_its_bounds(
    seconds: float | None, header: int
) -> None:
    assert retry_after(seconds) == header
