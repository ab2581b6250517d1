"""The asyncio adapter: the relay/proto Link runs unchanged inside a sealed stream."""

from __future__ import annotations

import asyncio

import pytest

from relay.net.aio import Link, Stream
from relay.net.bytestream import ByteStream, StreamResetError, pipe, read_exactly
from relay.proto import ErrorCode, LinkSettings
from relay.seal.core import SealCore
from relay.seal.policy import ALPN_SESSION, agent_check, device_check
from relay.seal.session import SealedLink, SealStats, establish
from relay.seal.transport import SealError, SealTransport

from .helpers import SITE, TD, Pkis, make_pkis

WAIT = 20.0


@pytest.fixture(scope="module")
def pkis(tmp_path_factory: pytest.TempPathFactory) -> Pkis:
    return make_pkis(tmp_path_factory.mktemp("seal-pki"))


SETTINGS = LinkSettings(stream_window=65536, link_window=1 << 20, max_frame=16384)


async def _pair(
    pkis: Pkis,
    on_stream: object,
    *,
    outer: tuple[ByteStream, ByteStream] | None = None,
    is_revoked: object = None,
    stats: SealStats | None = None,
) -> tuple[SealedLink, SealedLink]:
    a, b = outer or pipe({"target": "session"})
    device = establish(
        a,
        pkis.client_ctx(),
        server_side=False,
        alpn=ALPN_SESSION,
        check_peer=agent_check(TD, SITE),
        settings=SETTINGS,
        name="device",
        timeout=WAIT,
        stats=stats,
    )
    agent = establish(
        b,
        pkis.server_ctx(),
        server_side=True,
        alpn=ALPN_SESSION,
        check_peer=device_check(TD, SITE, is_revoked),  # type: ignore[arg-type]
        settings=SETTINGS,
        name="agent",
        on_stream=on_stream,  # type: ignore[arg-type]
        timeout=WAIT,
    )
    d, s = await asyncio.gather(device, agent)
    return d, s


def _echo(tasks: set[asyncio.Task[None]]) -> object:
    async def serve(stream: Stream) -> None:
        while data := await stream.read():
            await stream.write(data)
        await stream.write_eof()

    def on_stream(stream: Stream) -> None:
        task = asyncio.ensure_future(serve(stream))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    return on_stream


async def test_inner_streams_are_multiplexed_inside_the_seal(pkis: Pkis) -> None:
    tasks: set[asyncio.Task[None]] = set()
    stats = SealStats()
    device, agent = await _pair(pkis, _echo(tasks), stats=stats)
    assert agent.link.peer.uri == f"spiffe://{TD}/device/{SITE}/ws1"
    assert device.link.peer.uri == f"spiffe://{TD}/agent/{SITE}"

    async def one(i: int) -> None:
        s = device.link.open_stream({"target": "echo"})
        payload = bytes([i]) * (200_000 + i)

        async def send() -> None:
            await s.write(payload)
            await s.write_eof()

        got, _ = await asyncio.gather(read_exactly(s, len(payload)), send())
        assert got == payload
        assert await s.read() == b""

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(8))), WAIT)
    device.link.close()
    await asyncio.wait_for(agent.link.wait_closed(), WAIT)
    await asyncio.wait_for(device.transport.finished, WAIT)
    assert stats.open == 0
    assert stats.handshakes == {("ok", ""): 1}
    counts = stats.bytes()
    assert counts["sealed_out"] > counts["plain_out"] >= 8 * 200_000
    assert counts["sealed_in"] > counts["plain_in"] >= 8 * 200_000


async def test_a_stalled_inner_stream_does_not_stall_the_others(pkis: Pkis) -> None:
    stalled: list[Stream] = []
    tasks: set[asyncio.Task[None]] = set()
    echo = _echo(tasks)

    def on_stream(stream: Stream) -> None:
        if stream.headers["target"] == "stall":
            stalled.append(stream)  # never read
        else:
            echo(stream)  # type: ignore[operator]

    device, _agent = await _pair(pkis, on_stream)
    stuck = device.link.open_stream({"target": "stall"})
    writing = asyncio.ensure_future(stuck.write(b"s" * 1_000_000))
    # The stalled stream fills its window (64 KiB) and waits; the rest flows.
    s = device.link.open_stream({"target": "echo"})
    payload = b"e" * 2_000_000

    async def send() -> None:
        await s.write(payload)
        await s.write_eof()

    got, _ = await asyncio.wait_for(asyncio.gather(read_exactly(s, len(payload)), send()), WAIT)
    assert got == payload
    assert not writing.done()
    assert stalled[0].buffered <= SETTINGS.stream_window
    writing.cancel()
    device.link.close()


async def test_outer_reset_fails_the_session_and_its_streams(pkis: Pkis) -> None:
    tasks: set[asyncio.Task[None]] = set()
    a, b = pipe({"target": "session"})
    device, agent = await _pair(pkis, _echo(tasks), outer=(a, b))
    s = device.link.open_stream({"target": "echo"})
    await s.write(b"hello")
    assert await asyncio.wait_for(s.read(), WAIT) == b"hello"
    a.reset(ErrorCode.NO_ROUTE)  # the gateway (or its link) went away
    with pytest.raises(StreamResetError):
        await asyncio.wait_for(s.read(), WAIT)
    closed = await asyncio.wait_for(device.link.wait_closed(), WAIT)
    assert closed is not None
    assert device.transport.failure is not None
    assert device.transport.failure.reason == "outer_reset"
    await asyncio.wait_for(agent.link.wait_closed(), WAIT)


SECRET = "PATIENT^SECRET"


async def test_an_exception_in_the_inner_protocol_fails_and_aborts_the_session(
    pkis: Pkis, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever raises out of the inner Link on received data (a bug a peer can reach)
    must not kill the reader silently and leave the session behind: the session fails
    (reason `other`), its outer stream is reset, it is logged once, without the text of
    the exception (it may hold what the peer sent)."""

    def on_stream(stream: Stream) -> None:
        raise ValueError(f"bad value {SECRET}")

    a, b = pipe({"target": "session"})
    device, agent = await _pair(pkis, on_stream, outer=(a, b))
    caplog.set_level("DEBUG", logger="relay.seal.transport")
    device.link.open_stream({"target": "dicom"})
    await asyncio.wait_for(agent.link.wait_closed(), WAIT)
    failed = await asyncio.wait_for(agent.transport.finished, WAIT)
    assert failed is not None and failed.reason == "other"
    assert SECRET not in failed.detail
    await asyncio.wait_for(device.link.wait_closed(), WAIT)
    for _ in range(100):  # reader and writer end (cancelled, or at the reset): none lingers
        if not agent.transport._tasks:
            break
        await asyncio.sleep(0.01)
    assert not agent.transport._tasks
    # The outer stream was reset (at a gateway: the splice and the device's caps freed).
    assert device.transport.failure is not None
    assert device.transport.failure.reason == "outer_reset"
    records = [r for r in caplog.records if r.name == "relay.seal.transport"]
    assert len(records) == 1 and "ValueError" in records[0].getMessage()
    assert records[0].exc_info is None
    assert all(SECRET not in r.getMessage() for r in caplog.records)


async def test_revoked_device_gets_a_sealed_goaway(pkis: Pkis) -> None:
    a, b = pipe({"target": "session"})
    goaways: list[tuple[int, str]] = []
    client = establish(
        a,
        pkis.client_ctx(),
        server_side=False,
        alpn=ALPN_SESSION,
        check_peer=agent_check(TD, SITE),
        settings=SETTINGS,
        name="device",
        timeout=WAIT,
        on_goaway=lambda code, reason: goaways.append((code, reason)),
    )
    stats = SealStats()
    server = establish(
        b,
        pkis.server_ctx(),
        server_side=True,
        alpn=ALPN_SESSION,
        check_peer=device_check(TD, SITE, lambda ident: True),
        settings=SETTINGS,
        name="agent",
        timeout=WAIT,
        stats=stats,
    )
    results = await asyncio.gather(client, server, return_exceptions=True)
    assert isinstance(results[1], SealError) and results[1].reason == "revoked"
    assert stats.handshakes == {("failed", "revoked"): 1}
    # TLS 1.3: the client finished first; the agent's verdict arrives sealed.
    device = results[0]
    assert isinstance(device, SealedLink)
    await asyncio.wait_for(device.link.wait_closed(), WAIT)
    assert goaways and goaways[0][0] == ErrorCode.REVOKED and "revoked" in goaways[0][1]
    with pytest.raises(Exception):  # noqa: B017 - closed link refuses streams
        device.link.open_stream({"target": "dicom"})


class _Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0
        self.lost: list[Exception | None] = []

    def pause_writing(self) -> None:
        self.paused += 1

    def resume_writing(self) -> None:
        self.resumed += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)


async def test_write_queue_pauses_the_protocol_then_aborts_at_its_hard_bound(
    pkis: Pkis,
) -> None:
    a, b = pipe({"target": "session"}, limit=64 * 1024)
    recorders: list[_Recorder] = []

    def factory(_: object) -> _Recorder:
        recorders.append(_Recorder())
        return recorders[-1]

    client = SealTransport(
        a,
        SealCore(
            pkis.client_ctx(),
            server_side=False,
            alpn=ALPN_SESSION,
            check_peer=agent_check(TD, SITE),
        ),
        factory,
        write_hard=3 * 1024 * 1024,
    )
    server = SealTransport(
        b,
        SealCore(
            pkis.server_ctx(),
            server_side=True,
            alpn=ALPN_SESSION,
            check_peer=device_check(TD, SITE),
        ),
        lambda _: _Recorder(),
    )
    client.begin()
    server.begin()
    await asyncio.wait_for(asyncio.gather(client.established, server.established), WAIT)
    server.pause_reading()  # the peer stops reading: the outer pipe fills
    rec = recorders[0]
    chunk = b"x" * 65536
    while not client.is_closing():
        client.write(chunk)
        assert client.get_write_buffer_size() <= 3 * 1024 * 1024 + 2 * len(chunk)
        await asyncio.sleep(0)
    assert rec.paused == 1
    assert client.failure is not None and client.failure.reason == "buffer"
    await asyncio.sleep(0)
    assert len(rec.lost) == 1 and isinstance(rec.lost[0], SealError)
    server.abort()


async def test_handshake_timeout_is_a_reason(pkis: Pkis) -> None:
    a, _silent = pipe({"target": "session"})
    with pytest.raises(SealError) as info:
        await establish(
            a,
            pkis.client_ctx(),
            server_side=False,
            alpn=ALPN_SESSION,
            check_peer=agent_check(TD, SITE),
            settings=SETTINGS,
            name="device",
            timeout=0.2,
        )
    assert info.value.reason == "timeout"


def test_link_runs_unchanged() -> None:
    # The inner protocol is relay.aio.Link itself, not a copy.
    assert SealedLink.__annotations__["link"] in ("Link", Link)
