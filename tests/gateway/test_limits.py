"""gateway.limits: the ledgers count, refuse over their caps, and forget what is idle."""

from __future__ import annotations

import pytest

from gateway.limits import DeviceLedger, DeviceLimits, SourceLedger, SourceLimits
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
    assert ledger.begin("10.0.0.1") and ledger.begin("10.0.0.1")
    assert not ledger.begin("10.0.0.1")
    assert ledger.begin("10.0.0.2")
    ledger.end("10.0.0.1")
    assert ledger.begin("10.0.0.1")
    for host in ("10.0.0.1", "10.0.0.1", "10.0.0.2"):
        ledger.end(host)
    assert (len(ledger), hits) == (0, ["source_handshakes"])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"links": 0}, "links"), ({"streams": 0}, "streams"), ({"buffered": 1000}, "buffered")],
)
def test_device_limits_bounds(kwargs: dict[str, int], field: str) -> None:
    with pytest.raises(FieldError) as info:
        DeviceLimits(**kwargs)
    assert info.value.field == field
