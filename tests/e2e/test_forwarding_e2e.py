"""Issue 2 end to end: three real processes from the CLI over real TLS on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio

from tests.e2e.chain import (
    HOST,
    Chain,
    echo_once,
    open_forward,
    rss_kb,
    running_chain,
    until_echo_works,
)

GiB = 1024**3
BLOCK = os.urandom(1024 * 1024)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def block(i: int) -> bytes:
    """Deterministic 1 MiB blocks, each distinct, without holding 1 GiB in memory."""
    return i.to_bytes(8, "big") + BLOCK[8:]


def expected_digest(total: int) -> str:
    h = hashlib.sha256()
    for i in range(total // len(BLOCK)):
        h.update(block(i))
    return h.hexdigest()


async def scrape(chain: Chain, role: str) -> str:
    reader, writer = await asyncio.open_connection(*await chain.procs[role].alistening("metrics"))
    writer.write(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
    body = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    return body.decode()


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    writer.close()


async def sink_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Hashes everything until EOF, then answers with the digest (after the client's EOF)."""
    h = hashlib.sha256()
    while data := await reader.read(1 << 20):
        h.update(data)
    writer.write(h.hexdigest().encode())
    await writer.drain()
    writer.close()


async def source_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads the byte count wanted, then sends that many bytes."""
    total = int((await reader.readline()).decode())
    for i in range(total // len(BLOCK)):
        writer.write(block(i))
        await writer.drain()
    writer.write_eof()
    await writer.drain()
    writer.close()


class SlowReader:
    """Reads at about `rate` bytes per second, to exert backpressure end to end."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.received = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chunk = self.rate // 10
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(chunk):
                self.received += len(data)
                await asyncio.sleep(0.1)
        writer.close()


Services = dict[str, tuple[asyncio.Server, bool]]
SLOW = SlowReader(1_000_000)

# One chain for the module: starting the three processes (and the PKI) took 3-7 s per
# test. The tests do not disturb each other: each opens its own streams and compares
# metrics before and after; the one that kills the gateway runs last and brings it back.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def services() -> AsyncIterator[Services]:
    handlers: dict[str, tuple[Handler, bool]] = {
        "echo": (echo_handler, False),
        "zecho": (echo_handler, True),
        "sink": (sink_handler, False),
        "source": (source_handler, False),
        "slow": (SLOW, False),
    }
    servers = {
        name: (await asyncio.start_server(h, HOST, 0), compress)
        for name, (h, compress) in handlers.items()
    }
    yield servers
    for server, _ in servers.values():
        server.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def chain(
    tmp_path_factory: pytest.TempPathFactory, services: Services
) -> AsyncIterator[Chain]:
    ports = {n: (s.sockets[0].getsockname()[1], c) for n, (s, c) in services.items()}
    with running_chain(tmp_path_factory.mktemp("chain"), ports) as c:
        c.start()
        await until_echo_works(c, "echo")
        yield c


async def test_gibibyte_upload_arrives_identical(chain: Chain) -> None:
    reader, writer = await open_forward(chain, "sink")
    for i in range(GiB // len(BLOCK)):
        writer.write(block(i))
        await writer.drain()
    writer.write_eof()  # half-close: the reply still comes back
    digest = await asyncio.wait_for(reader.read(-1), 120)
    writer.close()
    assert digest.decode() == expected_digest(GiB)


async def test_gibibyte_download_arrives_identical(chain: Chain) -> None:
    reader, writer = await open_forward(chain, "source")
    writer.write(f"{GiB}\n".encode())
    await writer.drain()
    h = hashlib.sha256()
    received = 0
    while data := await asyncio.wait_for(reader.read(1 << 20), 60):
        h.update(data)
        received += len(data)
    writer.close()
    assert received == GiB
    assert h.hexdigest() == expected_digest(GiB)


async def test_compressed_service_round_trips(chain: Chain) -> None:
    payload = b"DICOM-ish text that compresses " * 20000 + os.urandom(100_000)
    assert await asyncio.wait_for(echo_once(chain, "zecho", payload), 60) == payload


async def test_twenty_concurrent_streams(chain: Chain) -> None:
    payloads = [os.urandom(500_000 + i) for i in range(20)]
    results = await asyncio.wait_for(
        asyncio.gather(*(echo_once(chain, "echo", p) for p in payloads)), 60
    )
    assert results == payloads


async def test_device_of_another_site_cannot_reach_the_service(chain: Chain) -> None:
    """A site-B device is linked, but no agent serves site B: refused with NO_ROUTE."""
    chain.start("wsb")
    try:
        reply = await asyncio.wait_for(echo_once(chain, "echo", b"hi", ws="wsb"), 40)
    except ConnectionResetError:
        reply = b""  # the workstation aborts the local connection of a refused stream
    assert reply == b""  # closed without a byte of the site-A service's answer
    text = await scrape(chain, "gateway")
    assert 'relay_streams_total{outcome="no_route",site="siteb"}' in text
    assert 'relay_links{role="device",site="siteb"} 1.0' in text
    assert 'relay_streams_total{outcome="routed",site="siteb"}' not in text


async def test_slow_reader_keeps_gateway_memory_bounded(chain: Chain) -> None:
    SLOW.received = 0
    gateway_pid = chain.procs["gateway"].pid
    before = rss_kb(gateway_pid)
    _, writer = await open_forward(chain, "slow")
    peak = before
    sent = 0
    loop = asyncio.get_running_loop()
    end = loop.time() + 8.0
    while loop.time() < end:
        writer.write(BLOCK)
        with contextlib.suppress(TimeoutError):  # held back: what backpressure should do
            await asyncio.wait_for(writer.drain(), 0.5)
        sent += len(BLOCK)
        peak = max(peak, rss_kb(gateway_pid))
    writer.transport.abort()
    assert SLOW.received > 2_000_000  # the reader did read, at about 1 MB/s
    assert (peak - before) < 64 * 1024, f"gateway grew by {(peak - before) // 1024} MB"


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    prefix = f"{name}{{{want}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return 0.0


async def test_metrics_of_all_three_roles_move_with_traffic(chain: Chain) -> None:
    before = {role: await scrape(chain, role) for role in ("gateway", "agent", "ws1")}
    payload = b"compressible " * 50_000
    assert await asyncio.wait_for(echo_once(chain, "zecho", payload), 30) == payload
    after = {role: await scrape(chain, role) for role in ("gateway", "agent", "ws1")}

    def moved_by(role: str, name: str, **labels: str) -> float:
        """How far a counter moved during this test (the chain is the module's)."""
        return sample(after[role], name, **labels) - sample(before[role], name, **labels)

    gw = after["gateway"]
    assert sample(gw, "relay_links", role="agent", site="main") == 1
    assert sample(gw, "relay_links", role="device", site="main") == 1
    moved = moved_by("gateway", "relay_bytes_total", direction="agent_to_device")
    assert 0 < moved < len(payload) // 10  # compressed by the agent: the gateway saw less

    agent = after["agent"]
    assert sample(agent, "relay_links", role="gateway", site="main") == 1
    assert moved_by("agent", "relay_streams_total", target="tcp:zecho") >= 1
    sent_raw = moved_by("agent", "relay_bytes_total", direction="sent", stage="raw")
    sent_wire = moved_by("agent", "relay_bytes_total", direction="sent", stage="compressed")
    assert sent_raw >= len(payload) > sent_wire > 0
    assert sample(agent, "relay_certificate_expiry_timestamp_seconds", role="agent") > 0

    ws = after["ws1"]
    assert sample(ws, "relay_links", role="gateway", site="main") == 1
    assert moved_by("ws1", "relay_bytes_total", direction="received", stage="raw") >= len(payload)


async def test_gateway_restart_reconnects_both_ends(chain: Chain) -> None:
    gateway = chain.procs["gateway"]
    assert gateway.stop(signal.SIGKILL) is not None
    reply = b""
    with contextlib.suppress(OSError, ConnectionError, TimeoutError):
        reply = await asyncio.wait_for(echo_once(chain, "echo", b"ping"), 2)
    assert reply == b""  # nothing gets through while the gateway is down
    await asyncio.sleep(1.0)
    gateway.start()
    await until_echo_works(chain, "echo", within=30)
