"""gateway.server.LinkTable: the live links by role, and their count."""

from __future__ import annotations

import time
from typing import cast

from gateway.server import LinkTable
from relay.net.aio import Link

DEVICES = 20_000


def uri(i: int) -> str:
    return f"spiffe://td/device/main/ws{i}"


def test_counting_the_links_costs_the_same_however_many_devices_are_linked() -> None:
    """The accept loop asks len(LinkTable) for every connection, a bare TCP connect from
    anyone included: it summed every device's set (0.4 ms with 10,000 devices, 0.7 s for
    these 1,000 counts), so such connects alone could keep the event loop busy. Now a
    count kept as links come and go, right through adds and removes done twice."""
    table = LinkTable()
    links = [cast(Link, object()) for _ in range(DEVICES + 1)]
    for i, link in enumerate(links[:DEVICES]):
        table.add_device(uri(i), link)
    table.add_device(uri(0), links[DEVICES])  # a second link of one device
    table.add_device(uri(0), links[DEVICES])  # counted once
    table.agents.add(cast(Link, object()))
    assert len(table) == DEVICES + 2
    start = time.perf_counter()
    for _ in range(1_000):
        len(table)
    assert time.perf_counter() - start < 0.1
    for i, link in enumerate(links[:100]):
        table.remove_device(uri(i), link)
        table.remove_device(uri(i), link)  # gone already: not counted again
    assert len(table) == DEVICES + 2 - 100
    assert uri(0) in table.devices and uri(1) not in table.devices
    table.remove_device(uri(0), links[DEVICES])
    assert uri(0) not in table.devices
    assert len(table) == len(table.all()) == DEVICES + 1 - 100
