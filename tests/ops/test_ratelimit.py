from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from relay.ops.ratelimit import RateLimiter


def test_burst_then_refill() -> None:
    rl = RateLimiter(rate=1.0, burst=3)
    assert [rl.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert rl.allow("b", 0.0)  # other keys have their own bucket
    assert not rl.allow("a", 0.5)
    assert rl.allow("a", 1.6)


def test_table_is_bounded() -> None:
    rl = RateLimiter(rate=1.0, burst=1, max_keys=100)
    for i in range(10_000):
        rl.allow(f"10.0.{i // 256}.{i % 256}", float(i))
    assert len(rl) == 100


@given(st.lists(st.floats(min_value=0, max_value=1000), min_size=1, max_size=200))
def test_never_more_than_burst_plus_rate_times_elapsed(times: list[float]) -> None:
    rl = RateLimiter(rate=2.0, burst=5)
    times.sort()
    allowed = sum(rl.allow("k", t) for t in times)
    assert allowed <= 5 + 2.0 * (times[-1] - times[0]) + 1e-9
