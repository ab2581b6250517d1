"""Roles report the ports they bound (relay.ops.listening), and a reserved port stays the
gateway's across restarts (tests.ports): what the harnesses rely on instead of picking a
free port and hoping."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.ops.listening import announce
from relay.ops.logs import setup_logging
from relay.trust import pki
from tests.ports import HOST, dead_port, reserve, wait_listening

RELAY = [sys.executable, "-m", "relay.cli"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def role_logging() -> Iterator[None]:
    """setup_logging() replaces the root handlers: put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    pynetdicom = logging.getLogger("pynetdicom").level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("pynetdicom").setLevel(pynetdicom)


@pytest.mark.usefixtures("role_logging")
def test_the_line_is_written_even_when_the_role_logs_warnings_only(
    capsys: pytest.CaptureFixture[str],
) -> None:
    setup_logging("workstation", "warning")
    announce("forward", ("127.0.0.1", 41234), service="ris")
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["event"], e["what"], e["address"], e["service"]) for e in lines] == [
        ("listening", "forward", "127.0.0.1:41234", "ris")
    ]


@pytest.mark.usefixtures("role_logging")
def test_ipv6_addresses_are_bracketed(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("gateway", "info")
    announce("metrics", ("::1", 9101))
    assert json.loads(capsys.readouterr().out)["address"] == "[::1]:9101"


def test_a_reserved_port_is_kept_from_others_and_open_to_a_reusing_server() -> None:
    with reserve() as kept:
        port = kept.getsockname()[1]
        with socket.socket() as plain, pytest.raises(OSError):  # no SO_REUSEADDR: taken
            plain.bind((HOST, port))
        for _ in range(2):  # a server that asks for it gets it, and again after it closed
            with (
                socket.create_server((HOST, port)) as server,  # sets SO_REUSEADDR
                socket.create_connection((HOST, port), timeout=5),
            ):
                server.accept()[0].close()
            with pytest.raises(ConnectionRefusedError):  # nobody listens meanwhile
                socket.create_connection((HOST, port), timeout=5)


def test_a_dead_port_refuses() -> None:
    with dead_port() as port, pytest.raises(ConnectionRefusedError):
        socket.create_connection((HOST, port), timeout=5)


def _gateway_config(tmp: Path, port: int) -> Path:
    pki.init_pki(tmp / "pki", "hospital.test", "main", ["localhost", HOST])
    config = tmp / "gateway.yaml"
    config.write_text(
        f"listen: {HOST}:{port}\n"
        f"metrics_listen: {HOST}:0\n"
        "tls: {cert: pki/gateway.crt, key: pki/gateway.key, ca: pki/ca.crt}\n"
        "drain_grace: 1s\nlog_level: warning\n"
    )
    return config


def _http_status(port: int, path: str) -> int:
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        return int(sock.recv(4096).split(b" ", 2)[1])


def test_the_gateway_reports_its_ports_and_restarts_on_a_reserved_one(tmp_path: Path) -> None:
    """Port 0 for metrics, a reserved port for TLS (the harnesses' two ways); at
    log_level warning. The gateway binds the reserved port again after a SIGKILL."""
    log = tmp_path / "gateway.log"
    with reserve() as kept:
        port = kept.getsockname()[1]
        argv = [*RELAY, "gateway", "--config", str(_gateway_config(tmp_path, port))]
        for _ in range(2):
            since = log.stat().st_size if log.exists() else 0
            with log.open("ab") as out:
                proc = subprocess.Popen(argv, stdout=out, stderr=out, cwd=ROOT)
            try:
                alive = lambda p=proc: p.poll() is None  # noqa: E731
                assert wait_listening(log, "gateway", since=since, alive=alive).port == port
                metrics = wait_listening(log, "metrics", since=since, alive=alive)
                assert metrics.port not in (0, port)
                assert _http_status(metrics.port, "/healthz") == 200
            finally:
                proc.kill()
                proc.wait(15)
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((HOST, port), timeout=5)
