"""gateway.limits: the ledgers count, refuse over their caps, and forget what is idle."""

from __future__ import annotations

import pytest

from gateway.limits import (
    ENROLL_BUFFERED,
    SESSION_OPEN_BURST,
    SESSION_OPENS_PER_SECOND,
    AllSourcesLimits,
    DeviceLedger,
    DeviceLimits,
    DeviceUsage,
    SourceLedger,
    SourceLimits,
    source_key,
)
from relay.proto.settings import FieldError

DEV = "spiffe://td/device/main/ws1"


def test_device_ledger_counts_refuses_and_forgets() -> None:
    hits: list[str] = []
    ledger = DeviceLedger(DeviceLimits(links=1, streams=2, agent_reserve=3), hits.append)
    assert ledger.add_link(DEV)
    assert not ledger.add_link(DEV)
    agent = object()
    assert ledger.stream_refusal(DEV, agent, free=10) is None
    ledger.add_stream(DEV, agent)
    # Holding a stream there, it may not dip into the reserve; a newcomer may.
    assert ledger.stream_refusal(DEV, agent, free=3) == "agent_share"
    assert ledger.stream_refusal("spiffe://td/device/main/new", agent, free=1) is None
    ledger.add_stream(DEV, agent)
    assert ledger.stream_refusal(DEV, agent, free=10) == "device_streams"
    usage = ledger.usage(DEV)
    usage.buffered = ledger.limits.buffered + 1
    assert ledger.over_buffered(usage)
    usage.buffered = 0
    assert hits == ["device_links", "agent_share", "device_streams", "device_buffered"]
    ledger.remove_stream(DEV, agent)
    ledger.remove_stream(DEV, agent)
    ledger.remove_link(DEV)
    assert len(ledger) == 0


def test_source_ledger() -> None:
    hits: list[str] = []
    ledger = SourceLedger(SourceLimits(handshakes=2), hits.append)
    assert ledger.begin("10.0.0.1", 0) is None and ledger.begin("10.0.0.1", 0) is None
    assert ledger.begin("10.0.0.1", 0) == "source_handshakes"
    assert ledger.begin("10.0.0.2", 0) is None
    ledger.end("10.0.0.1")
    assert ledger.begin("10.0.0.1", 0) is None
    for host in ("10.0.0.1", "10.0.0.1", "10.0.0.2"):
        ledger.end(host)
    assert (len(ledger), hits) == (0, ["source_handshakes"])


def test_a_source_starts_handshakes_at_its_rate_after_its_burst() -> None:
    """Each handshake ending at once (a TLS CPU flood) never held a slot for long, so the
    concurrency cap alone let one source make the gateway sign as fast as it could ask."""
    hits: list[str] = []
    limits = SourceLimits(handshakes=1000, handshake_rate=10, handshake_burst=5)
    ledger = SourceLedger(limits, hits.append, source_buckets=2)

    def started(host: str, now: float) -> bool:
        refusal = ledger.begin(host, now)
        if refusal is None:
            ledger.end(host)
        return refusal is None

    assert [started("10.0.0.1", 0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert hits == ["source_rate", "source_rate"]
    assert started("2001:db8::1", 0.0)  # another source: its own bucket
    assert started("10.0.0.1", 0.1) and not started("10.0.0.1", 0.1)  # 10 a second
    assert [started("2001:db8::1", 0.1) for _ in range(6)] == [True] * 5 + [False]
    assert ledger.rate_buckets == 2  # bounded: the third source forgets the oldest
    assert started("10.0.0.3", 0.1) and ledger.rate_buckets == 2
    ledger.limits = SourceLimits(handshakes=1000, handshake_rate=10, handshake_burst=5)
    assert not started("2001:db8::1", 0.1)  # the same rate: buckets kept
    ledger.limits = SourceLimits(handshakes=1000, handshake_rate=20, handshake_burst=5)
    assert started("2001:db8::1", 0.1)  # a new rate: every bucket starts full
    assert len(ledger) == 0


def test_source_limits_are_checked() -> None:
    for key, value in (("handshake_rate", 0), ("handshake_burst", 0), ("handshake_rate", 10**7)):
        with pytest.raises(FieldError) as bad:
            SourceLimits(**{key: value})
        assert bad.value.field == key


def all_sources_ledger(total: AllSourcesLimits, hits: list[str]) -> SourceLedger:
    """A ledger whose per-source limits never bite: only all sources' budget does."""
    generous = SourceLimits(handshakes=1000, handshake_rate=1000, handshake_burst=1000)
    return SourceLedger(generous, hits.append, all_sources=total)


def test_all_sources_together_start_handshakes_at_their_rate() -> None:
    """Each source within its own limits, many sources together still made the gateway
    handshake as fast as they asked: the event loop that relays every link did nothing
    else. Quiet sources (nothing under way) may take every token."""
    hits: list[str] = []
    ledger = all_sources_ledger(AllSourcesLimits(handshake_rate=10, handshake_burst=20), hits)

    def started(host: str, now: float) -> bool:
        refusal = ledger.begin(host, now)
        if refusal is None:
            ledger.end(host)
        return refusal is None

    hosts = [f"10.0.{i}.1" for i in range(40)]
    assert sum(started(host, 0.0) for host in hosts) == 20
    assert hits == ["all_sources_rate"] * 20
    assert sum(started(host, 1.0) for host in hosts) == 10  # 10 a second
    assert sum(started(host, 1.0) for host in hosts) == 0
    assert ledger.pending == 0 and len(ledger) == 0


def test_all_sources_together_hold_at_most_their_handshakes() -> None:
    hits: list[str] = []
    ledger = all_sources_ledger(AllSourcesLimits(handshakes=16), hits)
    hosts = [f"10.0.{i}.1" for i in range(20)]
    assert [ledger.begin(host, 0.0) for host in hosts] == [None] * 16 + [
        "all_sources_handshakes"
    ] * 4
    assert ledger.pending == 16
    ledger.end(hosts[0])
    assert ledger.begin(hosts[19], 0.0) is None  # a slot given back is usable again
    ledger.end(hosts[19])  # and one that was refused gives nothing back
    ledger.end(hosts[18])
    assert ledger.pending == 15
    for host in hosts[1:16]:
        ledger.end(host)
    assert (ledger.pending, len(ledger)) == (0, 0)


def test_a_busy_source_leaves_all_sources_reserve_to_quiet_ones() -> None:
    """One source within its own (generous) limits took the whole gateway-wide budget,
    and a device dialling from anywhere else was refused: a source with a handshake under
    way may not take the last eighth of the slots, nor of the tokens."""
    hits: list[str] = []
    ledger = all_sources_ledger(AllSourcesLimits(handshakes=16, handshake_burst=1000), hits)
    busy = [ledger.begin("10.0.0.1", 0.0) for _ in range(20)]
    assert busy == [None] * 14 + ["all_sources_handshakes"] * 6  # 16 - 16 // 8
    assert ledger.begin("10.0.0.2", 0.0) is None and ledger.begin("10.0.0.3", 0.0) is None
    assert ledger.begin("10.0.0.4", 0.0) == "all_sources_handshakes"  # all 16 now

    ledger = all_sources_ledger(AllSourcesLimits(handshake_rate=1, handshake_burst=80), hits)
    busy = [ledger.begin("10.0.0.1", 0.0) for _ in range(100)]
    assert busy.count(None) == 70  # 80 - 80 // 8
    assert set(busy[70:]) == {"all_sources_rate"}
    quiet = [ledger.begin(f"10.0.1.{i}", 0.0) for i in range(20)]
    assert quiet.count(None) == 10


def test_neither_budget_is_spent_on_what_the_other_refuses() -> None:
    """A source over its own rate spends none of all sources' tokens, and a refusal by
    all sources' budget spends none of the source's."""
    hits: list[str] = []
    own = SourceLimits(handshakes=1000, handshake_rate=1, handshake_burst=2)
    ledger = SourceLedger(own, hits.append, all_sources=AllSourcesLimits(handshake_burst=3))

    def started(host: str, now: float) -> str | None:
        refusal = ledger.begin(host, now)
        if refusal is None:
            ledger.end(host)
        return refusal

    assert [started("10.0.0.1", 0.0) for _ in range(5)] == [None, None] + ["source_rate"] * 3
    assert started("10.0.0.2", 0.0) is None  # the third token of all sources is left
    assert [started("10.0.0.3", 0.0) for _ in range(3)] == ["all_sources_rate"] * 3
    # 10.0.0.3 still has its own burst once all sources' bucket has refilled.
    assert [started("10.0.0.3", 0.01) for _ in range(3)] == [None, None, "source_rate"]


def test_a_reload_of_all_sources_limits() -> None:
    hits: list[str] = []
    ledger = all_sources_ledger(AllSourcesLimits(handshake_rate=1, handshake_burst=2), hits)
    for host in ("10.0.0.1", "10.0.0.2"):
        assert ledger.begin(host, 0.0) is None
    assert ledger.begin("10.0.0.3", 0.0) == "all_sources_rate"
    ledger.all_sources = AllSourcesLimits(handshake_rate=1, handshake_burst=2)
    assert ledger.begin("10.0.0.3", 0.0) == "all_sources_rate"  # the same: bucket kept
    ledger.all_sources = AllSourcesLimits(handshakes=2, handshake_rate=2, handshake_burst=2)
    assert ledger.begin("10.0.0.3", 0.0) == "all_sources_handshakes"  # 2 under way
    ledger.end("10.0.0.1")
    assert ledger.begin("10.0.0.3", 0.0) is None  # a new rate: the bucket starts full


def test_all_sources_limits_are_checked() -> None:
    assert AllSourcesLimits() == AllSourcesLimits(
        handshakes=1024, handshake_rate=300, handshake_burst=600
    )
    for key, value in (("handshakes", 0), ("handshake_rate", 0), ("handshake_burst", 10**7)):
        with pytest.raises(FieldError) as bad:
            AllSourcesLimits(**{key: value})
        assert bad.value.field == key


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("10.0.0.1", "10.0.0.1"),
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),  # a dual-stack socket's IPv4 client
        ("::1", "::/64"),
        ("?", "?"),  # no address (getpeername failed): a key of its own
    ],
)
def test_a_source_is_an_ipv4_address_or_an_ipv6_slash_64(host: str, key: str) -> None:
    assert source_key(host) == key


def test_addresses_of_one_ipv6_slash_64_share_the_handshake_cap() -> None:
    """A host holds a whole /64: keyed by the full address it had 2^64 sources' worth of
    handshake slots, every one up to max_links. Another /64 and IPv4 are not affected,
    and each address's end gives back its /64's slot."""
    hits: list[str] = []
    ledger = SourceLedger(SourceLimits(handshakes=3), hits.append)
    one_host = [f"2001:db8:0:1::{i:x}" for i in range(1, 5)]
    assert [ledger.begin(host, 0) for host in one_host] == [None, None, None, "source_handshakes"]
    assert ledger.begin("2001:db8:0:2::1", 0) is None and ledger.begin("192.0.2.1", 0) is None
    assert hits == ["source_handshakes"]
    ledger.end(one_host[0])
    assert ledger.begin(one_host[3], 0) is None
    for host in (*one_host[1:], "2001:db8:0:2::1", "192.0.2.1"):
        ledger.end(host)
    assert len(ledger) == 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"links": 0}, "links"), ({"streams": 0}, "streams"), ({"buffered": 1000}, "buffered")],
)
def test_device_limits_bounds(kwargs: dict[str, int], field: str) -> None:
    with pytest.raises(FieldError) as info:
        DeviceLimits(**kwargs)
    assert info.value.field == field


def test_session_opens_are_a_token_bucket_per_device() -> None:
    """A device that opens sessions in a loop (and resets them: HTTP/2's rapid reset)
    costs the agent a TLS handshake each: SESSION_OPEN_BURST at once, then
    SESSION_OPENS_PER_SECOND. Another device is not touched."""
    hits: list[str] = []
    ledger = DeviceLedger(DeviceLimits(), hits.append)
    other = "spiffe://td/device/main/ws2"
    assert ledger.add_link(DEV) and ledger.add_link(other)
    for _ in range(SESSION_OPEN_BURST):
        assert ledger.spend_open(DEV, 100.0)
    assert not ledger.spend_open(DEV, 100.0)
    assert ledger.spend_open(other, 100.0)
    assert hits == ["device_opens"]
    assert ledger.spend_open(DEV, 100.0 + 1.0 / SESSION_OPENS_PER_SECOND)  # refilled one
    assert not ledger.spend_open(DEV, 100.0 + 1.0 / SESSION_OPENS_PER_SECOND)
    # Reconnect retries with backoff (a request every 2 s at worst) never run dry.
    now = 200.0
    for _ in range(1000):
        now += 2.0
        assert ledger.spend_open(DEV, now)
    ledger.remove_link(DEV)
    ledger.remove_link(other)
    assert len(ledger) == 0


def test_a_reconnect_does_not_refill_the_session_open_bucket() -> None:
    """The bucket outlives the device's links: dropping every link (the ledger forgets the
    device) and linking again within the same second brings no new burst."""
    hits: list[str] = []
    ledger = DeviceLedger(DeviceLimits(), hits.append)
    now = 100.0
    assert ledger.add_link(DEV)
    for _ in range(SESSION_OPEN_BURST):
        assert ledger.spend_open(DEV, now)
    ledger.remove_link(DEV)
    assert len(ledger) == 0  # nothing held: the usage entry is gone, the bucket is not
    assert ledger.open_buckets == 1
    for _ in range(10):  # ten reconnects
        assert ledger.add_link(DEV)
        assert not ledger.spend_open(DEV, now)
        ledger.remove_link(DEV)
    assert hits == ["device_opens"] * 10
    assert ledger.add_link(DEV)
    assert ledger.spend_open(DEV, now + 1.0 / SESSION_OPENS_PER_SECOND)  # the rate holds
    ledger.remove_link(DEV)


def test_session_open_buckets_are_bounded() -> None:
    """One bucket per device that opened a session, the least recently used forgotten
    first: a flood of identities costs bounded memory."""
    ledger = DeviceLedger(DeviceLimits(), lambda _: None, open_buckets=3)
    for i in range(10):
        assert ledger.spend_open(f"spiffe://td/device/main/ws{i}", 100.0)
    assert ledger.open_buckets == 3


def test_an_enrollment_budget_is_counted_as_its_own_limit() -> None:
    hits: list[str] = []
    ledger = DeviceLedger(DeviceLimits(), hits.append)
    budget = DeviceUsage(buffered=ENROLL_BUFFERED)  # the router makes one per stream
    assert not ledger.over_enroll_buffered(budget)
    budget.buffered += 1
    assert ledger.over_enroll_buffered(budget)
    assert hits == ["enroll_buffered"]
