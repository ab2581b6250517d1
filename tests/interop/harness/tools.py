"""Shared policy and small utilities for tests that drive real third-party programs.

Missing tools skip a test on a developer machine but fail it in CI (``CI=true``), where
the interop suite is mandatory. Every waiting helper here takes a timeout.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NoReturn

import pytest

#: Why a binary may be missing, and how to get it (shown in the skip/fail reason).
INSTALL_HINTS: dict[str, str] = {
    **{
        name: "DCMTK not installed: apt-get install dcmtk"
        for name in ("echoscu", "findscu", "getscu", "movescu", "storescu", "storescp")
    },
    "Orthanc": "Orthanc not installed: apt-get install orthanc",
    "ip": "iproute2 not installed: apt-get install iproute2",
    "haproxy": "HAProxy not installed: apt-get install haproxy",
    "prometheus": "Prometheus not installed: apt-get install prometheus",
    "promtool": "promtool not installed: apt-get install prometheus",
    "testssl": "testssl.sh not installed: apt-get install testssl.sh",
    "kubectl": "kubectl not installed: apt-get install kubernetes-client",
    "systemd-analyze": "systemd not installed: apt-get install systemd",
    "systemd-sysusers": "systemd not installed: apt-get install systemd",
    "slapd": "OpenLDAP server not installed: apt-get install slapd",
    "slapadd": "OpenLDAP server not installed: apt-get install slapd",
    "ldapmodify": "OpenLDAP client tools not installed: apt-get install ldap-utils",
    "chromium": "Chromium not installed: apt-get install chromium",
    "chromedriver": "chromedriver not installed: apt-get install chromium-driver",
}

#: DCMTK (and Orthanc, which is built on it) stall ~40 ms per message without this.
NODELAY_ENV: dict[str, str] = {"TCP_NODELAY": "1"}


class HarnessError(RuntimeError):
    """A third-party program did not start, answer or stop as expected."""


def in_ci() -> bool:
    """True when the interop suite is mandatory (CI exports ``CI=true``)."""
    return os.environ.get("CI", "").strip().lower() == "true"


def unavailable(reason: str) -> NoReturn:
    """Skip the current test for ``reason``, or fail it when running in CI."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: interop prerequisites are mandatory)", pytrace=False)
    pytest.skip(reason)


def tool_path() -> str:
    """PATH without this virtualenv's scripts: pynetdicom installs its own `echoscu`,
    `getscu`, ... there, and an activated venv would run them instead of DCMTK's."""
    scripts = Path(sys.prefix) / ("Scripts" if os.name == "nt" else "bin")
    own = sys.prefix != sys.base_prefix
    dirs = os.environ.get("PATH", os.defpath).split(os.pathsep)
    return os.pathsep.join(d for d in dirs if not (own and Path(d) == scripts))


def require_tools(*names: str) -> None:
    """Skip (fail in CI) unless every named executable is on PATH (`tool_path`)."""
    missing = [name for name in names if shutil.which(name, path=tool_path()) is None]
    if missing:
        hints = sorted({INSTALL_HINTS.get(name, f"{name} not installed") for name in missing})
        unavailable("; ".join(hints) + f" (missing: {', '.join(missing)})")


def require_root() -> None:
    """Network namespaces need root (CAP_SYS_ADMIN) and iproute2."""
    if os.geteuid() != 0:
        unavailable("network namespaces need root: run the interop tests as root")
    require_tools("ip")


def tool_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a third-party program: ours with `tool_path()`, plus
    TCP_NODELAY=1, plus ``extra``."""
    env = dict(os.environ)
    env["PATH"] = tool_path()
    env.update(NODELAY_ENV)
    if extra:
        env.update(extra)
    return env


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file, or a note if there is none (for error messages)."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<no log at {path}: {exc.strerror}>"
    return "\n".join(text.splitlines()[-lines:])


def _listening_ports(pid: int) -> set[int]:
    """TCP ports in LISTEN state in the network namespace of process ``pid``."""
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 3 and fields[3] == "0A":  # TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def wait_listening(
    pid: int, port: int, *, timeout: float, alive: Callable[[], bool], what: str
) -> None:
    """Wait until some socket listens on ``port`` in the namespace of ``pid``.

    Reading /proc/PID/net/tcp sends nothing to the server, so it logs no stray
    connection; ``alive`` lets us fail fast when the program died during start-up.
    """
    deadline = time.monotonic() + timeout
    while True:
        if not alive():
            raise HarnessError(f"{what} exited during start-up")
        if port in _listening_ports(pid):
            return
        if time.monotonic() >= deadline:
            raise HarnessError(f"{what} did not listen on port {port} within {timeout:.0f} s")
        time.sleep(0.02)
