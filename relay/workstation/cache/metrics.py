"""`relay_cache_*` and `relay_prefetch_*`: what the cache holds, serves, drops and fetches."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from relay.workstation.cache.service import WorkstationCache

DROP_REASONS = ("size", "expired", "damaged", "abandoned", "evicted", "wiped", "revoked")


class CacheMetrics(Collector):
    def __init__(self, cache: WorkstationCache) -> None:
        self.cache = cache
        self.drops = dict.fromkeys(DROP_REASONS, 0)

    def dropped(self, reason: str, n: int) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + n

    def collect(self) -> Iterator[Metric]:
        c = self.cache
        yield GaugeMetricFamily("relay_cache_bytes", "Sealed bytes on disk in the cache",
                                value=c.store.total)  # fmt: skip
        yield GaugeMetricFamily("relay_cache_max_bytes", "cache.max_size", value=c.store.max_size)
        g = GaugeMetricFamily("relay_cache_studies", "Studies in the cache by state",
                              labels=["state"])  # fmt: skip
        for state, n in c.store.states().items():
            g.add_metric([state], n)
        yield g
        k = c.server.counters
        r = CounterMetricFamily("relay_cache_requests", "C-GET/C-MOVE looked up in the cache",
                                labels=["result"])  # fmt: skip
        r.add_metric(["hit"], k.hits)
        r.add_metric(["miss"], k.misses)
        yield r
        yield CounterMetricFamily("relay_cache_served_bytes", "Dataset bytes served from the cache",
                                  value=k.served_bytes)  # fmt: skip
        yield CounterMetricFamily("relay_cache_offline_finds", "C-FIND answered from the index "
                                  "while the link was down", value=k.offline_finds)  # fmt: skip
        d = CounterMetricFamily("relay_cache_evictions", "Studies or files dropped, by reason",
                                labels=["reason"])  # fmt: skip
        for reason, n in self.drops.items():
            d.add_metric([reason], n)
        yield d
        p = c.prefetcher.counters
        yield GaugeMetricFamily("relay_prefetch_queue", "Studies waiting to be prefetched",
                                value=c.prefetcher.queue.qsize())  # fmt: skip
        yield CounterMetricFamily("relay_prefetch_refused", "Studies not queued: prefetch.queue "
                                  "full", value=p.refused)  # fmt: skip
        s = CounterMetricFamily("relay_prefetch_studies", "Prefetched studies by result",
                                labels=["result"])  # fmt: skip
        for result, n in p.done.items():
            s.add_metric([result], n)
        yield s
        yield CounterMetricFamily("relay_prefetch_bytes", "Dataset bytes prefetched", value=p.bytes)
        yield CounterMetricFamily("relay_prefetch_seconds", "Time spent prefetching",
                                  value=p.seconds)  # fmt: skip
        rr = CounterMetricFamily("relay_prefetch_rule_runs", "Worklist rule evaluations",
                                 labels=["rule"])  # fmt: skip
        for rule in c.prefetcher.config.rules:
            rr.add_metric([rule.name], p.rule_runs.get(rule.name, 0))
        yield rr
