"""Two workstations on one PC (two hospitals' configs) never share a DICOM port.

pynetdicom binds with SO_REUSEADDR, which on Windows lets a second process bind a port in
use: both workstations would start and a viewer's associations land on either hospital.
relay.dicom.exclusive binds with SO_EXCLUSIVEADDRUSE there. Linux refuses the second bind
anyway; the portable lane (tests/portable/sitecustomize.py) refuses a listening socket
that our code gave SO_REUSEADDR, so these tests fail there on a server bound as
pynetdicom does.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from relay.dicom import exclusive
from relay.dicom.node import DicomNode
from tests.pki_helpers import make_pki

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[2]


async def _no_link(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("no link in this test")


async def test_a_second_workstation_on_the_same_dicom_port_is_refused(tmp_path: Path) -> None:
    first = DicomNode(_no_link, listen=(HOST, 0), ae_title="HOSP_A")
    await first.start()
    try:
        assert isinstance(first._server, exclusive.ExclusiveAssociationServer)
        port = first.address[1]
        pki = make_pki(tmp_path / "pki")
        relay = [sys.executable, "-m", "relay.cli"]
        done = await asyncio.to_thread(
            subprocess.run,
            [*relay, "pki", "issue", "--dir", str(pki.directory), "--site", "main",
             "--device", "ws1", "--out", str(tmp_path / "identity")],
            capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        config = tmp_path / "hospital-b.yaml"
        config.write_text(
            f"gateway: {HOST}:1\nidentity_dir: identity/\n"
            f"dicom: {{listen: '{HOST}:{port}', ae_title: HOSP_B}}\n"
        )
        done = await asyncio.to_thread(
            subprocess.run,
            [*relay, "workstation", "--config", str(config)],
            capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert f"{config}: dicom.listen: cannot listen on {HOST}:{port}" in done.stderr
        assert done.stderr.count("\n") == 1, done.stderr
    finally:
        await first.stop()


class _Socket:
    """What server_bind does to its socket, recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def setsockopt(self, *args: Any) -> None:
        self.calls.append(("setsockopt", *args))

    def settimeout(self, value: float) -> None:
        self.calls.append(("settimeout", value))

    def bind(self, address: tuple[str, int]) -> None:
        self.calls.append(("bind", address))

    def getsockname(self) -> tuple[str, int]:
        return (HOST, 11112)


class _AE:
    network_timeout = 30.0


def test_on_windows_the_port_is_bound_exclusively(monkeypatch: pytest.MonkeyPatch) -> None:
    exclusive_addr_use = ~socket.SO_REUSEADDR  # its value on Windows
    monkeypatch.setattr(socket, "SO_EXCLUSIVEADDRUSE", exclusive_addr_use, raising=False)
    server = exclusive.ExclusiveAssociationServer.__new__(exclusive.ExclusiveAssociationServer)
    sock = _Socket()
    server.socket = sock  # type: ignore[assignment]
    server.ae = _AE()  # type: ignore[assignment]
    server.server_address = (HOST, 11112)
    server.server_bind()
    assert sock.calls == [
        ("setsockopt", socket.SOL_SOCKET, exclusive_addr_use, 1),  # never SO_REUSEADDR
        ("settimeout", 30.0),
        ("bind", (HOST, 11112)),
    ]


def test_elsewhere_pynetdicoms_bind_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """POSIX SO_REUSEADDR admits no second listener, and lets a restart bind at once."""
    monkeypatch.delattr(socket, "SO_EXCLUSIVEADDRUSE", raising=False)
    server = exclusive.ExclusiveAssociationServer.__new__(exclusive.ExclusiveAssociationServer)
    sock = _Socket()
    server.socket = sock  # type: ignore[assignment]
    server.ae = _AE()  # type: ignore[assignment]
    server.server_address = (HOST, 11112)
    server.server_bind()
    assert sock.calls[0] == ("setsockopt", socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
