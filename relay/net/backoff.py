"""Reconnect delays: exponential backoff with full jitter.

After a gateway restart every agent and workstation reconnects at once. Full jitter
(AWS Architecture Blog, "Exponential Backoff And Jitter") spreads them evenly:

    sleep = uniform(0, min(cap, base * 2 ** attempt))

This module is pure: no clock and no sleeping. The caller says how long a link stayed up
(`link_lasted`), and a link that stayed up long enough resets the sequence, so a healthy
link that drops once reconnects quickly while a flapping one backs off.
"""

from __future__ import annotations

import random
from typing import Protocol

from relay.ops.config import Backoff as BackoffConfig

__all__ = ["ExponentialBackoff", "Uniform"]


class Uniform(Protocol):
    """What the backoff needs from an RNG (random.Random fits); injectable for tests."""

    def uniform(self, a: float, b: float) -> float: ...


class ExponentialBackoff:
    """Delays for successive failed attempts; `attempt` counts them since the last reset."""

    def __init__(
        self,
        base: float,
        cap: float,
        *,
        reset_after: float | None = None,
        rng: Uniform | None = None,
    ) -> None:
        if not 0 < base <= cap:
            raise ValueError(f"need 0 < base <= cap, got base={base} cap={cap}")
        self.base = base
        self.cap = cap
        # A link that lived at least this long was healthy: start over. Default: the cap,
        # but never less than 10 s, so a link refused right after its handshake (bad
        # certificate, gateway draining) keeps backing off.
        self.reset_after = max(cap, 10.0) if reset_after is None else reset_after
        self.rng: Uniform = rng if rng is not None else random.SystemRandom()
        self.attempt = 0

    @classmethod
    def from_config(
        cls, config: BackoffConfig, *, rng: Uniform | None = None
    ) -> ExponentialBackoff:
        """From a role's `reconnect: {initial, max}` config section."""
        return cls(config.initial, config.maximum, rng=rng)

    def ceiling(self) -> float:
        """The upper bound of the next delay: min(cap, base * 2**attempt)."""
        # attempt stops growing once the cap is reached (see next_delay), so no overflow.
        return min(self.cap, self.base * 2.0**self.attempt)

    def next_delay(self) -> float:
        """The delay before the next attempt, in [0, ceiling()]; counts one attempt."""
        ceiling = self.ceiling()
        delay = self.rng.uniform(0.0, ceiling)
        if ceiling < self.cap:
            self.attempt += 1
        return min(max(delay, 0.0), ceiling)

    def reset(self) -> None:
        self.attempt = 0

    def link_lasted(self, seconds: float) -> None:
        """Report how long the last link stayed up; long enough resets the sequence."""
        if seconds >= self.reset_after:
            self.reset()
