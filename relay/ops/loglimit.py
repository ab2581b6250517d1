"""Warnings that a peer can cause once per stream, limited per peer: a hostile device
opening refused streams as fast as it can must not fill the agent's log (and rotate the
other devices' lines away). Each key may log `burst` lines at once and then one per
`1 / rate` seconds; what is held back is counted and reported on the next line that is
let through (`suppressed`), so the log still says how many there were. The counters in
the metrics count every one.

Time is passed in, as in relay.ops.ratelimit.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

from relay.ops.ratelimit import RateLimiter

__all__ = ["LOG_BURST", "LOG_RATE", "LogLimiter"]

LOG_BURST: Final = 20  # lines per key at once
LOG_RATE: Final = 0.1  # lines per key per second after the burst
MAX_KEYS: Final = 10_000  # keys remembered (least recently seen first out)


class LogLimiter:
    def __init__(
        self,
        rate: float = LOG_RATE,
        burst: int = LOG_BURST,
        max_keys: int = MAX_KEYS,
        *,
        total: tuple[float, int] | None = None,
    ) -> None:
        """`total`: (rate, burst) over all keys together as well, where the keys are not
        scarce (source addresses: a botnet has many, and a key forgotten from the
        table gets a fresh burst)."""
        self._limiter = RateLimiter(rate, burst, max_keys)
        self._total = RateLimiter(total[0], total[1], 1) if total is not None else None
        self._held: OrderedDict[str, int] = OrderedDict()
        self.max_keys = max_keys

    def allow(self, key: str, now: float) -> int | None:
        """None: hold this line back (it is counted). Else log it, saying the returned
        number of lines for `key` were held back before it."""
        if self._limiter.allow(key, now) and (self._total is None or self._total.allow("", now)):
            return self._held.pop(key, 0)
        self._held[key] = self._held.pop(key, 0) + 1
        while len(self._held) > self.max_keys:
            self._held.popitem(last=False)
        return None
