"""The Tunnel's counters are exported (relay.workstation.tunnelmetrics): TunnelStats
counted opened, rerouted, unavailable and offline opens, and no metric said so, so an
outage that failed every click at once was seen only in the log. A real Workstation
known offline (tests.workstation.test_offline_retry_after), scraped as Prometheus does."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from prometheus_client import generate_latest

from relay.workstation.service import Workstation
from relay.workstation.tunnel import TunnelStats
from relay.workstation.tunnelmetrics import TUNNEL_COUNTERS
from tests.workstation.test_offline_retry_after import _query, offline


def _scrape(ws: Workstation) -> dict[str, float]:
    """The relay_tunnel_* samples of the workstation's registry, by name."""
    text = generate_latest(ws.metrics.registry).decode()
    return {
        name: float(value)
        for name, _, value in (line.partition(" ") for line in text.splitlines())
        if name.startswith("relay_tunnel_")
    }


async def test_the_tunnels_counters_are_exported_from_zero(tmp_path: Path) -> None:
    async with offline(tmp_path, initial=20.0) as (ws, url):
        assert _scrape(ws) == {f"{name}_total": 0.0 for name, _, _ in TUNNEL_COUNTERS}
        assert (await _query(url))[0] == 503
        after = _scrape(ws)
        assert after["relay_tunnel_offline_total"] == ws.tunnel.stats.offline >= 1
        assert after["relay_tunnel_unavailable_total"] == ws.tunnel.stats.unavailable >= 1
        assert after["relay_tunnel_opened_total"] == after["relay_tunnel_rerouted_total"] == 0
        ws.tunnel.stats.opened += 3  # read at scrape time, from the Tunnel's own counters
        ws.tunnel.stats.rerouted += 2
        again = _scrape(ws)
        assert (again["relay_tunnel_opened_total"], again["relay_tunnel_rerouted_total"]) == (3, 2)


def test_every_tunnel_counter_is_exported() -> None:
    fields = {f.name for f in dataclasses.fields(TunnelStats)}
    assert {field for _, _, field in TUNNEL_COUNTERS} == fields
