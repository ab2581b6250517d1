"""The harness itself: namespaces, Orthanc, DCMTK wrappers and the CI skip policy."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .harness import dcmtk
from .harness.netns import NetNS, list_namespaces, sweep_stale
from .harness.orthanc import Orthanc
from .harness.samples import SampleSeries, fingerprint
from .harness.tools import HarnessError, require_root, require_tools, tool_env, tool_path

interop = pytest.mark.interop

# -- skip policy -----------------------------------------------------------------------


def test_require_tools_skips_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="dmzr-no-such-tool"):
        require_tools("sh", "dmzr-no-such-tool")
    require_tools("sh")  # present: no skip


def test_require_tools_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(pytest.fail.Exception, match="DCMTK not installed: apt-get install dcmtk"):
        require_tools("findscu")


def test_tools_are_never_the_virtualenvs_pynetdicom_scripts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """pynetdicom installs `echoscu`, `getscu`... beside our Python; an activated venv puts
    them first on PATH, and the interop tests would then talk to pynetdicom, not DCMTK."""
    venv, system = tmp_path / "venv", tmp_path / "system"
    for place in (venv / "bin", system):
        place.mkdir(parents=True)
        (place / "echoscu").write_text("#!/bin/sh\n")
        (place / "echoscu").chmod(0o755)
    monkeypatch.setattr(sys, "prefix", str(venv))
    monkeypatch.setattr(sys, "base_prefix", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", os.pathsep.join([str(venv / "bin"), str(system)]))
    assert tool_path() == str(system)
    assert tool_env()["PATH"] == str(system)
    assert shutil.which("echoscu", path=tool_path()) == str(system / "echoscu")


def test_require_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception, match="root"):
        require_root()


INNER_TESTS = """
import pytest

@pytest.mark.interop
def test_interop_skips():
    pytest.skip("no tool")

def test_plain_skips():
    pytest.skip("not interop")

@pytest.mark.interop
@pytest.mark.xfail(reason="known")
def test_interop_xfails():
    assert False
"""


@pytest.mark.parametrize(("ci", "failed", "skipped"), [("true", 1, 1), ("", 0, 2)])
def test_ci_turns_interop_skips_into_failures(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str, failed: int, skipped: int
) -> None:
    tests_dir = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("CI", ci)
    monkeypatch.setenv("PYTHONPATH", str(tests_dir.parent))  # conftest imports tests.*
    pytester.makeconftest((tests_dir / "conftest.py").read_text())
    pytester.makepyfile(INNER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "ignore")
    result.assert_outcomes(failed=failed, skipped=skipped, xfailed=1)
    if failed:
        result.stdout.fnmatch_lines(["*skipped while CI=true*no tool*"])


# -- network namespaces ----------------------------------------------------------------


@interop
def test_netns_has_only_loopback(netns: NetNS) -> None:
    assert netns.name.startswith("dmzr-")
    links = netns.run(["ip", "-o", "link", "show"], timeout=10, check=True).stdout.splitlines()
    assert [line.split(":")[1].strip() for line in links] == ["lo"]
    assert "state UNKNOWN" in links[0] or "UP" in links[0]


@interop
def test_netns_programs_get_tcp_nodelay(netns: NetNS) -> None:
    assert netns.run(["sh", "-c", "echo $TCP_NODELAY"], timeout=10).stdout.strip() == "1"


@interop
def test_netns_cannot_reach_host_loopback(netns: NetNS) -> None:
    with socket.create_server(("127.0.0.1", 0)) as host_server:
        port = host_server.getsockname()[1]
        with pytest.raises(ConnectionRefusedError):
            netns.create_connection("127.0.0.1", port, timeout=5).close()


@interop
def test_netns_sockets_talk_inside(netns: NetNS) -> None:
    with netns.listen() as server:
        port = server.getsockname()[1]
        with netns.create_connection("127.0.0.1", port, timeout=5) as client:
            peer, _ = server.accept()
            with peer:
                client.sendall(b"ping")
                assert peer.recv(4) == b"ping"
                assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


@interop
def test_netns_threads_live_inside(netns: NetNS) -> None:
    seen: list[list[str]] = []
    with netns.listen() as server:
        port = server.getsockname()[1]

        def inside() -> None:
            seen.append([name for _, name in socket.if_nameindex()])
            socket.create_connection(("127.0.0.1", port), timeout=5).close()

        netns.start_thread(inside).join(10)
        server.settimeout(5)
        server.accept()[0].close()
    assert seen == [["lo"]]
    assert netns.call_inside(lambda: [name for _, name in socket.if_nameindex()]) == ["lo"]


@interop
def test_netns_close_kills_members_and_deletes() -> None:
    ns = NetNS().create()
    proc = ns.popen(["sleep", "60"])
    assert ns.name in list_namespaces()
    ns.close()
    assert proc.wait(timeout=10) != 0
    assert ns.name not in list_namespaces()
    ns.close()  # idempotent


@interop
def test_sweep_removes_namespaces_of_dead_runs(netns: NetNS) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait(timeout=10)
    stale = f"dmzr-{dead.pid}-0"
    subprocess.run(["ip", "netns", "add", stale], check=True, timeout=10)
    try:
        removed = sweep_stale()
    finally:
        subprocess.run(["ip", "netns", "del", stale], check=False, capture_output=True, timeout=10)
    assert stale in removed
    assert netns.name not in removed  # our own live namespace stays
    assert netns.name in list_namespaces()


# -- Orthanc and the DCMTK tools -----------------------------------------------------------


@interop
def test_orthanc_answers_echo_and_rest(orthanc: Orthanc) -> None:
    result = dcmtk.echoscu(orthanc.node)
    assert result.status == "Success"
    system = orthanc.rest("GET", "/system")
    assert system["DicomAet"] == "ORTHANC"
    assert system["DicomPort"] == orthanc.dicom_port == 4242
    assert orthanc.ns.name.startswith("dmzr-")
    assert orthanc.instances() == []


@interop
def test_orthanc_is_unreachable_from_host(orthanc: Orthanc) -> None:
    """Orthanc binds all addresses, but only inside its namespace."""
    host_side = dcmtk.DicomNode("127.0.0.1", orthanc.dicom_port, orthanc.ae_title, ns=None)
    if _host_port_in_use(orthanc.dicom_port):
        pytest.skip("something else listens on the host's port 4242")
    assert not dcmtk.echoscu(host_side, check=False, timeout=10).ok


def _host_port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@interop
def test_upload_then_find_study_and_images(orthanc: Orthanc, ct_series: SampleSeries) -> None:
    orthanc.upload(ct_series.paths)
    assert orthanc.instances() == sorted(ct_series.sop_instance_uids)

    studies = dcmtk.findscu(orthanc.node, "STUDY", {"PatientID": "", "StudyDescription": ""})
    assert studies.values("StudyInstanceUID") == [ct_series.study_instance_uid]
    assert studies.values("PatientID") == [ct_series.patient_id]

    images = dcmtk.findscu(
        orthanc.node,
        "IMAGE",
        {
            "StudyInstanceUID": ct_series.study_instance_uid,
            "SeriesInstanceUID": ct_series.series_instance_uid,
        },
    )
    assert sorted(images.values("SOPInstanceUID")) == sorted(ct_series.sop_instance_uids)
    assert images.status == "Success"


@interop
def test_getscu_retrieves_identical_instances(
    orthanc: Orthanc, ct_series: SampleSeries, tmp_path: Path
) -> None:
    orthanc.upload(ct_series.paths)
    result = dcmtk.getscu(
        orthanc.node, tmp_path / "got", "STUDY", {"StudyInstanceUID": ct_series.study_instance_uid}
    )
    assert len(result.files) == 5
    assert result.suboperations["Completed"] == 5
    assert result.suboperations["Failed"] == 0
    sent = {fingerprint(path) for path in ct_series.paths}
    assert {fingerprint(path) for path in result.files} == sent


@interop
def test_movescu_delivers_to_storescp(
    orthanc: Orthanc, ct_series: SampleSeries, tmp_path: Path
) -> None:
    orthanc.upload(ct_series.paths)
    with dcmtk.storescp(tmp_path / "dest", ns=orthanc.ns, ae_title="DEST") as scp:
        orthanc.add_modality(scp.ae_title, "127.0.0.1", scp.port)
        result = dcmtk.movescu(
            orthanc.node, "DEST", "STUDY", {"StudyInstanceUID": ct_series.study_instance_uid}
        )
        assert result.status == "Success"
        files = scp.wait_for_files(5, timeout=10)
    assert len(files) == 5
    sent = {fingerprint(path) for path in ct_series.paths}
    assert {fingerprint(path) for path in files} == sent


@interop
def test_failed_retrieve_is_reported(orthanc: Orthanc, tmp_path: Path) -> None:
    """getscu exits 0 on a failed C-GET: the wrapper still sees the failure status."""
    keys = {"StudyInstanceUID": "1.2.3.999"}
    result = dcmtk.getscu(orthanc.node, tmp_path / "none", "STUDY", keys, check=False)
    assert result.returncode == 0
    assert not result.ok
    assert result.status is not None and result.status.startswith("Failed")
    with pytest.raises(dcmtk.ToolError, match="status Failed"):
        result.check()
    move = dcmtk.movescu(orthanc.node, "UNKNOWN", "STUDY", keys, check=False)
    assert not move.ok


@interop
def test_rest_upload_and_reset(orthanc: Orthanc, ct_series: SampleSeries) -> None:
    orthanc.upload(ct_series.paths[:2], via="rest")
    assert len(orthanc.instances()) == 2
    orthanc.add_modality("VIEWER", "127.0.0.1", 11113)
    assert orthanc.modalities() == ["VIEWER"]
    orthanc.reset()
    assert orthanc.instances() == []
    assert orthanc.modalities() == []


@interop
def test_orthanc_start_failure_shows_log(netns: NetNS, tmp_path: Path) -> None:
    server = Orthanc(netns, tmp_path / "bad", config_overrides={"DicomPort": "not-a-port"})
    with pytest.raises(HarnessError, match="exited") as info:
        server.start()
    assert "DicomPort" in str(info.value)  # the log tail names the bad option
    assert server.proc is None
    assert json.loads(server.config_path.read_text())["DicomPort"] == "not-a-port"


@interop
def test_stopped_orthanc_refuses_then_restarts(orthanc: Orthanc) -> None:
    orthanc.stop()
    assert not orthanc.running
    assert not dcmtk.echoscu(orthanc.node, check=False, timeout=10).ok
    orthanc.start()
    assert dcmtk.echoscu(orthanc.node).ok
