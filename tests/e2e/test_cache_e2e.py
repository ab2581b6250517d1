"""Issue 12 end to end: the workstation's encrypted cache, with real processes and DCMTK.

`relay gateway|agent|workstation` from the CLI over real TLS, the embedded PACS in its
own process with the demo's CT (40 images) and MR (24) studies. A worklist rule prefetches
the CT; then the gateway is stopped (the link is down) and getscu, movescu and findscu
are answered from the cache, byte-identical to a direct retrieve from the PACS.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from relay_dev import samples
from tests.e2e.chain import RELAY
from tests.e2e.dicom_chain import (
    HOST,
    PACS_AE,
    DicomChain,
    NsForwarder,
    PacsProcess,
    dataset_bytes,
    running_dicom_chain,
)
from tests.interop.harness import DicomNode, NetNS, dcmtk, require_tools

pytestmark = pytest.mark.interop

TIMEOUT = 60.0
CT = samples.CT_STUDY
RULE = (
    "prefetch:\n  priors: 0\n  rules:\n"
    "    - {name: ct, every: 10s, match: {ModalitiesInStudy: CT, StudyDate: '20000101..today'}}\n"
)


def wait_for(predicate: Callable[[], bool], within: float = 60.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def cli(chain: DicomChain, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RELAY, *args, "--config", str(chain.tmp / "ws1.yaml")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def status(chain: DicomChain, *extra: str) -> dict[str, Any]:
    done = cli(chain, "cache", "status", "--json", *extra)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def complete(chain: DicomChain) -> list[dict[str, Any]]:
    try:
        return [s for s in status(chain)["studies"] if s["state"] == "complete"]
    except AssertionError:
        return []


def files_under(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file()]


def direct(pacs: PacsProcess) -> DicomNode:
    return DicomNode(HOST, pacs.port, PACS_AE)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsProcess]:
    require_tools("findscu", "getscu", "movescu")
    server = PacsProcess(tmp_path_factory.mktemp("pacs")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ct_uid(pacs: PacsProcess) -> str:
    return study_of(pacs, CT.patient_id)


def study_of(pacs: PacsProcess, patient_id: str) -> str:
    keys = {"PatientID": patient_id, "StudyInstanceUID": ""}
    found = dcmtk.findscu(direct(pacs), "STUDY", keys, timeout=TIMEOUT)
    return found.values("StudyInstanceUID")[0]


def direct_get(pacs: PacsProcess, dest: Path, study: str) -> list[bytes]:
    keys = {"StudyInstanceUID": study}
    got = dcmtk.getscu(direct(pacs), dest, "STUDY", keys, extra_args=["+B"], timeout=TIMEOUT)
    return sorted(map(dataset_bytes, got.files))


def make_chain(tmp: Path, pacs: PacsProcess, cache: str, extra: str = "", **kw: Any) -> DicomChain:
    return DicomChain(tmp, pacs.port, ws_extra=f"cache: {{dir: cache/, {cache}}}\n{extra}", **kw)


def test_prefetched_study_is_served_with_the_link_down(
    pacs: PacsProcess, ct_uid: str, tmp_path: Path
) -> None:
    viewer = NsForwarder()
    chain = make_chain(tmp_path / "c", pacs, "max_size: 1GiB", RULE,
                       destinations={"STORESCP": viewer.port})  # fmt: skip
    cache_dir = tmp_path / "c" / "cache"
    want_bytes = direct_get(pacs, tmp_path / "direct", ct_uid)
    try:
        with running_dicom_chain(chain):
            assert wait_for(lambda: len(complete(chain)) == 1), chain.logs()
            listed = status(chain)["studies"][0]
            assert listed["instances"] == 40 and listed["source"] == "rule:ct"
            assert "patient" not in listed  # patient-free unless asked
            assert status(chain, "--names")["studies"][0]["patient"] == CT.patient_name

            # No plaintext: no file under the cache directory names the canary.
            canaries = [CT.patient_name.encode(), CT.patient_id.encode(), ct_uid.encode(),
                        CT.description.encode()]  # fmt: skip
            files = files_under(cache_dir)
            assert len(files) >= 40
            for path in files:
                data = path.read_bytes()
                assert not any(c in data for c in canaries), path
                assert not any(c.decode() in path.name for c in canaries)

            # Cut the link.
            chain.procs["gateway"].stop()
            assert wait_for(lambda: chain.http_get(chain.ports["ws_metrics"], "/readyz")[0] != 200)
            got = dcmtk.getscu(chain.node, tmp_path / "g", "STUDY", {"StudyInstanceUID": ct_uid},
                               extra_args=["+B"], timeout=TIMEOUT)  # fmt: skip
            assert got.status == "Success" and len(got.files) == 40
            assert sorted(map(dataset_bytes, got.files)) == want_bytes

            series = dcmtk.findscu(chain.node, "SERIES", {"StudyInstanceUID": ct_uid,
                                   "SeriesInstanceUID": ""}, timeout=TIMEOUT)  # fmt: skip
            one = series.values("SeriesInstanceUID")[0]
            got_series = dcmtk.getscu(chain.node, tmp_path / "s", "SERIES",
                                      {"StudyInstanceUID": ct_uid, "SeriesInstanceUID": one},
                                      timeout=TIMEOUT)  # fmt: skip
            assert got_series.status == "Success" and len(got_series.files) > 0

            keys = {"PatientID": CT.patient_id, "StudyInstanceUID": "", "PatientName": ""}
            found = dcmtk.findscu(chain.node, "STUDY", keys, timeout=TIMEOUT)
            assert found.status == "Success"
            assert found.values("StudyInstanceUID") == [ct_uid]
            assert "C-FIND answered from the cache" in chain.procs["ws1"].output()

            with (
                NetNS() as ns,
                dcmtk.storescp(
                    tmp_path / "dest", ns=ns, ae_title="STORESCP", extra_args=["+B"]
                ) as scp,  # fmt: skip
            ):
                viewer.target(ns, scp.port)
                moved = dcmtk.movescu(chain.node, "STORESCP", "STUDY",
                                      {"StudyInstanceUID": ct_uid}, timeout=TIMEOUT)  # fmt: skip
                moved_files = scp.wait_for_files(40, timeout=30)
            assert moved.ok and moved.status == "Success"
            assert sorted(map(dataset_bytes, moved_files)) == want_bytes

            shown = cli(chain, "cache", "status")
            assert shown.returncode == 0 and "study 1" in shown.stdout
            assert CT.patient_name not in shown.stdout
            evicted = cli(chain, "cache", "evict", "study 1")
            assert evicted.returncode == 0, evicted.stderr
            assert status(chain)["studies"] == [] and files_under(cache_dir / "objects") == []
            assert cli(chain, "prefetch", ct_uid).returncode == 0  # queued: the link is down
            # Not cached now, and the link is known down: the C-GET fails at once (it
            # waited the tunnel's open timeout, 15 s, first; this bound is under it).
            gone = dcmtk.getscu(chain.node, tmp_path / "gone", "STUDY",
                                {"StudyInstanceUID": ct_uid}, timeout=10, check=False)  # fmt: skip
            assert gone.status == "Failed: UnableToProcess" and not gone.files
        # A clean stop with the in-memory key erases the cache.
        assert files_under(cache_dir) == []
    finally:
        viewer.close()


def test_tamper_refetch_restart_and_revocation(
    pacs: PacsProcess, ct_uid: str, tmp_path: Path
) -> None:
    chain = make_chain(tmp_path / "c", pacs, "max_size: 1GiB", "prefetch: {priors: 0}\n",
                       agent_extra="pki: {ca_cert: pki/ca.crt, ca_key: pki/ca.key}\n")  # fmt: skip
    objects = tmp_path / "c" / "cache" / "objects"
    want_bytes = direct_get(pacs, tmp_path / "direct", ct_uid)
    with running_dicom_chain(chain):
        done = cli(chain, "prefetch", ct_uid)
        assert done.returncode == 0, done.stderr
        assert wait_for(lambda: len(complete(chain)) == 1), chain.logs()
        # Tamper with one file: detected, served from the network, fetched again.
        victim = sorted(objects.iterdir())[3]
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))
        got = dcmtk.getscu(chain.node, tmp_path / "g", "STUDY", {"StudyInstanceUID": ct_uid},
                           extra_args=["+B"], timeout=TIMEOUT)  # fmt: skip
        assert got.status == "Success"
        assert sorted(map(dataset_bytes, got.files)) == want_bytes
        log = chain.procs["ws1"].output()
        assert "is damaged" in log and "served from the network" in log
        assert wait_for(lambda: len(complete(chain)) == 1), chain.logs()
        assert wait_for(lambda: chain.metric("ws", "relay_cache_evictions_total",
                                             'reason="damaged"') == 1)  # fmt: skip

        # A crash with the in-memory key: what that run left is unreadable, so wiped at
        # the next start.
        chain.procs["ws1"].stop(signal.SIGKILL)
        assert len(list(objects.iterdir())) == 40  # sealed files, no key anywhere
        chain.procs["ws1"].start()
        chain.wait_ready()
        assert status(chain)["studies"] == []
        assert list(objects.iterdir()) == []

        # relay cache wipe erases it now.
        assert cli(chain, "prefetch", ct_uid).returncode == 0
        assert wait_for(lambda: len(complete(chain)) == 1), chain.logs()
        wiped = cli(chain, "cache", "wipe")
        assert wiped.returncode == 0 and "wiped 1" in wiped.stdout
        assert list(objects.iterdir()) == [] and status(chain)["studies"] == []

        # Revocation wipes the cache.
        done = cli(chain, "prefetch", ct_uid)
        assert wait_for(lambda: len(complete(chain)) == 1), chain.logs()
        assert len(list(objects.iterdir())) == 40
        revoked = subprocess.run(
            [*RELAY, "device", "revoke", "ws1", "--force", "--config",
             str(chain.tmp / "agent.yaml")], capture_output=True, text=True, timeout=60,
            check=False,
        )  # fmt: skip
        assert revoked.returncode == 0, revoked.stderr
        proc = chain.procs["ws1"].popen
        assert proc is not None
        assert proc.wait(timeout=30) == 3
        assert "cache wiped (revoked): 1 studies" in chain.procs["ws1"].output()
        assert files_under(objects.parent) == []


def test_size_cap_and_expiry(pacs: PacsProcess, ct_uid: str, tmp_path: Path) -> None:
    mr = study_of(pacs, samples.MR_STUDY.patient_id)
    cap = 21 * 1024 * 1024  # the CT (20.1 MiB sealed) fits, the CT and the MR do not
    chain = make_chain(tmp_path / "c", pacs, f"max_size: {cap}, max_age: 15s",
                       "prefetch: {priors: 0}\n")  # fmt: skip
    objects = tmp_path / "c" / "cache" / "objects"
    peak = 0
    with running_dicom_chain(chain):
        assert cli(chain, "prefetch", ct_uid, mr).returncode == 0

        def both_tried() -> bool:
            nonlocal peak
            peak = max(peak, sum(p.stat().st_size for p in files_under(objects)))
            done = status(chain)
            return done["queued"] == 0 and not any(s["state"] == "filling" for s in
                                                   done["studies"]) and chain.metric(
                "ws", "relay_prefetch_studies_total", 'result="complete"') >= 2  # fmt: skip

        assert wait_for(both_tried), chain.logs()
        assert peak <= cap
        assert status(chain)["bytes"] <= cap
        assert chain.metric("ws", "relay_cache_evictions_total", 'reason="size"') >= 1
        assert len(complete(chain)) == 1  # the least recently read went
        # Expiry purges (max_age leaves a loaded machine time to fill both first).
        assert wait_for(lambda: status(chain)["studies"] == [], within=30)
        assert list(objects.iterdir()) == []
        assert chain.metric("ws", "relay_cache_evictions_total", 'reason="expired"') >= 1
