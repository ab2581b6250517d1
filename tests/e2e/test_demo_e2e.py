"""`relay demo` as a user runs it: one command, the whole chain, what to run, a clean stop."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from relay.workstation.viewer.install import default_viewer_dir, installed_release
from relay_dev import demo
from tests.e2e.chain import ROOT
from tests.e2e.dicom_chain import dataset_bytes
from tests.interop.harness import dcmtk, require_tools

START_TIMEOUT = 90.0  # seconds until demo.json appears (PKI, three roles, the PACS, a C-ECHO)
STOP_TIMEOUT = 40.0  # seconds for a clean stop: each role drains for at most 5 s


@dataclass
class RunningDemo:
    popen: subprocess.Popen[bytes]
    directory: Path
    out: Path

    @property
    def summary(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.directory / "demo.json").read_text())
        return data

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        try:
            return self.popen.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)
            raise AssertionError(f"relay demo did not stop\n{self.output()}") from None


def start_demo(tmp: Path, argv: list[str] | None = None, out_name: str = "demo.out") -> RunningDemo:
    directory = tmp / "demo-state"
    out = tmp / out_name
    with out.open("wb") as f:
        popen = subprocess.Popen(
            (argv or [sys.executable, "-m", "relay.cli", "demo"]) + ["--dir", str(directory)],
            stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
            start_new_session=True,
        )  # fmt: skip
    running = RunningDemo(popen, directory, out)
    deadline = time.monotonic() + START_TIMEOUT
    while _summary_pid(directory) != popen.pid:  # not a previous run's demo.json
        if popen.poll() is not None or time.monotonic() > deadline:
            running.stop(signal.SIGKILL)
            raise AssertionError(f"relay demo did not come up\n{running.output()}")
        time.sleep(0.1)
    return running


def _summary_pid(directory: Path) -> int | None:
    try:
        pid: int = json.loads((directory / "demo.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None
    return pid


@pytest.fixture
def running_demo(tmp_path: Path) -> Iterator[RunningDemo]:
    running = start_demo(tmp_path)
    try:
        yield running
    finally:
        running.stop()
        for pid in running.summary["pids"].values():  # nothing left behind, even on failure
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_demo_runs_the_chain_and_stops_cleanly(running_demo: RunningDemo) -> None:
    summary = running_demo.summary
    port = summary["ports"]["dicom"]
    assert demo.echo_through(port)  # viewer -> workstation -> gateway -> agent -> PACS
    assert set(summary["pids"]) == {"gateway", "agent", "workstation"}
    assert set(summary["studies"]) == {"CT", "MR"}
    text = running_demo.output()
    assert f"echoscu -aec RELAY 127.0.0.1 {port}" in text
    assert f"StudyInstanceUID={summary['studies']['CT']}" in text
    for role in ("gateway", "agent", "workstation"):
        assert f"http://127.0.0.1:{summary['ports'][role + '_metrics']}/metrics" in text
    check_the_browser_part(summary, text)

    assert running_demo.stop(signal.SIGINT) == 0  # Ctrl-C
    assert "stopped cleanly" in running_demo.output()
    assert not any(_alive(pid) for pid in summary["pids"].values())
    for name in ("gateway", "agent", "workstation"):
        log = (running_demo.directory / "logs" / f"{name}.log").read_text()
        assert f'"msg":"{name} stopped"' in log.replace(": ", ":"), log[-2000:]


def check_the_browser_part(summary: dict[str, Any], text: str) -> None:
    """The printed viewer URL is the workstation's DICOMweb listener: its DICOMweb lists
    the demo studies; `/` is the viewer or, not installed (this test's data dir is a
    fresh one), the page saying `relay viewer install`, and the output says so too."""
    url = summary["viewer"]
    assert url == f"http://127.0.0.1:{summary['ports']['dicomweb']}/"
    assert f"open {url}" in text
    assert f"{url}viewer?StudyInstanceUIDs={summary['studies']['CT']}" in text
    with urllib.request.urlopen(f"{url}dicom-web/studies", timeout=30) as response:
        studies = json.loads(response.read())
    found = {s["0020000D"]["Value"][0] for s in studies}
    assert found == set(summary["studies"].values())
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            status, page = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, page = exc.code, exc.read()
    if installed_release(default_viewer_dir()) is None:
        assert status == 503 and b"relay viewer install" in page
        assert "not installed yet: run `relay viewer install`" in text
    else:
        assert status == 200 and b"<!doctype html>" in page.lower()


@pytest.mark.interop
def test_the_printed_dcmtk_commands_work(running_demo: RunningDemo, tmp_path: Path) -> None:
    """Run echoscu, findscu and getscu exactly as the demo prints them (getscu's output
    directory aside)."""
    require_tools("echoscu", "findscu", "getscu")
    lines = [line.strip() for line in running_demo.output().splitlines()]
    commands = {
        name: shlex.split(next(line for line in lines if line.startswith(name + " ")))
        for name in ("echoscu", "findscu", "getscu")
    }
    out = tmp_path / "get"
    out.mkdir()
    getscu = commands["getscu"]
    getscu[getscu.index("-od") + 1] = str(out)
    echo = dcmtk.run_tool(commands["echoscu"], timeout=60)
    assert echo.returncode == 0, echo.output
    find = dcmtk.run_tool([*commands["findscu"][:1], "-v", *commands["findscu"][1:]], timeout=60)
    assert find.returncode == 0 and "DOE^JANE" in find.output and "ROE^RICHARD" in find.output
    get = dcmtk.run_tool([*getscu[:1], "-v", *getscu[1:]], timeout=60)
    assert get.ok, get.output
    files = sorted(out.iterdir())
    assert len(files) == 40  # the demo's CT series
    assert all(dataset_bytes(path).startswith(b"\x08\x00") for path in files)
    assert re.search(r"Completed Suboperations\s*:\s*40", get.output)


def test_a_directory_the_demo_did_not_make_is_refused(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    assert demo.run(tmp_path) == 2
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_a_directory_in_use_by_a_running_demo_is_refused(tmp_path: Path) -> None:
    (tmp_path / demo.MARKER).write_text(f"{os.getppid()}\n")  # a live process: "running"
    (tmp_path / "gateway.yaml").write_text("x")
    assert demo.run(tmp_path) == 2
    assert (tmp_path / "gateway.yaml").exists()


PREFERRED = {
    "gateway": 8443,
    "gateway_metrics": 9101,
    "agent_metrics": 9102,
    "workstation_metrics": 9103,
    "dicom": 11112,
    "pacs": 4242,
    "dicomweb": 8088,
}


def _listening(port: int) -> bool:
    """Someone listens on 127.0.0.1:`port` (connections in TIME_WAIT do not count)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def test_a_restart_right_after_a_stop_keeps_the_ports(tmp_path: Path) -> None:
    """A demo's default ports are free unless someone listens there, even while connections
    of a demo stopped a moment ago are in TIME_WAIT on them (the roles bind with
    SO_REUSEADDR): so a start, and a restart right after a stop, keep the defaults."""
    expected = {k: port for k, port in PREFERRED.items() if not _listening(port)}
    assert expected, "someone listens on every default port of the demo"
    for run in ("first", "second"):
        running = start_demo(tmp_path, out_name=f"{run}.out")
        try:
            ports = running.summary["ports"]
        finally:
            assert running.stop() == 0, running.output()
        assert {k: ports[k] for k in expected} == expected, run


def test_a_port_taken_before_the_role_binds_it_is_replaced(tmp_path: Path) -> None:
    """The race the probe cannot close: another process takes the gateway's port between
    the probe and the gateway's bind. The demo starts the roles again on another port."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        script = textwrap.dedent(
            f"""
            import sys
            from relay_dev import demo
            probe = demo.pick_port
            def racy(preferred, avoid=frozenset()):
                # the probe saw {taken} free; someone took it right after
                if preferred == 8443 and {taken} not in avoid:
                    return {taken}
                return probe(preferred, avoid)
            demo.pick_port = racy
            from relay.cli import main
            sys.exit(main(sys.argv[1:]))
            """
        )
        running = start_demo(tmp_path, [sys.executable, "-c", script, "demo"])
        try:
            ports = running.summary["ports"]
            assert ports["gateway"] != taken
            assert demo.echo_through(ports["dicom"])
            text = running.output()
            assert f"could not listen on port {taken}" in text, text
        finally:
            assert running.stop() == 0, running.output()
