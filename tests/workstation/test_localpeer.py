"""`local_access: same-user`: each listener admits only programs of the workstation's own
account. A program of another account is real here: a client process started as `nobody`
(which needs root), connecting over loopback to the real listener."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as hs

from relay.dicom.node import DicomNode
from relay.ops.config import Address, ConfigError
from relay.workstation import localpeer
from relay.workstation.config import load_workstation_config
from relay.workstation.dicomweb.settings import DicomwebConfig
from relay.workstation.forward import Forwarder
from relay.workstation.localpeer import REFUSAL, AccountGate, ProcTcpEntry, parse_proc_tcp
from relay.workstation.tunnel import TunnelUnavailable
from tests.workstation.dicomweb.test_server import scripted

NOBODY = 65534
CLIENT = "/usr/bin/python3"  # the system's: the test's own interpreter may be unreadable to nobody


def _needs_other_account() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("a client of another account is started as Linux's nobody")
    if os.geteuid() != 0:  # type: ignore[attr-defined,unused-ignore]
        pytest.skip("a client of another account needs root to start it")
    if not os.access(CLIENT, os.X_OK):
        pytest.skip(f"{CLIENT} is not installed")


@contextlib.contextmanager
def client(
    port: int, *, user: int | None, host: str = "127.0.0.1", send: bytes = b"", until: int = 0
) -> Iterator[subprocess.Popen[bytes]]:
    """A program connected to host:port as `user` (None: ours): it sends `send`, then
    prints what it receives until the far end closes (or `until` bytes came), then
    'closed' (or 'open')."""
    code = (
        "import socket, sys\n"
        f"s = socket.create_connection(({host!r}, {port}))\n"
        "sys.stdout.write('connected\\n'); sys.stdout.flush()\n"
        f"s.sendall({send!r})\n"
        "data = b''\n"
        "while True:\n"
        "    try:\n"
        "        got = s.recv(65536)\n"
        "    except ConnectionResetError:\n"
        "        got = b''\n"
        "    if not got: break\n"
        "    data += got\n"
        f"    if {until} and len(data) >= {until}: break\n"
        "end = 'closed' if not got else 'open'\n"
        "sys.stdout.write(repr(data) + '\\n' + end + '\\n'); sys.stdout.flush()\n"
    )
    # Unbuffered: a buffered readline() below may read ahead all the client wrote (when
    # the far end closed at once), and received()'s communicate() reads the pipe itself,
    # past that buffer: it got nothing (seen once in CI).
    proc = subprocess.Popen([CLIENT, "-c", code], user=user, stdout=subprocess.PIPE, bufsize=0)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"connected\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def received(proc: subprocess.Popen[bytes], *, closed: bool = True, timeout: float = 10) -> bytes:
    """What the client got; `closed`: whether the far end must have closed (else it
    must still be open)."""
    out, _ = proc.communicate(timeout=timeout)
    text, end, _ = out.decode().rsplit("\n", 2)
    assert end == ("closed" if closed else "open"), out
    value = eval(text.splitlines()[-1])
    assert isinstance(value, bytes)
    return value


# -- /proc/net/tcp ------------------------------------------------------------------------


def test_proc_tcp_lines_are_read_as_the_kernel_writes_them() -> None:
    text = [
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
        "timeout inode",
        "   0: 0100007F:1F90 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000  1000 "
        "       0 3013503 1 0000000095f732a4 100 0 0 10 0",
        "   1: 00000000000000000000000001000000:2C59 00000000000000000000000001000000:A1B2 01 "
        "00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0",
        "   2: 0000000000000000FFFF00000100007F:0050 0000000000000000FFFF00000100007F:C000 01 "
        "00000000:00000000 00:00000000 00000000    33        0 4 1 0 100 0 0 10 0",
        "   3: garbage",
    ]
    if sys.byteorder != "little":
        pytest.skip("the sample lines are a little-endian kernel's")
    v4 = ipaddress.IPv4Address("127.0.0.1")
    v6 = ipaddress.IPv6Address("::1")
    assert list(parse_proc_tcp(text)) == [
        ProcTcpEntry((v4, 8080), (v4, 54000), 1000),
        ProcTcpEntry((v6, 11353), (v6, 41394), 0),
        ProcTcpEntry((v4, 80), (v4, 49152), 33),  # IPv4-mapped: as IPv4
    ]


def _kernel_hex(raw: bytes) -> str:
    """An address as /proc/net/tcp prints it: 32-bit words as host-order integers."""
    words = [int.from_bytes(raw[i : i + 4], sys.byteorder) for i in range(0, len(raw), 4)]
    return "".join(f"{int.from_bytes(w.to_bytes(4, 'big'), 'big'):08X}" for w in words)


@given(
    hs.one_of(hs.binary(min_size=4, max_size=4), hs.binary(min_size=16, max_size=16)),
    hs.integers(0, 65535),
    hs.integers(0, 2**32 - 2),
)
def test_any_address_and_port_read_back(raw: bytes, port: int, uid: int) -> None:
    line = f"  7: {_kernel_hex(raw)}:{port:04X} 00000000:0000 0A 0:0 0:0 0 {uid} 0 1"
    (entry,) = parse_proc_tcp([line])
    addr = ipaddress.ip_address(raw)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    assert entry.local == (addr, port)
    assert entry.uid == uid


# -- the lookup, for real ------------------------------------------------------------------


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_our_account_is_told_from_another(family: socket.AddressFamily) -> None:
    """Linux's /proc lookup, and the psutil ones Windows (the system's table) and macOS
    (our own processes) use, each on a real connection from us and from nobody."""
    _needs_other_account()
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    lookups = {
        "proc": localpeer.same_user,
        "table": localpeer._same_user_by_table,
        "own processes": localpeer._same_user_by_own_processes,
    }
    with socket.create_server((host, 0), family=family) as server:
        port = server.getsockname()[1]
        for user, expected in ((None, True), (NOBODY, False)):
            with client(port, user=user, host=host):
                conn, peer = server.accept()
                with conn:
                    local = conn.getsockname()
                    got = {name: f(peer[:2], local[:2]) for name, f in lookups.items()}
            assert got == dict.fromkeys(lookups, expected), user


def test_our_own_connection_is_ours_on_this_platform() -> None:
    """The lookup this platform uses (Linux /proc; Windows and macOS psutil, run by the
    hosted workflow there) finds our own program at the far end."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as ours:
            conn, peer = server.accept()
            with conn:
                assert localpeer.same_user(peer[:2], conn.getsockname()[:2])
                assert ours.getsockname()[:2] == peer[:2]


async def test_every_listener_serves_our_own_account_under_same_user() -> None:
    """The admission path (a thread hop, reading paused then resumed: Proactor on
    Windows) lets our own programs through, on every platform."""
    async with scripted(DicomwebConfig(Address("127.0.0.1", 0))) as (srv, _):
        srv.accounts.access = "same-user"
        async with aiohttp.ClientSession() as http, http.get(f"{srv.url}/studies") as r:
            assert r.status == 200
        assert srv.accounts.refused == {}
    gate = AccountGate("same-user")
    forwarder = Forwarder(_NoTunnel(), {Address("127.0.0.1", 0): "echo"}, accounts=gate)  # type: ignore[arg-type]
    await forwarder.start()
    try:
        (bound,) = forwarder.bound.values()
        reader, writer = await asyncio.open_connection("127.0.0.1", bound.port)
        with contextlib.suppress(ConnectionError):  # reset once the (absent) tunnel fails
            await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert forwarder.stats.failed == {"echo": 1}  # admitted, went on to the tunnel
    finally:
        await forwarder.stop_accepting()
        await forwarder.drain(1.0)
    assert gate.refused == {}


def test_the_proc_tables_are_read_up_to_their_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """MAX_PROC_LINES bounds the read (a table of a busy server is long); an entry past it
    is not found, so the connection is refused rather than the read running on."""
    if not sys.platform.startswith("linux"):
        pytest.skip("Linux's /proc")
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            conn, peer = server.accept()
            with conn:
                local = conn.getsockname()[:2]
                assert localpeer.same_user(peer[:2], local)
                monkeypatch.setattr(localpeer, "MAX_PROC_LINES", 1)  # the header line only
                assert not localpeer.same_user(peer[:2], local)


def test_a_connection_that_is_gone_is_not_ours() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert not localpeer.same_user(("127.0.0.1", 1), ("127.0.0.1", port))


def test_refusals_are_counted_and_their_log_lines_limited(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    gate = AccountGate("same-user", check=lambda peer, local: False, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger=localpeer.__name__):
        for _ in range(100):
            assert not gate.admit("dicom", ("127.0.0.1", 5000), ("127.0.0.1", 104))
        now[0] += 60
        gate.admit("dicom", ("127.0.0.1", 5000), ("127.0.0.1", 104))
    assert gate.refused == {"dicom": 101}
    lines = [r.getMessage() for r in caplog.records]
    assert 1 < len(lines) < 30, lines
    assert REFUSAL in lines[0]
    assert "more not logged" in lines[-1]


def test_a_lookup_that_fails_admits_no_one(caplog: pytest.LogCaptureFixture) -> None:
    def broken(peer: Any, local: Any) -> bool:
        raise OSError("no table")

    gate = AccountGate("same-user", check=broken)
    with caplog.at_level(logging.WARNING, logger=localpeer.__name__):
        assert not gate.admit("forward", ("127.0.0.1", 5000), ("127.0.0.1", 8080))
    assert "could not be checked (OSError: no table)" in caplog.text


def test_any_admits_without_looking() -> None:
    def never(peer: Any, local: Any) -> bool:
        raise AssertionError("looked up")

    assert AccountGate("any", check=never).admit("dicom", ("127.0.0.1", 1), ("127.0.0.1", 2))


# -- the listeners ---------------------------------------------------------------------


async def test_dicomweb_answers_another_account_403_and_reads_nothing() -> None:
    _needs_other_account()
    async with scripted(DicomwebConfig(Address("127.0.0.1", 0))) as (srv, _):
        srv.accounts.access = "same-user"
        assert srv.address is not None
        request = b"GET /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        with client(srv.address.port, user=NOBODY, send=request) as other:
            answer = await asyncio.to_thread(received, other)
        assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n")
        assert REFUSAL.encode() in answer
        async with aiohttp.ClientSession() as http, http.get(f"{srv.url}/studies") as r:
            assert r.status == 200  # ours: served
        assert srv.accounts.refused == {"dicomweb": 1}


async def test_the_dicom_node_closes_another_accounts_connection_unread() -> None:
    _needs_other_account()

    async def no_link(headers: Any) -> Any:
        raise ConnectionError

    gate = AccountGate("same-user")
    node = DicomNode(no_link, listen=("127.0.0.1", 0), admit=functools.partial(gate.admit, "dicom"))
    await node.start()
    try:
        port = node.address[1]
        with client(port, user=NOBODY, send=_associate_rq()) as other:
            assert await asyncio.to_thread(received, other) == b""  # closed, no A-ASSOCIATE-AC
        with client(port, user=None, send=_associate_rq(), until=1) as ours:
            answer = await asyncio.to_thread(received, ours, closed=False)
        assert answer[:1] == b"\x02"  # A-ASSOCIATE-AC: ours is served
        assert gate.refused == {"dicom": 1}
    finally:
        await node.stop()


def _associate_rq() -> bytes:
    """A real A-ASSOCIATE-RQ for Verification (what echoscu sends first)."""
    from pynetdicom import build_context
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "VIEWER"
    primitive.called_ae_title = "RELAY"
    cx = build_context(Verification)
    cx.context_id = 1
    primitive.presentation_context_definition_list = [cx]
    length = MaximumLengthNotification()
    length.maximum_length_received = 16384
    primitive.user_information = [length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


class _NoTunnel:
    """The far side of a forward: never reached by a refused connection, and for an
    admitted one an unavailable tunnel (which the Forwarder counts as failed)."""

    async def open_stream(self, headers: Any, **options: Any) -> Any:
        raise TunnelUnavailable("no link in this test")


async def test_a_forward_aborts_another_accounts_connection() -> None:
    _needs_other_account()
    gate = AccountGate("same-user")
    forwarder = Forwarder(_NoTunnel(), {Address("127.0.0.1", 0): "echo"}, accounts=gate)  # type: ignore[arg-type]
    await forwarder.start()
    try:
        (bound,) = forwarder.bound.values()
        with client(bound.port, user=NOBODY, send=b"hello") as other:
            assert await asyncio.to_thread(received, other) == b""
        assert gate.refused == {"forward": 1}
        assert forwarder.stats.connections == {}  # never forwarded
        with client(bound.port, user=None, send=b"hello") as ours:
            assert await asyncio.to_thread(received, ours) == b""
        assert forwarder.stats.failed == {"echo": 1}  # ours went on to the (absent) tunnel
        assert gate.refused == {"forward": 1}
    finally:
        await forwarder.stop_accepting()
        await forwarder.drain(1.0)


# -- config ------------------------------------------------------------------------------


def _config(tmp_path: Path, extra: str) -> Path:
    identity = tmp_path / "id"
    identity.mkdir(exist_ok=True)
    for name in ("device.crt", "device.key", "ca.crt"):
        (identity / name).write_text("x")
    path = tmp_path / "ws.yaml"
    path.write_text(f"gateway: 127.0.0.1:7443\nidentity_dir: {identity}\n{extra}")
    return path


def test_local_access_is_read_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_workstation_config(_config(tmp_path, "")).local_access == "any"
    config = load_workstation_config(_config(tmp_path, "local_access: same-user\n"))
    assert config.local_access == "same-user"
    with pytest.raises(ConfigError, match="local_access") as bad:
        load_workstation_config(_config(tmp_path, "local_access: nobody\n"))
    assert str(tmp_path / "ws.yaml") in str(bad.value)
    monkeypatch.setattr(localpeer, "is_supported", lambda: False)
    with pytest.raises(ConfigError, match=r"local_access.*same-user is not available"):
        load_workstation_config(_config(tmp_path, "local_access: same-user\n"))


def test_refusals_counted_from_many_threads_at_once_are_all_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Lookups run in worker threads (one per connection being admitted): the count and
    the log limiter's held-back lines were updated from them at once, unlocked, and
    refusals were lost. Every refusal counts, in `refused` and in the log's lines plus
    those they say were not logged."""
    threads, each = 8, 5_000
    now = [0.0]
    gate = AccountGate("same-user", check=lambda peer, local: False, clock=lambda: now[0])
    start = threading.Barrier(threads)

    def refuse() -> None:
        start.wait()
        for _ in range(each):
            gate.admit("dicomweb", ("127.0.0.1", 5000), ("127.0.0.1", 8080))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show
    try:
        with caplog.at_level(logging.WARNING, logger=localpeer.__name__):
            workers = [threading.Thread(target=refuse) for _ in range(threads)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            now[0] += 3600  # the next line is let through and says how many were held
            gate.admit("dicomweb", ("127.0.0.1", 5000), ("127.0.0.1", 8080))
    finally:
        sys.setswitchinterval(interval)
    total = threads * each + 1
    assert gate.refused == {"dicomweb": total}
    lines = [r.getMessage() for r in caplog.records]
    held = [re.search(r"\((\d+) more not logged\)", line) for line in lines]
    assert len(lines) + sum(int(m.group(1)) for m in held if m) == total


def test_the_refusal_total_is_read_while_threads_add_listeners() -> None:
    """The metrics scrape sums the refusals on the loop while lookup threads may add a
    listener's first count: the sum is taken under the gate's lock (summing `refused`
    unlocked could raise "dictionary changed size during iteration"), never fails, and
    ends exact."""
    threads, each = 4, 300
    gate = AccountGate("same-user", check=lambda peer, local: False)
    done = threading.Event()

    def refuse(n: int) -> None:
        for i in range(each):
            gate.admit(f"listener-{n}-{i}", ("127.0.0.1", 5000), ("127.0.0.1", 8080))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        workers = [threading.Thread(target=refuse, args=(n,)) for n in range(threads)]
        for worker in workers:
            worker.start()
        seen = 0
        while not done.is_set():
            total = gate.refused_total()
            assert total >= seen  # counts only grow
            seen = total
            if not any(worker.is_alive() for worker in workers):
                done.set()
        for worker in workers:
            worker.join()
    finally:
        sys.setswitchinterval(interval)
    assert gate.refused_total() == threads * each
