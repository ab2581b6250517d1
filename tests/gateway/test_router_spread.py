"""Sessions are spread over a site's agent links by device (rendezvous hashing)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from gateway.limits import DeviceLedger, DeviceLimits
from gateway.metrics import GatewayMetrics
from gateway.router import Router


class _Conn:
    def __init__(self) -> None:
        self.open_streams = 0
        self.free_local_streams = 1000

    def can_open_stream(self) -> bool:
        return True


class _Link:
    """Just what routing looks at: a name and whether it takes streams."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.conn = _Conn()


def _router(names: list[str]) -> tuple[Router, list[Any]]:
    router = Router(GatewayMetrics(), DeviceLedger(DeviceLimits(), lambda _: None))
    links: list[Any] = [_Link(n) for n in names]
    for link in links:
        router.add_agent("main", link)
    return router, links


def test_devices_spread_evenly_and_each_sticks_to_its_agent() -> None:
    router, _ = _router(["agent@10.0.0.1:5000", "agent@10.0.0.2:5000"])
    devices = [f"spiffe://td/device/main/ws{i}" for i in range(400)]
    first = {d: router._pick_for("main", d) for d in devices}
    counts = Counter(link.name for link in first.values() if link is not None)
    assert min(counts.values()) >= 150, counts  # about 200 each
    assert all(router._pick_for("main", d) is first[d] for d in devices)  # sticky


def test_losing_an_agent_moves_only_its_devices() -> None:
    router, links = _router(["a@1", "b@2", "c@3"])
    devices = [f"spiffe://td/device/main/ws{i}" for i in range(300)]
    before = {d: router._pick_for("main", d) for d in devices}
    router.remove_agent("main", links[2])
    after = {d: router._pick_for("main", d) for d in devices}
    moved = [d for d in devices if before[d] is not after[d]]
    assert moved and all(before[d] is links[2] for d in moved)


def test_a_device_over_its_share_of_its_agent_goes_to_another() -> None:
    """Rendezvous gives way to the reserve: a device holding a session on its agent link,
    whose free streams are down to the reserve, is sent to another link of the site; a
    device with nothing there still gets its own agent."""
    router, links = _router(["a@1", "b@2"])
    router.devices.limits = DeviceLimits(agent_reserve=2)
    greedy = "spiffe://td/device/main/greedy"
    home = router._pick_for("main", greedy)
    assert home is not None
    router.devices.add_stream(greedy, home)
    fake = {id(link): link for link in links}  # the test's links, typed Any
    fake[id(home)].conn.free_local_streams = 2
    other = router._pick_for("main", greedy)
    assert other is not None and other is not home
    newcomer = next(
        f"spiffe://td/device/main/ws{i}"
        for i in range(100)
        if router._pick_for("main", f"spiffe://td/device/main/ws{i}") is home
    )
    assert router._pick_for("main", newcomer) is home
    fake[id(other)].conn.free_local_streams = 2
    router.devices.add_stream(greedy, other)
    assert router._pick_for("main", greedy) is home  # refused there, by route()
