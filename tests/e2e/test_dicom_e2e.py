"""Issue 3 end to end: DCMTK against `relay workstation`, through real processes to a PACS.

The chain is what runs in production: `relay gateway`, `relay agent` (with `pacs:`) and
`relay workstation` (with `dicom:`) started from the CLI over real TLS on loopback; the
PACS is relay.dicom's EmbeddedPacs in a process of its own, holding the demo's CT and MR
studies. Every answer the viewer gets through the relay is compared with the answer of
the same DCMTK tool asked of the PACS directly. storescp, which binds every address, runs
in a network namespace and is reached through a forwarder.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from relay_dev import samples
from tests.e2e.dicom_chain import (
    HOST,
    PACS_AE,
    DicomChain,
    NsForwarder,
    PacsProcess,
    bytes_by_instance,
    dataset_bytes,
    match_elements,
    running_dicom_chain,
)
from tests.interop.harness import DicomNode, NetNS, dcmtk, require_tools

pytestmark = pytest.mark.interop

TIMEOUT = 60.0  # seconds for one DCMTK run
CT_PATIENT = samples.CT_STUDY.patient_id
MR_PATIENT = samples.MR_STUDY.patient_id
RSS_LIMIT_KB = 300 * 1024
# The memory test's study: well above RSS_LIMIT_KB (a role that held it would fail) and
# the buffers (a few MiB per stream). At 1 GiB the peaks were the same (agent 118-123 MiB,
# workstation 102-104) and it took 14 s more; instead, the second half of the transfer may
# not raise a role's peak by more than RSS_GROWTH_KB (0-9 MiB seen), which catches memory
# growing with the bytes moved (1 byte in 8 and up) better than the ceiling did at 1 GiB.
# SyntheticStudy.of_size estimates 2 KiB of header per instance, a little more than it
# writes, so ask for some more.
BIG_STUDY_BYTES = (512 << 20) + (8 << 20)
RSS_GROWTH_KB = 32 * 1024


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsProcess]:
    require_tools("echoscu", "findscu", "getscu", "movescu", "storescu")
    server = PacsProcess(tmp_path_factory.mktemp("pacs")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def viewer() -> Iterator[NsForwarder]:
    """The workstation's C-MOVE destination STORESCP: a forwarder to a storescp in a netns."""
    forwarder = NsForwarder()
    yield forwarder
    forwarder.close()


@pytest.fixture(scope="module")
def chain(
    pacs: PacsProcess, viewer: NsForwarder, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DicomChain]:
    c = DicomChain(
        tmp_path_factory.mktemp("chain"), pacs.port, destinations={"STORESCP": viewer.port}
    )
    with running_dicom_chain(c):
        yield c


@pytest.fixture(scope="module")
def held() -> dict[str, dict[str, bytes]]:
    """What the PACS holds (it loads relay_dev.samples.demo_studies(), which is
    deterministic): study ("CT", "MR") -> SOP Instance UID -> dataset bytes."""
    out: dict[str, dict[str, bytes]] = {"CT": {}, "MR": {}}
    for inst in samples.demo_studies():
        study = "CT" if inst.sop_class == samples.CT_IMAGE_STORAGE else "MR"
        out[study][inst.sop_instance] = inst.data
    return out


def direct(pacs: PacsProcess) -> DicomNode:
    return DicomNode(HOST, pacs.port, PACS_AE)


@pytest.fixture(scope="module")
def uids(pacs: PacsProcess) -> dict[str, str]:
    """CT and MR study UIDs, the MR series and one MR image, as the PACS reports them."""
    found = dcmtk.findscu(direct(pacs), "STUDY", {"PatientID": ""}, timeout=TIMEOUT)
    by_patient = dict(zip(found.values("PatientID"), found.values("StudyInstanceUID"), strict=True))
    series = dcmtk.findscu(
        direct(pacs), "SERIES", {"StudyInstanceUID": by_patient[MR_PATIENT]}, timeout=TIMEOUT
    ).values("SeriesInstanceUID")
    images = dcmtk.findscu(
        direct(pacs),
        "IMAGE",
        {"StudyInstanceUID": by_patient[MR_PATIENT], "SeriesInstanceUID": series[0]},
        timeout=TIMEOUT,
    ).values("SOPInstanceUID")
    return {
        "CT": by_patient[CT_PATIENT],
        "MR": by_patient[MR_PATIENT],
        "MR_SERIES": series[0],
        "MR_IMAGE": sorted(images)[0],
    }


def fill(keys: dict[str, str], uids: dict[str, str]) -> dict[str, str]:
    return {k: uids.get(v, v) for k, v in keys.items()}


def wait_for(predicate: Callable[[], bool], within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_echoscu_reaches_the_pacs(chain: DicomChain, pacs: PacsProcess) -> None:
    before = pacs.events().get("echoes", 0)
    result = dcmtk.echoscu(chain.node, timeout=TIMEOUT)
    assert result.ok and result.status == "Success"
    assert wait_for(lambda: pacs.events().get("echoes", 0) > before)


@pytest.mark.parametrize(
    ("model", "level", "keys"),
    [
        ("study", "STUDY", {"PatientName": "", "PatientID": "", "StudyDate": "",
                            "StudyDescription": "", "AccessionNumber": "",
                            "ModalitiesInStudy": "", "NumberOfStudyRelatedInstances": ""}),
        ("patient", "PATIENT", {"PatientName": "", "PatientBirthDate": "", "PatientSex": ""}),
        ("patient", "STUDY", {"PatientID": MR_PATIENT, "StudyDescription": ""}),
        ("study", "STUDY", {"PatientName": "DOE*", "StudyDate": "20240101-20240131"}),
        ("study", "SERIES", {"StudyInstanceUID": "CT", "Modality": "", "SeriesNumber": "",
                             "NumberOfSeriesRelatedInstances": ""}),
        ("study", "IMAGE", {"StudyInstanceUID": "MR", "SeriesInstanceUID": "MR_SERIES",
                            "InstanceNumber": "", "SOPClassUID": ""}),
    ],
    ids=["study", "patient-root", "patient-root-study", "wildcard-range", "series", "image"],
)  # fmt: skip
def test_findscu_equals_a_direct_query(  # noqa: PLR0917
    chain: DicomChain,
    pacs: PacsProcess,
    uids: dict[str, str],
    model: dcmtk.Model,
    level: dcmtk.Level,
    keys: dict[str, str],
) -> None:
    keys = fill(keys, uids)
    relayed = dcmtk.findscu(chain.node, level, keys, model=model, timeout=TIMEOUT)
    straight = dcmtk.findscu(direct(pacs), level, keys, model=model, timeout=TIMEOUT)
    assert relayed.status == straight.status == "Success"
    assert len(relayed.matches) == len(straight.matches) > 0
    assert sorted(map(match_elements, relayed.matches)) == sorted(
        map(match_elements, straight.matches)
    )


@pytest.mark.parametrize(
    ("model", "level", "keys", "count", "study"),
    [
        ("study", "STUDY", {"StudyInstanceUID": "CT"}, 40, "CT"),
        ("study", "SERIES", {"StudyInstanceUID": "MR", "SeriesInstanceUID": "MR_SERIES"}, 24,
         "MR"),
        ("study", "IMAGE", {"StudyInstanceUID": "MR", "SeriesInstanceUID": "MR_SERIES",
                            "SOPInstanceUID": "MR_IMAGE"}, 1, "MR"),
        ("patient", "PATIENT", {"PatientID": CT_PATIENT}, 40, "CT"),
    ],
    ids=["study", "series", "image", "patient-root"],
)  # fmt: skip
def test_getscu_receives_the_pacs_bytes(  # noqa: PLR0917
    chain: DicomChain,
    pacs: PacsProcess,
    uids: dict[str, str],
    held: dict[str, dict[str, bytes]],
    tmp_path: Path,
    model: dcmtk.Model,
    level: dcmtk.Level,
    keys: dict[str, str],
    count: int,
    study: str,
) -> None:
    keys = fill(keys, uids)
    wanted = keys.get("SOPInstanceUID")
    got = dcmtk.getscu(chain.node, tmp_path / "relay", level, keys, model=model,
                       extra_args=["+B"], timeout=TIMEOUT)  # fmt: skip
    want = dcmtk.getscu(direct(pacs), tmp_path / "direct", level, keys, model=model,
                        extra_args=["+B"], timeout=TIMEOUT)  # fmt: skip
    assert got.status == "Success"
    assert got.suboperations.get("Completed") == want.suboperations.get("Completed") == count
    assert got.suboperations.get("Failed") == 0
    assert len(got.files) == count
    assert sorted(map(dataset_bytes, got.files)) == sorted(map(dataset_bytes, want.files))
    # Byte for byte what the PACS holds, instance by instance (not only what DCMTK gets).
    expected = {u: d for u, d in held[study].items() if wanted in (None, u)}
    assert len(expected) == count
    assert bytes_by_instance(got.files) == expected


def test_retrievals_are_compressed_between_the_ends(
    chain: DicomChain, uids: dict[str, str], tmp_path: Path
) -> None:
    """The agent sends zstd; the workstation hands the viewer the raw bytes."""
    sent = 'direction="sent",stage="{}"'
    before = chain.metric("agent", "relay_bytes_total", sent.format("raw"))
    dcmtk.getscu(chain.node, tmp_path / "g", "STUDY", {"StudyInstanceUID": uids["CT"]},
                 timeout=TIMEOUT)  # fmt: skip
    raw = chain.metric("agent", "relay_bytes_total", sent.format("raw"))
    wire = chain.metric("agent", "relay_bytes_total", sent.format("compressed"))
    received = chain.metric("ws", "relay_bytes_total", 'direction="received",stage="raw"')
    assert raw - before > 40 * 512 * 512 * 2
    assert 0 < wire < raw
    assert received >= raw - before


def test_a_retrieve_after_a_query_takes_the_spare_association(
    chain: DicomChain, uids: dict[str, str], tmp_path: Path
) -> None:
    """A viewer's query, then its retrieve: the agent left an association open after the
    query (relay.dicom.spare), and the retrieve's C-GET runs on it, not on a new one."""
    spare = 'outcome="{}"'
    name = "relay_pacs_spare_associations_total"
    opened = chain.metric("agent", name, spare.format("opened"))
    found = dcmtk.findscu(chain.node, "STUDY", {"StudyInstanceUID": uids["CT"]}, timeout=TIMEOUT)
    assert found.status == "Success"
    deadline = time.monotonic() + 10  # the spare opens on a thread after the query ends
    while chain.metric("agent", name, spare.format("opened")) == opened:
        assert time.monotonic() < deadline, "no spare association after the query"
        time.sleep(0.05)
    used = chain.metric("agent", name, spare.format("used"))  # the query may have taken one
    got = dcmtk.getscu(chain.node, tmp_path / "g", "STUDY", {"StudyInstanceUID": uids["CT"]},
                       timeout=TIMEOUT)  # fmt: skip
    assert got.status == "Success" and got.suboperations.get("Completed") == 40
    assert chain.metric("agent", name, spare.format("used")) == used + 1


def test_movescu_delivers_to_the_configured_destination(  # noqa: PLR0917
    chain: DicomChain,
    pacs: PacsProcess,
    viewer: NsForwarder,
    uids: dict[str, str],
    held: dict[str, dict[str, bytes]],
    tmp_path: Path,
) -> None:
    keys = {"StudyInstanceUID": uids["MR"]}
    with (
        NetNS() as ns,
        dcmtk.storescp(tmp_path / "dest", ns=ns, ae_title="STORESCP", extra_args=["+B"]) as scp,
    ):
        viewer.target(ns, scp.port)
        try:
            result = dcmtk.movescu(chain.node, "STORESCP", "STUDY", keys, timeout=TIMEOUT)
            files = scp.wait_for_files(24, timeout=30)
        finally:
            viewer.target(None, None)
    want = dcmtk.getscu(direct(pacs), tmp_path / "direct", "STUDY", keys, extra_args=["+B"],
                        timeout=TIMEOUT)  # fmt: skip
    assert result.ok and result.status == "Success"
    assert len(files) == 24
    assert sorted(map(dataset_bytes, files)) == sorted(map(dataset_bytes, want.files))
    assert bytes_by_instance(files) == held["MR"]  # what the PACS holds, byte for byte


def test_movescu_to_an_unknown_destination_is_a801(chain: DicomChain, uids: dict[str, str]) -> None:
    result = dcmtk.movescu(chain.node, "NOSUCHAE", "STUDY", {"StudyInstanceUID": uids["MR"]},
                           timeout=TIMEOUT, check=False)  # fmt: skip
    assert not result.ok
    assert "MoveDestinationUnknown" in (result.status or "") or "a801" in result.output.lower()


def test_movescu_to_the_configured_destination_while_it_is_down(
    chain: DicomChain, pacs: PacsProcess, viewer: NsForwarder, uids: dict[str, str]
) -> None:
    """STORESCP is in the workstation's config, but nothing answers behind it: movescu is
    told so (0xC008, naming it; not 0xA801), the workstation counts a failed move, and the
    PACS is never asked for the study."""
    viewer.target(None, None)  # the forwarder closes every connection
    failed = 'operation="move",status="failure"'
    before = chain.metric("ws", "relay_dicom_operations_total", failed)
    pacs_before = pacs.events()
    result = dcmtk.movescu(chain.node, "STORESCP", "STUDY", {"StudyInstanceUID": uids["MR"]},
                           extra_args=["-d"], timeout=TIMEOUT, check=False)  # fmt: skip
    out = result.output
    assert re.search(r"DIMSE Status\s*: 0xc008: Failed: Unable to process", out), out
    assert f"[move destination STORESCP at {HOST}:{viewer.port} not reachable]" in out, out
    assert chain.metric("ws", "relay_dicom_operations_total", failed) == before + 1
    after = pacs.events()
    assert [after.get(k, 0) for k in ("finds", "gets", "moves")] == [
        pacs_before.get(k, 0) for k in ("finds", "gets", "moves")
    ]


def test_unknown_study_matches_and_retrieves_nothing(chain: DicomChain, tmp_path: Path) -> None:
    keys = {"StudyInstanceUID": "1.2.826.0.1.3680043.10.1341.999.1"}
    found = dcmtk.findscu(chain.node, "STUDY", keys, timeout=TIMEOUT)
    got = dcmtk.getscu(chain.node, tmp_path / "g", "STUDY", keys, timeout=TIMEOUT, check=False)
    assert found.status == "Success" and found.matches == ()
    assert got.files == ()
    assert got.suboperations.get("Completed", 0) == 0
    assert got.status is not None and not got.status.startswith("Pending")


def test_storescu_upload_lands_in_the_pacs(
    chain: DicomChain, pacs: PacsProcess, tmp_path: Path
) -> None:
    spec = samples.StudySpec(patient_name="UPLOAD^KEY^IMAGES", patient_id="RELAYUP01")
    new = samples.make_study(3, spec=spec, rows=64, cols=64, seed=4242)
    paths = []
    for i, inst in enumerate(new):
        path = tmp_path / "up" / f"{i}.dcm"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(inst.file_bytes())
        paths.append(path)
    stores_before = pacs.events().get("stores", 0)
    result = dcmtk.storescu(chain.node, paths, timeout=TIMEOUT)
    assert result.ok
    found = dcmtk.findscu(direct(pacs), "STUDY", {"PatientID": "RELAYUP01"}, timeout=TIMEOUT)
    assert len(found.matches) == 1
    study = {"StudyInstanceUID": found.values("StudyInstanceUID")[0]}
    back = dcmtk.getscu(direct(pacs), tmp_path / "back", "STUDY", study, extra_args=["+B"],
                        timeout=TIMEOUT)  # fmt: skip
    assert sorted(map(dataset_bytes, back.files)) == sorted(inst.data for inst in new)
    assert wait_for(lambda: pacs.events().get("stores", 0) >= stores_before + 3)


def test_a_patient_name_canary_never_reaches_the_gateways_output(
    chain: DicomChain, pacs: PacsProcess, tmp_path: Path
) -> None:
    """Issue 5's privacy test: a study whose patient name is a unique canary goes up,
    is queried and retrieved through the relay; the gateway never shows it anywhere."""
    canary = f"CANARY{os.urandom(6).hex().upper()}^PRIVACY"
    patient_id = f"CAN{os.urandom(4).hex().upper()}"
    spec = samples.StudySpec(patient_name=canary, patient_id=patient_id)
    study = samples.make_study(4, spec=spec, rows=64, cols=64, seed=777)
    paths = []
    for i, inst in enumerate(study):
        path = tmp_path / "canary" / f"{i}.dcm"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(inst.file_bytes())
        paths.append(path)
    gateway_dir = chain.tmp / "state"  # the gateway has no state; nothing may appear here
    before = sorted(p.name for p in chain.tmp.iterdir())
    assert dcmtk.storescu(chain.node, paths, timeout=TIMEOUT).ok
    keys = {"PatientID": patient_id, "PatientName": "", "StudyInstanceUID": ""}
    found = dcmtk.findscu(chain.node, "STUDY", keys, timeout=TIMEOUT)
    assert found.values("PatientName") == [canary]  # the canary did travel through the relay
    study_uid = {"StudyInstanceUID": found.values("StudyInstanceUID")[0]}
    got = dcmtk.getscu(chain.node, tmp_path / "got", "STUDY", study_uid, timeout=TIMEOUT)
    assert len(got.files) == 4
    status, metrics_text = chain.http_get(chain.ports["gateway_metrics"], "/metrics")
    assert status == 200
    logged = chain.procs["gateway"].output()
    for form in (canary, canary.split("^", maxsplit=1)[0], patient_id):
        assert form not in logged
        assert form not in metrics_text
    # The gateway writes no file: the test directory holds only what existed plus state
    # the agent keeps (its state_dir), never anything of the gateway's.
    after = sorted(p.name for p in chain.tmp.iterdir())
    assert set(after) - set(before) <= {gateway_dir.name}
    gw_fds = Path(f"/proc/{chain.pid('gateway')}/fd")
    opened = {os.path.realpath(p) for p in gw_fds.iterdir()}
    assert not {f for f in opened if f.startswith(str(tmp_path))}


# -- bad cases, each on a chain of its own ---------------------------------------------


@pytest.fixture(scope="module")
def slow_pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsProcess]:
    """The demo studies again, 50 ms per sent instance: operations last long enough to
    interrupt them."""
    require_tools("echoscu", "getscu", "movescu")
    server = PacsProcess(tmp_path_factory.mktemp("slow-pacs"), send_delay=0.05).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def slow_viewer() -> Iterator[NsForwarder]:
    forwarder = NsForwarder()
    yield forwarder
    forwarder.close()


@pytest.fixture(scope="module")
def slow_chain(
    slow_pacs: PacsProcess, slow_viewer: NsForwarder, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DicomChain]:
    c = DicomChain(
        tmp_path_factory.mktemp("slow-chain"),
        slow_pacs.port,
        destinations={"STORESCP": slow_viewer.port},
        resume_window=f"{RESUME_WINDOW:.0f}s",
    )
    with running_dicom_chain(c):
        yield c


def test_viewer_cancel_cancels_at_the_pacs(
    slow_chain: DicomChain, slow_pacs: PacsProcess, slow_viewer: NsForwarder, tmp_path: Path
) -> None:
    found = dcmtk.findscu(direct(slow_pacs), "STUDY", {"PatientID": MR_PATIENT}, timeout=TIMEOUT)
    keys = {"StudyInstanceUID": found.values("StudyInstanceUID")[0]}
    before = slow_pacs.events()
    with (
        NetNS() as ns,
        dcmtk.storescp(tmp_path / "dest", ns=ns, ae_title="STORESCP") as scp,
    ):
        slow_viewer.target(ns, scp.port)
        try:
            result = dcmtk.movescu(slow_chain.node, "STORESCP", "STUDY", keys,
                                   extra_args=["--cancel", "3"], timeout=TIMEOUT,
                                   check=False)  # fmt: skip
        finally:
            slow_viewer.target(None, None)
        received = len(scp.files())
    assert result.status is not None and "Cancel" in result.status, result.output[-2000:]
    assert wait_for(lambda: slow_pacs.events().get("cancels", 0) > before.get("cancels", 0))
    sent = slow_pacs.events()["instances_sent"] - before.get("instances_sent", 0)
    assert sent < 24 and received < 24


RESUME_WINDOW = 8.0  # the slow chain's dicom.resume_window (the default, 30 s, is long)


def _study_keys(pacs: PacsProcess) -> dict[str, str]:
    found = dcmtk.findscu(direct(pacs), "STUDY", {"PatientID": CT_PATIENT}, timeout=TIMEOUT)
    return {"StudyInstanceUID": found.values("StudyInstanceUID")[0]}


def _restart_gateway(chain: DicomChain) -> None:
    chain.procs["gateway"].popen.wait(5)  # type: ignore[union-attr]
    chain.start("gateway")


def test_tunnel_that_does_not_come_back_fails_the_retrieval(
    slow_chain: DicomChain,
    slow_pacs: PacsProcess,
    held: dict[str, dict[str, bytes]],
    tmp_path: Path,
) -> None:
    """SIGKILL the gateway while getscu receives and keep it down: the workstation tries to
    resume for its resume window (dicom.resume_window, honoured), then getscu ends in
    failure (never success, never a hang), with only complete instances on disk; once the
    gateway is back, C-GET works."""
    keys = _study_keys(slow_pacs)
    out = tmp_path / "relay"
    out.mkdir()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(dcmtk.getscu, slow_chain.node, out, "STUDY", keys,
                             extra_args=["+B"], timeout=TIMEOUT + RESUME_WINDOW,
                             check=False)  # fmt: skip
        assert wait_for(lambda: len(list(out.iterdir())) >= 3, within=30), "no instance arrived"
        os.kill(slow_chain.pid("gateway"), signal.SIGKILL)
        killed = time.monotonic()
        result = future.result(timeout=TIMEOUT + RESUME_WINDOW + 10)
        ended = time.monotonic() - killed
    print(f"\ngetscu ended {ended:.2f} s after the gateway was killed: {result.status}, "
          f"{result.suboperations}")  # fmt: skip
    assert RESUME_WINDOW <= ended < RESUME_WINDOW + 20
    assert not result.ok
    assert result.status is not None and not result.status.startswith(("Success", "Warning"))
    completed = result.suboperations.get("Completed", 0)
    assert completed < 40
    assert result.suboperations.get("Failed", 0) > 0 or "Fail" in result.status
    pacs_bytes = set(held["CT"].values())  # what the PACS holds (a direct C-GET: 2 s more)
    intact = [path for path in result.files if dataset_bytes(path) in pacs_bytes]
    assert len(intact) >= completed  # what was reported complete is complete and intact

    _restart_gateway(slow_chain)
    slow_chain.wait_ready()
    again = dcmtk.getscu(slow_chain.node, tmp_path / "again", "STUDY", keys, extra_args=["+B"],
                         timeout=TIMEOUT)  # fmt: skip
    assert again.suboperations.get("Completed") == 40
    assert sorted(map(dataset_bytes, again.files)) == sorted(pacs_bytes)


def test_tunnel_dropped_mid_retrieval_is_resumed(
    slow_chain: DicomChain,
    slow_pacs: PacsProcess,
    held: dict[str, dict[str, bytes]],
    tmp_path: Path,
) -> None:
    """SIGKILL the gateway while getscu receives, start it again a moment later: the
    workstation reconnects and resumes, and getscu gets every instance exactly once."""
    slow_chain.wait_ready()
    keys = _study_keys(slow_pacs)
    out = tmp_path / "relay"
    out.mkdir()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(dcmtk.getscu, slow_chain.node, out, "STUDY", keys,
                             extra_args=["+B"], timeout=TIMEOUT + RESUME_WINDOW,
                             check=False)  # fmt: skip
        assert wait_for(lambda: len(list(out.iterdir())) >= 3, within=30), "no instance arrived"
        os.kill(slow_chain.pid("gateway"), signal.SIGKILL)
        before_restart = len(list(out.iterdir()))
        time.sleep(1.0)
        _restart_gateway(slow_chain)
        result = future.result(timeout=TIMEOUT + RESUME_WINDOW + 10)
    print(f"\ngetscu after a gateway restart: {result.status}, {result.suboperations}, "
          f"{before_restart} instances before the kill")  # fmt: skip
    assert result.ok, result.output[-3000:]
    assert result.status is not None and result.status.startswith("Success")
    assert result.suboperations.get("Completed") == 40
    assert result.suboperations.get("Failed", 0) == 0
    assert len(result.files) == 40  # getscu writes one file per instance: none twice
    assert bytes_by_instance(result.files) == held["CT"]  # what the PACS holds, byte for byte


def test_agent_restart_mid_retrieval_is_resumed(
    held: dict[str, dict[str, bytes]], tmp_path: Path
) -> None:
    """SIGTERM the agent while getscu receives (an upgrade: its drain_grace, 2 s, ends
    before the retrieve does), start it again: the stream it cut is reset with SHUTDOWN,
    which the workstation resumes, and getscu gets every instance exactly once."""
    require_tools("findscu", "getscu")
    # 0.2 s per instance: the MR study's 24 outlast the agent's drain grace.
    server = PacsProcess(tmp_path / "pacs", send_delay=0.2).start()
    try:
        found = dcmtk.findscu(direct(server), "STUDY", {"PatientID": MR_PATIENT},
                              timeout=TIMEOUT)  # fmt: skip
        keys = {"StudyInstanceUID": found.values("StudyInstanceUID")[0]}
        c = DicomChain(tmp_path / "chain", server.port, resume_window="20s")
        with running_dicom_chain(c), concurrent.futures.ThreadPoolExecutor(1) as pool:
            out = tmp_path / "relay"
            out.mkdir()
            future = pool.submit(dcmtk.getscu, c.node, out, "STUDY", keys, extra_args=["+B"],
                                 timeout=TIMEOUT, check=False)  # fmt: skip
            assert wait_for(lambda: len(list(out.iterdir())) >= 3, within=30), "no instance"
            agent = c.procs["agent"]
            agent.send_signal(signal.SIGTERM)
            assert agent.popen is not None
            assert agent.popen.wait(15) == 0
            before_restart = len(list(out.iterdir()))
            c.start("agent")
            result = future.result(timeout=TIMEOUT + 10)
    finally:
        server.stop()
    print(f"\ngetscu after an agent restart: {result.status}, {result.suboperations}, "
          f"{before_restart} instances before the restart")  # fmt: skip
    assert before_restart < 24, "the drain let the retrieve finish: nothing was cut"
    assert result.ok, result.output[-3000:]
    assert result.status is not None and result.status.startswith("Success")
    assert result.suboperations.get("Completed") == 24
    assert len(result.files) == 24  # one file per instance: none twice
    # What the PACS holds, byte for byte (a direct C-GET from this PACS took 5 s more).
    assert bytes_by_instance(result.files) == held["MR"]


def test_pacs_down_is_a_failure_status_within_a_bounded_time(
    tmp_path: Path,
) -> None:
    require_tools("echoscu", "findscu", "getscu")
    server = PacsProcess(tmp_path / "pacs", data="none").start()
    try:
        c = DicomChain(tmp_path / "chain", server.port, pacs_timeout="3s")
        with running_dicom_chain(c):
            server.stop()
            timings: dict[str, float] = {}
            results: dict[str, dcmtk.ToolResult] = {}
            runs: list[tuple[str, Callable[[], dcmtk.ToolResult]]] = [
                ("echo", lambda: dcmtk.echoscu(c.node, timeout=30, check=False)),
                ("find", lambda: dcmtk.findscu(c.node, "STUDY", {}, timeout=30, check=False)),
                ("get", lambda: dcmtk.getscu(c.node, tmp_path / "g", "STUDY",
                                              {"StudyInstanceUID": "1.2.3.4"}, timeout=30,
                                              check=False)),
            ]  # fmt: skip
            for name, run in runs:
                start = time.monotonic()
                results[name] = run()
                timings[name] = round(time.monotonic() - start, 2)
    finally:
        server.stop()
    print(f"\nPACS down: {timings}")
    for name, result in results.items():
        assert not result.ok, (name, result.output)
        assert result.status is not None and not result.status.startswith("Success"), name
    assert results["get"].files == ()  # type: ignore[attr-defined]


# -- memory --------------------------------------------------------------------------------


def _getscu_ignore(node: DicomNode, study_uid: str) -> dcmtk.ToolResult:
    argv = [
        "getscu", "-v", "-S", "--ignore", "-pdu", "131072",
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
        "-aec", node.ae_title, node.host, str(node.port),
    ]  # fmt: skip
    return dcmtk.run_tool(argv, timeout=600)


def _peaks(series: list[tuple[float, dict[str, int]]], start: float, end: float) -> dict[str, int]:
    """The highest RSS (KiB) of each role among the samples taken in [start, end)."""
    out: dict[str, int] = {}
    for when, rss in series:
        if start <= when < end:
            for role, kb in rss.items():
                out[role] = max(out.get(role, 0), kb)
    return out


@pytest.mark.slow
def test_a_big_study_keeps_agent_and_workstation_memory_bounded(tmp_path: Path) -> None:
    """Each role in its own process, RSS sampled from /proc during a C-GET of a study
    larger than the ceiling (BIG_STUDY_BYTES): under RSS_LIMIT_KB throughout, and the
    second half of the transfer raises no role's peak above the first half's by more than
    RSS_GROWTH_KB, so the bound does not grow with the size."""
    require_tools("getscu", "echoscu")
    study = samples.SyntheticStudy.of_size(BIG_STUDY_BYTES)
    server = PacsProcess(tmp_path / "pacs", data="none", synthetic_bytes=BIG_STUDY_BYTES)
    server.start()
    try:
        c = DicomChain(tmp_path / "chain", server.port)
        with running_dicom_chain(c):
            roles = ("agent", "ws1", "gateway")
            series: list[tuple[float, dict[str, int]]] = []
            done = threading.Event()

            def sample() -> None:
                while not done.is_set():
                    series.append((time.monotonic(), {role: c.rss_kb(role) for role in roles}))
                    time.sleep(0.05)

            sampler = threading.Thread(target=sample, daemon=True)
            start = time.monotonic()
            sampler.start()
            try:
                result = _getscu_ignore(c.node, study.spec.study_uid)
            finally:
                done.set()
                sampler.join(5)
            end = time.monotonic()
            raw = c.metric("agent", "relay_bytes_total", 'direction="sent",stage="raw"')
            wire = c.metric("agent", "relay_bytes_total", 'direction="sent",stage="compressed"')
    finally:
        server.stop()
    subops = result.suboperations
    middle = (start + end) / 2
    peak = _peaks(series, start, end + 1)
    first, second = _peaks(series, start, middle), _peaks(series, middle, end + 1)
    print(
        f"\n{int(raw) >> 20} MiB C-GET through processes: {study.count} instances in "
        f"{end - start:.1f} s; peak RSS agent {peak['agent'] >> 10} MiB, workstation "
        f"{peak['ws1'] >> 10} MiB, gateway {peak['gateway'] >> 10} MiB; first half -> second "
        f"half: agent {first['agent'] >> 10} -> {second['agent'] >> 10} MiB, workstation "
        f"{first['ws1'] >> 10} -> {second['ws1'] >> 10} MiB; agent sent "
        f"{int(raw) >> 20} MiB raw as {int(wire) >> 20} MiB compressed"
    )
    assert (subops.get("Completed"), subops.get("Failed")) == (study.count, 0), result.output[
        -2000:
    ]
    assert raw >= BIG_STUDY_BYTES - (8 << 20)
    assert peak["agent"] < RSS_LIMIT_KB
    assert peak["ws1"] < RSS_LIMIT_KB
    assert second["agent"] <= first["agent"] + RSS_GROWTH_KB
    assert second["ws1"] <= first["ws1"] + RSS_GROWTH_KB
