"""`relay_tunnel_*`: how the workstation's opens to the agent went (relay.workstation.tunnel).

The Tunnel counted them (TunnelStats) but nothing exported them, so an outage that made
every click fail at once (offline) or a gateway that kept answering NO_ROUTE (rerouted)
was visible only in the log. Read at scrape time; all four are exported from 0.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from relay.workstation.tunnel import TunnelStats

__all__ = ["TUNNEL_COUNTERS", "TunnelMetrics"]

#: Metric name (without `_total`), its help, and the TunnelStats field it reads.
TUNNEL_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("relay_tunnel_opened", "Streams to the agent handed to their callers", "opened"),
    ("relay_tunnel_rerouted", "Opens the gateway refused (NO_ROUTE, REFUSED_STREAM), "
     "retried transparently", "rerouted"),
    ("relay_tunnel_unavailable", "Opens that gave up: no stream to the agent", "unavailable"),
    ("relay_tunnel_offline", "Of those, failed at once: the link known down", "offline"),
)  # fmt: skip


class TunnelMetrics(Collector):
    """The Tunnel's counters as Prometheus counters."""

    def __init__(self, stats: TunnelStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        for name, text, field in TUNNEL_COUNTERS:
            yield CounterMetricFamily(name, text, value=getattr(self.stats, field))
