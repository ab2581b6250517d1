"""What one device may make the agent hold: streams per session, TCP connections and PACS
operations per device (over all its sessions), PACS operations for all devices.

The real gateway and agent (run_agent) on loopback, devices with real sealed sessions;
the `dicom` handler is a stand-in that holds its stream until the device ends it (the
counting is the dispatcher's, whatever the handler does), the TCP service one that holds
each connection until the agent closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from relay.agent.config import DEFAULT_PACS_OPERATIONS, ServiceConfig, load_agent_config
from relay.agent.dispatch import QUOTA_TCP, Quota, QuotaUsage, admit_request, stream_quotas
from relay.agent.service import Agent
from relay.agent.sessions import SESSION_MAX_STREAMS
from relay.dicom import status as st
from relay.dicom.codec import MessageCodec, Request
from relay.dicom.session import Session, SessionEnded
from relay.net.aio import Link, Stream
from relay.net.bytestream import ByteStream, StreamResetError
from relay.ops.config import Address, ConfigError
from relay.proto import ErrorCode, StreamStateError
from relay.wire import TARGET_DICOM
from tests.agent.test_dispatch import device_link, expect_reset, running_agent
from tests.ends_helpers import (
    LIMITS,
    WAIT,
    GatewayHandle,
    TcpService,
    agent_config,
    running_gateway,
    tcp_service,
    wait_until,
)
from tests.ops.test_config import example_tree
from tests.pki_helpers import HOST, SitePki, make_pki
from tests.ports import dead_port
from tests.session_helpers import sealed

PACS_OPERATIONS = 4  # pacs.max_operations here: 2 per device (half), 4 in all
RAISE = "raise"  # the `mode` header that makes the stand-in handler fail


@dataclass
class World:
    pki: SitePki
    gateway: GatewayHandle
    agent: Agent
    hold: TcpService
    handled: list[Stream]
    outers: dict[str, Link] = field(default_factory=dict)
    sessions: list[Link] = field(default_factory=list)

    async def session(self, device: str) -> Link:
        """A new sealed session of `device` (one gateway link per device, reused)."""
        if device not in self.outers:
            self.outers[device] = await device_link(self.pki, self.gateway.port, device)
        inner = await sealed(self.outers[device], self.pki, self.pki.device(device))
        self.sessions.append(inner)
        return inner

    def usage(self, kind: str) -> QuotaUsage:
        return self.agent.dispatcher.usage[kind]

    def uri(self, device: str) -> str:
        return f"spiffe://{self.pki.trust_domain}/device/{self.pki.site}/{device}"


async def _holder(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A service connection that lasts until the agent's side ends it."""
    with contextlib.suppress(ConnectionError):
        await reader.read()
    writer.close()


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    pki = make_pki(tmp_path / "pki")
    handled: list[Stream] = []

    async def dicom(stream: Stream) -> None:
        handled.append(stream)
        if stream.headers.get("mode") == RAISE:
            raise RuntimeError("the handler failed (test)")
        with contextlib.suppress(StreamResetError):  # the device reset it, or left
            if await stream.read() and not admit_request():  # its "request", then a slot
                return
            await stream.read()  # until the device half-closes
            await stream.write(b"done")
            await stream.write_eof()

    with dead_port() as dead:
        async with running_gateway(pki, tmp_path) as gw, tcp_service(_holder) as hold:
            config = agent_config(pki, tmp_path, [gw.port], {"hold": (hold.port, False)})
            config = dataclasses.replace(
                config,
                # The agent's default link cap: a session must not inherit it.
                limits=dataclasses.replace(LIMITS, max_streams=4096),
                max_pacs_operations=PACS_OPERATIONS,
                services={**config.services, "dead": ServiceConfig("dead", Address(HOST, dead))},
            )
            async with running_agent(config, {TARGET_DICOM: dicom}) as agent:
                await wait_until(lambda: gw.server.router.sites() == ["main"])
                world = World(pki, gw, agent, hold, handled)
                yield world
                for link in [*world.sessions, *world.outers.values()]:
                    link.close()


async def _connected(world: World, inner: Link, count: int) -> Stream:
    """A `tcp:hold` stream, once the service has its connection (`count` in all)."""
    stream = inner.open_stream({"target": "tcp:hold"})
    await wait_until(lambda: world.hold.connections == count)
    return stream


async def _handling(
    world: World, inner: Link, count: int, *, request: bool = True, **headers: str
) -> Stream:
    """A `dicom` stream, once the handler has it (`count` handled in all); with `request`,
    its request sent (the stand-in then takes a slot of the total)."""
    stream = inner.open_stream({"target": TARGET_DICOM, **headers})
    await wait_until(lambda: len(world.handled) == count)
    if request:
        await stream.write(b"request")
    return stream


async def _refused(stream: ByteStream) -> int:
    """The stream's reset code, which must come at once (no connect, no handler)."""
    with pytest.raises(StreamResetError) as info:
        async with asyncio.timeout(2.0):
            await stream.read()
    return info.value.code


async def test_a_session_announces_a_device_sized_stream_cap(world: World) -> None:
    """Not the 4,096 of the agent's gateway links, which carry every device of the site."""
    inner = await world.session("ws1")
    assert inner.conn.free_local_streams == SESSION_MAX_STREAMS
    assert world.agent.config.limits.max_streams > SESSION_MAX_STREAMS
    opened = [inner.open_stream({"target": "tcp:none"}) for _ in range(SESSION_MAX_STREAMS)]
    with pytest.raises(StreamStateError):
        inner.open_stream({"target": "tcp:none"})
    for stream in opened:
        stream.reset(ErrorCode.CANCEL)


async def test_tcp_streams_are_capped_per_device_over_all_its_sessions(world: World) -> None:
    world.agent.dispatcher.set_quotas({QUOTA_TCP: Quota(per_device=2)})
    first, second = await world.session("ws1"), await world.session("ws1")
    held = [await _connected(world, first, 1), await _connected(world, second, 2)]
    # A third from either session: refused at once, and no connection to the service.
    assert await _refused(first.open_stream({"target": "tcp:hold"})) == ErrorCode.LIMIT_EXCEEDED
    assert await _refused(second.open_stream({"target": "tcp:hold"})) == ErrorCode.LIMIT_EXCEEDED
    assert world.hold.connections == 2
    assert world.agent.dispatcher.stats.refused["tcp_per_device"] == 2
    # Another device is not refused for it.
    other = await world.session("ws2")
    await _connected(world, other, 3)
    # One of ws1's ends: ws1 may open one again.
    held[0].reset(ErrorCode.CANCEL)
    await wait_until(lambda: world.usage(QUOTA_TCP).by_device[world.uri("ws1")] == 1)
    await _connected(world, second, 4)
    assert world.usage(QUOTA_TCP).total == 3


async def test_pacs_operations_are_capped_per_device_and_for_all_devices(world: World) -> None:
    """pacs.max_operations = 4: a device may hold 2 (half), all devices 4, and the last one
    (a quarter) only a device that holds none."""
    assert world.usage(TARGET_DICOM).quota == Quota(2, PACS_OPERATIONS, total_on_request=True)
    ws1 = await world.session("ws1")
    ws1_ops = [await _handling(world, ws1, 1), await _handling(world, ws1, 2)]
    refused = ws1.open_stream({"target": TARGET_DICOM})
    assert await _refused(refused) == ErrorCode.LIMIT_EXCEEDED
    ws2, ws3, ws4 = [await world.session(name) for name in ("ws2", "ws3", "ws4")]
    await _handling(world, ws2, 3)
    await wait_until(lambda: world.usage(TARGET_DICOM).total == 3)
    # ws2 holds one: the last slot is the quiet devices' reserve.
    assert await _refused(await _handling(world, ws2, 4)) == ErrorCode.LIMIT_EXCEEDED
    await _handling(world, ws3, 5)
    await wait_until(lambda: world.usage(TARGET_DICOM).total == PACS_OPERATIONS)
    # ws4 has none, but the PACS's slots are all taken: refused once its request is read.
    late = await _handling(world, ws4, 6)
    assert await _refused(late) == ErrorCode.LIMIT_EXCEEDED
    refusals = world.agent.dispatcher.stats.refused
    assert (refusals["dicom_per_device"], refusals["dicom_total"]) == (1, 2)
    # One of ws1's operations ends normally: its slot is free for ws4.
    await ws1_ops[0].write_eof()
    async with asyncio.timeout(WAIT):
        assert await ws1_ops[0].read() == b"done"
    await wait_until(lambda: world.usage(TARGET_DICOM).total == 3)
    await _handling(world, ws4, 7)
    await wait_until(lambda: world.usage(TARGET_DICOM).total == PACS_OPERATIONS)


def test_the_last_quarter_of_the_pacs_operations_is_for_devices_holding_none() -> None:
    """pacs.max_operations = 8, 4 a device: two devices took all 8 (4 each) for as long as
    their operations lasted. Now the second stops at 2 (the last 2 are the reserve), and
    two more devices get one each there; a device holding none may always take a free one."""
    usage = QuotaUsage(Quota(4, 8, total_on_request=True))

    def run(device: str) -> bool:
        return usage.take(device) is None and usage.take_total(device)

    assert [run("a") for _ in range(4)] == [True] * 4
    assert [run("b") for _ in range(4)] == [True, True, False, False]
    assert (run("c"), run("c"), run("d"), run("e")) == (True, False, True, False)
    assert usage.total == 8
    assert usage.holding == {"a": 4, "b": 2, "c": 1, "d": 1}
    usage.give_back("a")
    assert not run("a")  # in the reserve, a holds 3
    assert run("f")
    for device, held in {"a": 3, "b": 2, "c": 1, "d": 1, "f": 1}.items():
        for _ in range(held):
            usage.give_back(device)
    assert usage.total == 0 and not usage.holding


async def test_requests_still_coming_hold_no_slot_of_the_site(world: World) -> None:
    """Two devices with both their streams open and their requests not yet sent (a device
    trickling them) held all 4 of the site's slots: a third device was refused for as
    long as they took (the request's timeout, then again). Now a slot is taken once the
    request is read; the trickling devices hold their own shares only."""
    ws1, ws2, ws3 = [await world.session(name) for name in ("ws1", "ws2", "ws3")]
    slow = [await _handling(world, ws, n + 1, request=False)
            for n, ws in enumerate((ws1, ws1, ws2, ws2))]  # fmt: skip
    usage = world.usage(TARGET_DICOM)
    assert (usage.total, sum(usage.by_device.values())) == (0, 4)
    ops = [await _handling(world, ws3, 5), await _handling(world, ws3, 6)]
    await wait_until(lambda: usage.total == 2)
    # The slow ones' requests come: one of each device gets a slot (the last one is the
    # quiet devices' reserve, and each holds none yet), the others are refused.
    for stream in slow:
        await stream.write(b"request")
    await wait_until(lambda: world.agent.dispatcher.stats.refused["dicom_total"] == 2)
    assert usage.total == PACS_OPERATIONS
    for stream in ops:
        await stream.write_eof()
        async with asyncio.timeout(WAIT):
            assert await stream.read() == b"done"
    await wait_until(lambda: usage.total == 2 and usage.by_device[world.uri("ws3")] == 0)


async def _paths_end(world: World, kind: str) -> None:
    """Each way a counted stream can end, each followed by a look at the counts."""
    usage = world.usage(kind)

    async def settled() -> None:
        await wait_until(lambda: usage.total == 0 and not usage.by_device)

    inner = await world.session("ws1")
    opened = 0

    async def one(link: Link, **headers: str) -> Stream:
        nonlocal opened
        opened += 1
        if kind == QUOTA_TCP:
            return await _connected(world, link, opened)
        return await _handling(
            world, link, opened, request=RAISE not in headers.values(), **headers
        )

    stream = await one(inner)  # the device ends it
    await stream.write_eof()
    if kind == QUOTA_TCP:
        async with asyncio.timeout(WAIT):
            assert await stream.read() == b""  # the service closed after our EOF
    await settled()
    (await one(inner)).reset(ErrorCode.CANCEL)  # the device resets it
    await settled()
    await one(inner)  # the device's session is lost with the stream open
    inner.abort()
    await settled()
    inner = await world.session("ws1")
    if kind == QUOTA_TCP:  # the service cannot be reached
        assert await expect_reset(inner.open_stream({"target": "tcp:dead"})) == (
            ErrorCode.CONNECT_FAILED
        )
    else:  # the handler raises
        assert await expect_reset(await one(inner, mode=RAISE)) == ErrorCode.INTERNAL_ERROR
    await settled()
    await one(inner)  # the agent drains (a restart) with the stream open
    assert await world.agent.dispatcher.drain(0.0) == 1
    await settled()


@pytest.mark.parametrize("kind", [QUOTA_TCP, TARGET_DICOM])
async def test_counts_are_given_back_however_a_stream_ends(world: World, kind: str) -> None:
    await _paths_end(world, kind)


async def test_a_refused_operation_fails_at_the_workstation_without_a_retry(
    world: World,
) -> None:
    """The viewer gets a failure status (a C-STORE: out of resources), and the workstation
    does not resume it in a loop: LIMIT_EXCEEDED says the request, not the path, failed."""
    world.agent.dispatcher.set_quotas({TARGET_DICOM: Quota(per_device=1)})
    inner = await world.session("ws1")
    await _handling(world, inner, 1)

    async def open_stream(headers: object) -> ByteStream:
        return inner.open_stream({"target": TARGET_DICOM})

    session = Session(
        asyncio.get_running_loop(),
        open_stream,
        {"target": TARGET_DICOM},
        Request(op="echo"),
        MessageCodec(),
        open_timeout=WAIT,
    )
    session.start()
    with pytest.raises(SessionEnded) as info:
        await asyncio.to_thread(session.next_final, WAIT)
    session.close()
    assert info.value.status == st.AGENT_BUSY
    assert "busy" in info.value.reason
    assert st.for_store(info.value.status) == st.STORE_OUT_OF_RESOURCES
    assert not info.value.resumable


def test_a_device_never_holds_more_than_half_of_the_pacs_operations() -> None:
    for total in (1, 2, 3, 4, 10, 64, 65, 1024):
        quota = stream_quotas(total)[TARGET_DICOM]
        assert quota.total == total
        assert 1 <= quota.per_device <= max(1, total // 2)


def test_pacs_max_operations_is_read_from_the_pacs_section(tmp_path: Path) -> None:
    path = example_tree(tmp_path) / "config" / "agent.yaml"
    assert load_agent_config(path).max_pacs_operations == DEFAULT_PACS_OPERATIONS
    data = yaml.safe_load(path.read_text())
    for value, expected in ((8, 8), (0, None), ("lots", None)):
        data["pacs"]["max_operations"] = value
        path.write_text(yaml.safe_dump(data))
        if expected is None:
            with pytest.raises(ConfigError, match=r"pacs\.max_operations"):
                load_agent_config(path)
        else:
            assert load_agent_config(path).max_pacs_operations == expected
