"""Roles report the ports they bound (relay.ops.listening), and a handed-over socket
keeps the gateway's port across restarts: what the test harnesses rely on instead of
picking a free port and hoping."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from relay.ops.listening import announce, inherited_socket
from relay.ops.logs import setup_logging
from relay.trust import pki
from tests.ports import HOST, dead_port, handover, reserve, wait_listening

RELAY = [sys.executable, "-m", "relay.cli"]
ROOT = Path(__file__).resolve().parents[2]


def test_the_line_is_written_even_when_the_role_logs_warnings_only(
    capsys: pytest.CaptureFixture[str],
) -> None:
    setup_logging("workstation", "warning")
    announce("forward", ("127.0.0.1", 41234), service="ris")
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["event"], e["what"], e["address"], e["service"]) for e in lines] == [
        ("listening", "forward", "127.0.0.1:41234", "ris")
    ]


def test_ipv6_addresses_are_bracketed(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("gateway", "info")
    announce("metrics", ("::1", 9101))
    assert json.loads(capsys.readouterr().out)["address"] == "[::1]:9101"


def test_sockets_meant_for_another_process_are_ignored() -> None:
    env = {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "gateway", "LISTEN_PID": "1"}
    assert inherited_socket("gateway", env, pid=2) is None
    assert inherited_socket("gateway", {}, pid=2) is None


_CHILD = """
import socket
from relay.ops.listening import inherited_socket
assert inherited_socket("metrics") is None
sock = inherited_socket("gateway")
print(sock.getsockname()[1], sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
"""


def test_a_handed_over_socket_is_found_by_name_and_listens() -> None:
    with reserve() as kept, reserve() as other:
        port = kept.getsockname()[1]
        with pytest.raises(ConnectionRefusedError):  # bound, not listening yet
            socket.create_connection((HOST, port), timeout=5)
        argv, env, fds = handover([sys.executable, "-c", _CHILD], {"other": other, "gateway": kept})
        done = subprocess.run(
            argv,
            env=env,
            pass_fds=fds,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == [str(port), "1"]
        # The child made it listen; the port stays ours (and accepts) after the child exits.
        with socket.create_connection((HOST, port), timeout=5):
            pass


def test_a_bound_socket_that_never_listens_refuses() -> None:
    with dead_port() as port, pytest.raises(ConnectionRefusedError):
        socket.create_connection((HOST, port), timeout=5)


def _gateway_config(tmp: Path) -> Path:
    pki.init_pki(tmp / "pki", "hospital.test", "main", ["localhost", HOST])
    config = tmp / "gateway.yaml"
    config.write_text(
        f"listen: {HOST}:0\n"
        f"metrics_listen: {HOST}:0\n"
        "tls: {cert: pki/gateway.crt, key: pki/gateway.key, ca: pki/ca.crt}\n"
        "drain_grace: 1s\nlog_level: warning\n"
    )
    return config


def _http_status(port: int, path: str) -> int:
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        return int(sock.recv(4096).split(b" ", 2)[1])


def test_the_gateway_reports_its_ports_and_keeps_a_handed_over_one(tmp_path: Path) -> None:
    config = _gateway_config(tmp_path)
    log = tmp_path / "gateway.log"
    with reserve() as kept:
        port = kept.getsockname()[1]
        argv, env, fds = handover([*RELAY, "gateway", "--config", str(config)], {"gateway": kept})
        procs: list[subprocess.Popen[bytes]] = []
        try:
            for _ in range(2):  # a restart gets the same socket back
                since = log.stat().st_size if log.exists() else 0
                with log.open("ab") as out:
                    proc = subprocess.Popen(
                        argv, env=env, pass_fds=fds, stdout=out, stderr=out, cwd=ROOT
                    )
                procs.append(proc)
                alive = lambda p=proc: p.poll() is None  # noqa: E731
                assert wait_listening(log, "gateway", since=since, alive=alive).port == port
                metrics = wait_listening(log, "metrics", since=since, alive=alive)
                assert metrics.port not in (0, port)
                assert _http_status(metrics.port, "/healthz") == 200
                proc.send_signal(signal.SIGKILL)
                proc.wait(15)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(15)
