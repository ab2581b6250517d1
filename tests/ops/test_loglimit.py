"""Per-key limits on warnings a peer can cause once per stream."""

from __future__ import annotations

from relay.ops.loglimit import LogLimiter


def test_a_burst_then_one_line_per_interval_saying_how_many_were_held() -> None:
    limit = LogLimiter(rate=0.1, burst=3)
    assert [limit.allow("dev", 0.0) for _ in range(5)] == [0, 0, 0, None, None]
    assert limit.allow("dev", 5.0) is None  # half an interval: still held
    assert limit.allow("dev", 10.0) == 3  # the three held back are counted on this line
    assert limit.allow("dev", 10.0) is None
    assert limit.allow("dev", 20.0) == 1


def test_one_keys_flood_does_not_hold_back_anothers_lines() -> None:
    limit = LogLimiter(rate=0.1, burst=2)
    for _ in range(1000):
        limit.allow("hostile", 0.0)
    assert limit.allow("other", 0.0) == 0


def test_the_keys_it_remembers_are_bounded() -> None:
    limit = LogLimiter(rate=0.1, burst=1, max_keys=10)
    for i in range(1000):
        limit.allow(f"k{i}", 0.0)
        limit.allow(f"k{i}", 0.0)  # held: counted
    assert len(limit._held) <= 10
    assert len(limit._limiter) <= 10


def test_a_total_over_all_keys_limits_many_sources_together() -> None:
    limit = LogLimiter(rate=0.1, burst=2, total=(1.0, 5))
    allowed = [limit.allow(f"10.0.0.{i}", 0.0) for i in range(20)]
    assert sum(a is not None for a in allowed) == 5  # each key had a token; the total, 5
    assert limit.allow("10.0.0.19", 1.0) == 1  # a second later: its held line is counted
