"""Exponential backoff with full jitter: bounds, growth, cap, reset."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.net.backoff import ExponentialBackoff
from relay.ops.config import Backoff


class Extreme:
    """An RNG that always returns one end of the interval."""

    def __init__(self, high: bool) -> None:
        self.high = high
        self.calls: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.calls.append((a, b))
        return b if self.high else a


def test_ceiling_doubles_up_to_the_cap() -> None:
    rng = Extreme(high=True)
    b = ExponentialBackoff(0.5, 30.0, rng=rng)
    delays = [b.next_delay() for _ in range(10)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
    assert all(a == 0.0 for a, _ in rng.calls)  # full jitter: always from zero


def test_full_jitter_can_be_zero() -> None:
    b = ExponentialBackoff(1.0, 8.0, rng=Extreme(high=False))
    assert [b.next_delay() for _ in range(5)] == [0.0] * 5


@given(
    base=st.floats(0.001, 10.0),
    factor=st.floats(1.0, 1000.0),
    attempts=st.integers(1, 200),
    seed=st.integers(0, 2**32),
)
def test_every_delay_is_within_full_jitter_bounds(
    base: float, factor: float, attempts: int, seed: int
) -> None:
    cap = base * factor
    b = ExponentialBackoff(base, cap, rng=random.Random(seed))
    for attempt in range(attempts):
        bound = min(cap, base * 2.0**attempt)
        delay = b.next_delay()
        assert 0.0 <= delay <= bound


def test_distribution_spreads_over_the_interval() -> None:
    """The point of jitter: many clients do not pick the same moment."""
    rng = random.Random(1234)
    samples = []
    for _ in range(2000):
        b = ExponentialBackoff(1.0, 64.0, rng=rng)
        for _ in range(3):
            b.next_delay()
        samples.append(b.next_delay())  # attempt 3: uniform(0, 8)
    assert min(samples) >= 0.0 and max(samples) <= 8.0
    quarters = [sum(1 for s in samples if q * 2 <= s < (q + 1) * 2) for q in range(4)]
    assert all(400 <= count <= 600 for count in quarters), quarters


def test_reset_after_a_long_enough_link() -> None:
    b = ExponentialBackoff(1.0, 30.0, reset_after=20.0, rng=Extreme(high=True))
    for _ in range(4):
        b.next_delay()
    assert b.ceiling() == 16.0
    b.link_lasted(5.0)  # a short-lived link (refused after the handshake): keep backing off
    assert b.next_delay() == 16.0
    b.link_lasted(20.0)
    assert b.attempt == 0
    assert b.next_delay() == 1.0


def test_default_reset_after_is_at_least_the_cap() -> None:
    assert ExponentialBackoff(0.5, 30.0).reset_after == 30.0
    assert ExponentialBackoff(0.1, 1.0).reset_after == 10.0


def test_attempt_counter_stops_at_the_cap() -> None:
    b = ExponentialBackoff(1.0, 4.0, rng=Extreme(high=True))
    for _ in range(10_000):
        b.next_delay()
    assert b.attempt == 2
    assert b.next_delay() == 4.0


def test_from_config() -> None:
    b = ExponentialBackoff.from_config(Backoff(initial=0.25, maximum=2.0))
    assert (b.base, b.cap) == (0.25, 2.0)


@pytest.mark.parametrize(("base", "cap"), [(0.0, 1.0), (2.0, 1.0), (-1.0, 5.0)])
def test_bad_parameters(base: float, cap: float) -> None:
    with pytest.raises(ValueError):
        ExponentialBackoff(base, cap)
