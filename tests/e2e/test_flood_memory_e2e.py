"""Issue 10: waves of TLS handshakes that never finish leave the gateway's memory where it was.

The real `relay gateway` process; the test floods it from many loopback source addresses
(each connection sends a ClientHello, then nothing) and waits for the gateway to cut them
at its handshake timeout. Before relay.ops.heap, RSS grew by 25-35 MB per wave of 700
(glibc kept the freed memory mid-heap); now it returns to its baseline.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import ssl
from pathlib import Path

from tests.e2e.chain import HOST, RELAY, Proc, relay_cli, rss_kb

WAVES = 5
PER_WAVE = 500
SOURCES = 50  # distinct source addresses, so a per-address cap does not refuse the flood
BASELINE_SLACK_KB = 24 * 1024  # the old code ends 100+ MB above its baseline
HANDSHAKE_TIMEOUT = 1.0


def client_hello() -> bytes:
    """A real TLS 1.3 ClientHello, so the gateway answers and holds a half-done handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    out = ssl.MemoryBIO()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


async def stalled_handshake(port: int, source: str, hello: bytes) -> bool:
    """Send a ClientHello and never finish; True once the gateway has closed the socket."""
    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((source, 0))
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (HOST, port))
        reader, writer = await asyncio.open_connection(sock=sock)
    except OSError:
        sock.close()
        return False
    writer.write(hello)
    try:
        await asyncio.wait_for(reader.read(-1), HANDSHAKE_TIMEOUT + 20)
        return True
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()


async def settled_rss_kb(pid: int, target_kb: int, within: float) -> int:
    """RSS once it is at or below `target_kb`, or the last reading after `within` s."""
    for _ in range(int(within / 0.25)):
        if (rss := rss_kb(pid)) <= target_kb:
            return rss
        await asyncio.sleep(0.25)
    return rss_kb(pid)


async def timeouts_counted(metrics_port: int) -> int:
    reader, writer = await asyncio.open_connection(HOST, metrics_port)
    writer.write(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
    body = (await asyncio.wait_for(reader.read(-1), 10)).decode()
    writer.close()
    found = re.search(r'^relay_refusals_total\{reason="timeout"\} (\S+)$', body, re.M)
    return int(float(found.group(1))) if found else 0


async def test_gateway_rss_returns_to_baseline_after_handshake_floods(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    done = relay_cli(
        "pki", "init", "--dir", str(pki), "--trust-domain", "hospital.test",
        "--site", "main", "--gateway-name", f"localhost,{HOST}",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (tmp_path / "gateway.yaml").write_text(
        f"listen: {HOST}:0\nmetrics_listen: {HOST}:0\n"  # it says which ports it got
        "tls: {cert: pki/gateway.crt, key: pki/gateway.key, ca: pki/ca.crt}\n"
        f"handshake_timeout: {HANDSHAKE_TIMEOUT}s\nlog_level: error\n"
        # Every wave must reach the TLS layer: lift all sources' handshake budget.
        "all_sources: {handshakes: 100000, handshake_rate: 100000, handshake_burst: 100000}\n"
    )
    gateway = Proc(
        "gateway", [*RELAY, "gateway", "--config", str(tmp_path / "gateway.yaml")],
        tmp_path / "gateway.log",
    )  # fmt: skip
    gateway.start()
    try:
        port = (await gateway.alistening("gateway")).port
        metrics_port = (await gateway.alistening("metrics")).port
        hello = client_hello()
        sources = [f"127.10.{i}.1" for i in range(SOURCES)]
        # One small wave first, so the baseline includes what any first handshake loads.
        await asyncio.gather(*(stalled_handshake(port, s, hello) for s in sources))
        await asyncio.sleep(1.5)
        baseline = rss_kb(gateway.pid)
        after: list[int] = []
        for _ in range(WAVES):
            cut = await asyncio.gather(
                *(stalled_handshake(port, sources[i % SOURCES], hello) for i in range(PER_WAVE))
            )
            assert sum(cut) == PER_WAVE, gateway.output()[-2000:]
            after.append(await settled_rss_kb(gateway.pid, baseline + BASELINE_SLACK_KB, 5.0))
        assert await timeouts_counted(metrics_port) >= WAVES * PER_WAVE
        assert after[-1] <= baseline + BASELINE_SLACK_KB, (
            f"gateway RSS after each wave {[kb // 1024 for kb in after]} MB, "
            f"baseline {baseline // 1024} MB"
        )
    finally:
        assert gateway.stop() == 0, gateway.output()[-2000:]
