"""Issue 3 against a real PACS: Orthanc behind `relay agent`, DCMTK in front of `relay
workstation`, every process of the chain started from the CLI.

Orthanc binds every address, so it runs in a network namespace with only `lo`; the
gateway, the agent, the workstation, the DCMTK tools and storescp run inside that same
namespace (`ip netns exec`), where 127.0.0.1 is the namespace's own loopback. What the
viewer gets through the relay must equal what the same tool gets from Orthanc directly:
the same matches, the same dataset bytes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.dicom import rawds
from relay_dev import samples
from tests.e2e.dicom_chain import (
    DicomChain,
    bytes_by_instance,
    counts_after,
    dataset_bytes,
    match_elements,
    running_dicom_chain,
)
from tests.interop.harness import Orthanc, SampleSeries, dcmtk, write_ct_series

pytestmark = pytest.mark.interop

TIMEOUT = 60.0
EXPLICIT = "1.2.840.10008.1.2.1"
CT = samples.make_study(6, rows=128, cols=128, seed=61)
MR = samples.make_study(4, modality="MR", seed=62)
CT_STUDY = str(rawds.decode_dataset(CT[0].data, EXPLICIT).StudyInstanceUID)
MR_STUDY = str(rawds.decode_dataset(MR[0].data, EXPLICIT).StudyInstanceUID)
MR_SERIES = str(rawds.decode_dataset(MR[0].data, EXPLICIT).SeriesInstanceUID)
MOVE_DESTINATION = "STORESCP"
SCP_PORT = 11113
# What Orthanc holds: the files uploaded below, which it stores as they are.
HELD = {study: {i.sop_instance: i.data for i in insts} for study, insts in (("ct", CT), ("mr", MR))}


@pytest.fixture(scope="module")
def loaded(
    orthanc_module: Orthanc, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SampleSeries]:
    """Orthanc holding our CT and MR studies and a DCMTK-friendly series of the harness."""
    orthanc_module.reset()
    upload = tmp_path_factory.mktemp("upload")
    for i, inst in enumerate([*CT, *MR]):
        (upload / f"{i}.dcm").write_bytes(inst.file_bytes())
    series = write_ct_series(upload / "harness", 5, patient_id="DMZR0042")
    orthanc_module.upload([upload])
    assert len(orthanc_module.instances()) == len(CT) + len(MR) + 5
    yield series


@pytest.fixture(scope="module")
def scp_port(orthanc_module: Orthanc) -> int:
    """Where the storescp of the C-MOVE test listens, inside Orthanc's namespace: a fixed
    port (storescp cannot take port 0), safe because that namespace is this module's
    alone and every other socket there is Orthanc's (fixed) or in the ephemeral range."""
    low, _ = map(int, orthanc_module.ns.run(
        ["cat", "/proc/sys/net/ipv4/ip_local_port_range"], timeout=10, check=True
    ).stdout.split())  # fmt: skip
    assert low > SCP_PORT and SCP_PORT not in (orthanc_module.dicom_port, orthanc_module.http_port)
    return SCP_PORT


@pytest.fixture(scope="module")
def chain(
    orthanc_module: Orthanc,
    loaded: SampleSeries,
    scp_port: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[DicomChain]:
    c = DicomChain(
        tmp_path_factory.mktemp("chain"),
        orthanc_module.dicom_port,
        pacs_ae=orthanc_module.ae_title,
        ns=orthanc_module.ns,
        destinations={MOVE_DESTINATION: scp_port},
    )
    with running_dicom_chain(c):
        yield c


def test_echoscu(chain: DicomChain) -> None:
    result = dcmtk.echoscu(chain.node, timeout=TIMEOUT)
    assert result.ok and result.status == "Success"


@pytest.mark.parametrize(
    ("model", "level", "keys"),
    [
        ("study", "STUDY", {"PatientName": "", "PatientID": "", "StudyDate": "",
                            "StudyDescription": "", "ModalitiesInStudy": "",
                            "NumberOfStudyRelatedInstances": ""}),
        ("patient", "PATIENT", {"PatientName": "", "PatientBirthDate": ""}),
        ("study", "SERIES", {"StudyInstanceUID": CT_STUDY, "Modality": "", "SeriesNumber": "",
                             "NumberOfSeriesRelatedInstances": ""}),
        ("study", "IMAGE", {"StudyInstanceUID": MR_STUDY, "SeriesInstanceUID": MR_SERIES,
                            "InstanceNumber": ""}),
        ("study", "STUDY", {"PatientName": "ROE*", "StudyDescription": ""}),
    ],
    ids=["study", "patient-root", "series", "image", "wildcard"],
)  # fmt: skip
def test_findscu_equals_orthanc_direct(
    chain: DicomChain,
    orthanc_module: Orthanc,
    model: dcmtk.Model,
    level: dcmtk.Level,
    keys: dict[str, str],
) -> None:
    relayed = dcmtk.findscu(chain.node, level, keys, model=model, timeout=TIMEOUT)
    direct = dcmtk.findscu(orthanc_module.node, level, keys, model=model, timeout=TIMEOUT)
    assert relayed.status == direct.status == "Success"
    assert len(relayed.matches) == len(direct.matches) > 0
    assert sorted(map(match_elements, relayed.matches)) == sorted(
        map(match_elements, direct.matches)
    )


@pytest.mark.parametrize(
    ("keys", "count", "study"),
    [
        ({"StudyInstanceUID": CT_STUDY}, len(CT), "ct"),
        ({"StudyInstanceUID": MR_STUDY}, len(MR), "mr"),
    ],
    ids=["ct", "mr"],
)
def test_getscu_receives_orthancs_bytes(  # noqa: PLR0917
    chain: DicomChain,
    orthanc_module: Orthanc,
    tmp_path: Path,
    keys: dict[str, str],
    count: int,
    study: str,
) -> None:
    got = dcmtk.getscu(chain.node, tmp_path / "relay", "STUDY", keys, extra_args=["+B"],
                       timeout=TIMEOUT)  # fmt: skip
    want = dcmtk.getscu(orthanc_module.node, tmp_path / "direct", "STUDY", keys,
                        extra_args=["+B"], timeout=TIMEOUT)  # fmt: skip
    assert got.status == "Success"
    assert got.suboperations.get("Completed") == want.suboperations.get("Completed") == count
    assert sorted(map(dataset_bytes, got.files)) == sorted(map(dataset_bytes, want.files))
    assert bytes_by_instance(got.files) == HELD[study]  # what Orthanc holds, byte for byte


def test_a_retrieve_after_a_query_runs_on_the_spare_association(
    chain: DicomChain, tmp_path: Path
) -> None:
    """Orthanc accepts the agent's spare association (both roots' query and retrieve
    models and the storage contexts, with the SCP role), and a C-GET that follows a
    query runs on it and brings Orthanc's bytes (relay.dicom.spare)."""
    name, outcome = "relay_pacs_spare_associations_total", 'outcome="{}"'
    opened = chain.metric("agent", name, outcome.format("opened"))
    found = dcmtk.findscu(chain.node, "STUDY", {"StudyInstanceUID": CT_STUDY}, timeout=TIMEOUT)
    assert found.status == "Success" and len(found.matches) == 1
    deadline = time.monotonic() + 10  # the spare opens on a thread after the query ends
    while chain.metric("agent", name, outcome.format("opened")) == opened:
        assert time.monotonic() < deadline, "no spare association after the query"
        time.sleep(0.05)
    used = chain.metric("agent", name, outcome.format("used"))
    got = dcmtk.getscu(chain.node, tmp_path, "STUDY", {"StudyInstanceUID": CT_STUDY},
                       extra_args=["+B"], timeout=TIMEOUT)  # fmt: skip
    assert got.status == "Success" and got.suboperations.get("Completed") == len(CT)
    assert bytes_by_instance(got.files) == HELD["ct"]
    assert chain.metric("agent", name, outcome.format("used")) == used + 1


def test_getscu_of_a_dcmtk_written_series(
    chain: DicomChain, orthanc_module: Orthanc, loaded: SampleSeries, tmp_path: Path
) -> None:
    keys = {"StudyInstanceUID": loaded.study_instance_uid}
    got = dcmtk.getscu(chain.node, tmp_path / "relay", "STUDY", keys, extra_args=["+B"],
                       timeout=TIMEOUT)  # fmt: skip
    want = dcmtk.getscu(orthanc_module.node, tmp_path / "direct", "STUDY", keys,
                        extra_args=["+B"], timeout=TIMEOUT)  # fmt: skip
    assert len(got.files) == 5
    assert sorted(map(dataset_bytes, got.files)) == sorted(map(dataset_bytes, want.files))


@pytest.fixture(scope="module", params=["jpegls", "htj2k", "jpegxl"])
def codec_chain(
    request: pytest.FixtureRequest,
    orthanc_module: Orthanc,
    loaded: SampleSeries,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[DicomChain]:
    """The chain with the agent sending every instance it can in one pixel codec (issue 14)."""
    c = DicomChain(
        tmp_path_factory.mktemp("codec-chain"),
        orthanc_module.dicom_port,
        pacs_ae=orthanc_module.ae_title,
        ns=orthanc_module.ns,
        pacs_extra=f", pixel_codecs: {request.param}",
    )
    with running_dicom_chain(c):
        yield c


@pytest.mark.parametrize("study", ["ct", "mr", "dcmtk"])
def test_getscu_with_encoded_pixels_receives_orthancs_bytes(
    codec_chain: DicomChain,
    orthanc_module: Orthanc,
    loaded: SampleSeries,
    tmp_path: Path,
    study: str,
) -> None:
    uid = {"ct": CT_STUDY, "mr": MR_STUDY, "dcmtk": loaded.study_instance_uid}[study]
    keys = {"StudyInstanceUID": uid}
    before = codec_chain.codec_counts()
    got = dcmtk.getscu(codec_chain.node, tmp_path / "relay", "STUDY", keys, extra_args=["+B"],
                       timeout=TIMEOUT)  # fmt: skip
    want = dcmtk.getscu(orthanc_module.node, tmp_path / "direct", "STUDY", keys,
                        extra_args=["+B"], timeout=TIMEOUT)  # fmt: skip
    assert got.status == "Success"
    assert len(got.files) == len(want.files) > 0
    assert sorted(map(dataset_bytes, got.files)) == sorted(map(dataset_bytes, want.files))
    if study in HELD:
        assert bytes_by_instance(got.files) == HELD[study]
    # Our studies' pixels did travel encoded; the harness's 64x64 series (8 KiB instances,
    # below what is worth a codestream) went as zstd.
    codec = codec_chain.pacs_extra.rsplit(" ", 1)[-1]
    sent = counts_after(codec_chain, before, len(got.files))
    assert sent == {codec if study in HELD else "zstd": len(got.files)}


def test_movescu_delivers_to_a_storescp_destination(
    chain: DicomChain, orthanc_module: Orthanc, scp_port: int, tmp_path: Path
) -> None:
    keys = {"StudyInstanceUID": CT_STUDY}
    with dcmtk.storescp(tmp_path / "dest", ns=orthanc_module.ns, port=scp_port,
                        ae_title=MOVE_DESTINATION, extra_args=["+B"]) as scp:  # fmt: skip
        result = dcmtk.movescu(chain.node, MOVE_DESTINATION, "STUDY", keys, timeout=TIMEOUT)
        files = scp.wait_for_files(len(CT), timeout=30)
    want = dcmtk.getscu(orthanc_module.node, tmp_path / "direct", "STUDY", keys,
                        extra_args=["+B"], timeout=TIMEOUT)  # fmt: skip
    assert result.ok and result.status == "Success"
    assert sorted(map(dataset_bytes, files)) == sorted(map(dataset_bytes, want.files))
    assert bytes_by_instance(files) == HELD["ct"]  # what Orthanc holds, byte for byte


def test_movescu_to_an_unknown_destination_is_a801(chain: DicomChain) -> None:
    result = dcmtk.movescu(chain.node, "NOSUCHAE", "STUDY", {"StudyInstanceUID": CT_STUDY},
                           timeout=TIMEOUT, check=False)  # fmt: skip
    assert not result.ok
    assert "MoveDestinationUnknown" in (result.status or "") or "a801" in result.output.lower()


def test_retrieve_by_move_at_the_agent(
    orthanc_module: Orthanc, loaded: SampleSeries, tmp_path: Path
) -> None:
    """`pacs.retrieve: move`: Orthanc C-MOVEs to the agent's own storage SCP, which Orthanc
    knows by AE title and address; the viewer still gets Orthanc's bytes by C-GET."""
    ns = orthanc_module.ns
    c = DicomChain(
        tmp_path / "chain",
        orthanc_module.dicom_port,
        pacs_ae=orthanc_module.ae_title,
        ns=ns,
        retrieve="move",
        move_ae="RELAYAGENT",
    )
    keys = {"StudyInstanceUID": MR_STUDY}
    with running_dicom_chain(c):
        # The agent's C-MOVE receiver took port 0: Orthanc learns where it is now.
        orthanc_module.add_modality("RELAYAGENT", "127.0.0.1", c.move_port())
        try:
            got = dcmtk.getscu(c.node, tmp_path / "relay", "STUDY", keys, extra_args=["+B"],
                               timeout=TIMEOUT)  # fmt: skip
            agent_log = c.procs["agent"].output()
            _, metrics = c.http_get(c.ports["agent_metrics"], "/metrics")
        finally:
            orthanc_module.remove_modality("RELAYAGENT")
    want = dcmtk.getscu(orthanc_module.node, tmp_path / "direct", "STUDY", keys,
                        extra_args=["+B"], timeout=TIMEOUT)  # fmt: skip
    assert got.status == "Success" and got.suboperations.get("Completed") == len(MR)
    assert sorted(map(dataset_bytes, got.files)) == sorted(map(dataset_bytes, want.files))
    assert '"op":"move"' in agent_log.replace(" ", "")
    # Orthanc's C-STOREs all belonged to the C-MOVE: the receiver's refusals are exported
    assert 'relay_pacs_move_receiver_refused_total{kind="store"} 0.0' in metrics


def _read_back(orthanc: Orthanc, study_uid: str, out: Path) -> list[bytes]:
    back = dcmtk.getscu(orthanc.node, out, "STUDY", {"StudyInstanceUID": study_uid},
                        extra_args=["+B"], timeout=TIMEOUT)  # fmt: skip
    return sorted(map(dataset_bytes, back.files))


def _delete_instance(orthanc: Orthanc, sop_instance: str) -> None:
    for found in orthanc.rest("POST", "/tools/lookup", sop_instance):
        if found["Type"] == "Instance":
            orthanc.rest("DELETE", f"/instances/{found['ID']}")


def test_storescu_upload_through_the_relay_lands_in_orthanc(
    chain: DicomChain, orthanc_module: Orthanc, tmp_path: Path
) -> None:
    """Orthanc (and storescu) may rewrite what they store; the relay adds nothing to that:
    the instance read back equals the one read back after a direct upload."""
    spec = samples.StudySpec(patient_name="UPLOAD^VIA^RELAY", patient_id="RELAYUP02")
    inst = samples.make_study(1, spec=spec, rows=64, cols=64, seed=63)[0]
    study = str(rawds.decode_dataset(inst.data, EXPLICIT).StudyInstanceUID)
    path = tmp_path / "up.dcm"
    path.write_bytes(inst.file_bytes())

    dcmtk.storescu(orthanc_module.node, [path], timeout=TIMEOUT)
    direct = _read_back(orthanc_module, study, tmp_path / "direct")
    _delete_instance(orthanc_module, inst.sop_instance)
    assert inst.sop_instance not in orthanc_module.instances()

    result = dcmtk.storescu(chain.node, [path], timeout=TIMEOUT)
    assert result.ok and result.status == "Success"
    assert inst.sop_instance in orthanc_module.instances()
    relayed = _read_back(orthanc_module, study, tmp_path / "relayed")
    assert len(relayed) == 1 and relayed == direct
    assert rawds.decode_dataset(relayed[0], EXPLICIT).PatientID == "RELAYUP02"
