"""The embedded PACS answers like a PACS: C-ECHO, C-FIND at every level, C-GET, C-MOVE, C-STORE."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import build_context, build_role, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from relay.dicom import rawds
from relay.dicom.contexts import MODELS
from relay_dev import samples
from relay_dev.pacs import DirectoryStore, EmbeddedPacs, MemoryStore, SyntheticStore
from tests.dicom.helpers import EXPLICIT, capturing_scp, query, scu

CT = samples.make_study(4, rows=32, cols=32)
MR = samples.make_study(3, modality="MR", rows=16, cols=16)
CT_STUDY = str(rawds.decode_dataset(CT[0].data, EXPLICIT).StudyInstanceUID)
MR_STUDY = str(rawds.decode_dataset(MR[0].data, EXPLICIT).StudyInstanceUID)


@pytest.fixture
def pacs() -> Iterator[EmbeddedPacs]:
    with EmbeddedPacs(MemoryStore(CT + MR)) as p:
        yield p


def find(pacs: EmbeddedPacs, root: str, ident: Dataset) -> tuple[list[Dataset], int]:
    model = MODELS[(root, "find")]
    assoc = scu().associate("127.0.0.1", pacs.port, contexts=[build_context(model)])
    assert assoc.is_established
    matches: list[Dataset] = []
    final = -1
    for status, match in assoc.send_c_find(ident, model):
        if status.Status in (0xFF00, 0xFF01):
            assert match is not None
            matches.append(match)
        else:
            final = int(status.Status)
    assoc.release()
    return matches, final


def test_echo(pacs: EmbeddedPacs) -> None:
    assoc = scu().associate("127.0.0.1", pacs.port, contexts=[build_context(Verification)])
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    assert pacs.events.echoes == 1


@pytest.mark.parametrize("root", ["patient", "study"])
def test_find_at_every_level(pacs: EmbeddedPacs, root: str) -> None:
    patients, final = find(
        pacs, root, query("PATIENT", PatientID="", PatientName="", NumberOfPatientRelatedStudies="")
    )
    assert final == 0
    assert sorted(str(m.PatientName) for m in patients) == ["DOE^JANE", "ROE^RICHARD"]
    assert {int(m.NumberOfPatientRelatedStudies) for m in patients} == {1}
    studies, _ = find(
        pacs,
        root,
        query(
            "STUDY",
            PatientID="RELAY0001",
            StudyInstanceUID="",
            ModalitiesInStudy="",
            NumberOfStudyRelatedInstances="",
        ),
    )
    assert [str(m.StudyInstanceUID) for m in studies] == [CT_STUDY]
    assert (
        studies[0].ModalitiesInStudy == "CT" and int(studies[0].NumberOfStudyRelatedInstances) == 4
    )
    series, _ = find(
        pacs,
        root,
        query(
            "SERIES",
            StudyInstanceUID=CT_STUDY,
            SeriesInstanceUID="",
            Modality="",
            NumberOfSeriesRelatedInstances="",
        ),
    )
    assert len(series) == 1 and int(series[0].NumberOfSeriesRelatedInstances) == 4
    images, _ = find(
        pacs,
        root,
        query(
            "IMAGE",
            StudyInstanceUID=CT_STUDY,
            SeriesInstanceUID=str(series[0].SeriesInstanceUID),
            SOPInstanceUID="",
            InstanceNumber="",
            AvailableTransferSyntaxUID="",
        ),
    )
    assert sorted(str(m.SOPInstanceUID) for m in images) == sorted(i.sop_instance for i in CT)
    assert {str(m.AvailableTransferSyntaxUID) for m in images} == {EXPLICIT}


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"PatientName": "doe*"}, {CT_STUDY}),
        ({"PatientName": "*RICH*"}, {MR_STUDY}),
        ({"StudyDate": "20240101-20240131"}, {CT_STUDY}),
        ({"StudyDate": "20240201-"}, {MR_STUDY}),
        ({"StudyInstanceUID": f"{CT_STUDY}\\{MR_STUDY}"}, {CT_STUDY, MR_STUDY}),
        ({"ModalitiesInStudy": "MR"}, {MR_STUDY}),
        ({"ModalitiesInStudy": "CT\\MR"}, {CT_STUDY, MR_STUDY}),
        ({"AccessionNumber": "ACC000?"}, {CT_STUDY, MR_STUDY}),
        ({"PatientID": "NOBODY"}, set()),
    ],
)
def test_find_matching(pacs: EmbeddedPacs, keys: dict[str, str], expected: set[str]) -> None:
    matches, final = find(pacs, "study", query("STUDY", **{"StudyInstanceUID": "", **keys}))
    assert final == 0
    assert {str(m.StudyInstanceUID) for m in matches} == expected


def test_find_with_a_bad_level_fails(pacs: EmbeddedPacs) -> None:
    _, final = find(pacs, "study", query("WARD", StudyInstanceUID=""))
    assert 0xC000 <= final <= 0xCFFF


def _get(
    pacs: EmbeddedPacs, ident: Dataset, root: str = "study"
) -> tuple[dict[str, bytes], list[Dataset]]:
    model = MODELS[(root, "get")]
    got: dict[str, bytes] = {}

    def on_store(event: Any) -> int:
        got[str(event.request.AffectedSOPInstanceUID)] = event.request.DataSet.getvalue()
        return 0

    classes = [samples.CT_IMAGE_STORAGE, samples.MR_IMAGE_STORAGE]
    assoc = scu().associate(
        "127.0.0.1",
        pacs.port,
        contexts=[build_context(model), *(build_context(c, [EXPLICIT]) for c in classes)],
        ext_neg=[build_role(c, scp_role=True) for c in classes],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    statuses = [st for st, _ in assoc.send_c_get(ident, model)]
    assoc.release()
    return got, statuses


def test_get_sends_the_stored_bytes_with_counts(pacs: EmbeddedPacs) -> None:
    got, statuses = _get(pacs, query("STUDY", StudyInstanceUID=CT_STUDY))
    assert got == {i.sop_instance: i.data for i in CT}
    assert statuses[-1].Status == 0 and statuses[-1].NumberOfCompletedSuboperations == 4
    pending = [s for s in statuses if s.Status == 0xFF00]
    assert [int(s.NumberOfRemainingSuboperations) for s in pending] == [3, 2, 1, 0]


def test_get_by_patient_and_by_image(pacs: EmbeddedPacs) -> None:
    got, _ = _get(pacs, query("PATIENT", PatientID="RELAY0002"), root="patient")
    assert set(got) == {i.sop_instance for i in MR}
    one = MR[1]
    ds = rawds.decode_dataset(one.data, EXPLICIT)
    got, _ = _get(
        pacs,
        query(
            "IMAGE",
            StudyInstanceUID=MR_STUDY,
            SeriesInstanceUID=str(ds.SeriesInstanceUID),
            SOPInstanceUID=one.sop_instance,
        ),
    )
    assert got == {one.sop_instance: one.data}


def test_get_of_an_unknown_study_is_empty(pacs: EmbeddedPacs) -> None:
    got, statuses = _get(pacs, query("STUDY", StudyInstanceUID="1.2.3.4.5"))
    assert got == {} and statuses[-1].Status == 0


def test_move_to_a_known_destination_and_an_unknown_one(pacs: EmbeddedPacs) -> None:
    model = MODELS[("study", "move")]
    with capturing_scp("DEST") as (captured, port):
        pacs.destinations["DEST"] = ("127.0.0.1", port)
        assoc = scu().associate("127.0.0.1", pacs.port, contexts=[build_context(model)])
        statuses = [
            st
            for st, _ in assoc.send_c_move(query("STUDY", StudyInstanceUID=MR_STUDY), "DEST", model)
        ]
        unknown = [
            st
            for st, _ in assoc.send_c_move(
                query("STUDY", StudyInstanceUID=MR_STUDY), "NOWHERE", model
            )
        ]
        assoc.release()
    assert statuses[-1].Status == 0
    assert {uid: data for uid, (_, data) in captured.by_uid().items()} == {
        i.sop_instance: i.data for i in MR
    }
    assert unknown[-1].Status == 0xA801


def test_store_accepts_good_and_refuses_malformed(pacs: EmbeddedPacs) -> None:
    new = samples.make_study(1, rows=16, cols=16, seed=9)[0]
    bad = rawds.EncodedDataset(new.sop_class, "1.2.3.999", EXPLICIT, new.data[:-10])
    good = rawds.EncodedDataset(new.sop_class, new.sop_instance, EXPLICIT, new.data)
    assoc = scu().associate(
        "127.0.0.1", pacs.port, contexts=[build_context(new.sop_class, [EXPLICIT])]
    )
    assert assoc.send_c_store(good).Status == 0
    assert assoc.send_c_store(bad).Status == 0xC000
    assoc.release()
    assert pacs.instance_bytes(new.sop_instance) == new.data
    assert not pacs.has("1.2.3.999")
    assert pacs.events.store_failures == 1


def test_cancel_stops_a_get(tmp_path: Path) -> None:
    study = samples.make_study(20, rows=16, cols=16, seed=2)
    uid = str(rawds.decode_dataset(study[0].data, EXPLICIT).StudyInstanceUID)
    with EmbeddedPacs(MemoryStore(study), send_delay=0.05) as pacs:
        model = MODELS[("study", "get")]
        seen = threading.Event()

        def on_store(event: Any) -> int:
            seen.set()
            return 0

        assoc = scu().associate(
            "127.0.0.1",
            pacs.port,
            contexts=[build_context(model), build_context(samples.CT_IMAGE_STORAGE, [EXPLICIT])],
            ext_neg=[build_role(samples.CT_IMAGE_STORAGE, scp_role=True)],
            evt_handlers=[(evt.EVT_C_STORE, on_store)],
        )
        responses = assoc.send_c_get(query("STUDY", StudyInstanceUID=uid), model, msg_id=7)
        statuses = []
        for st, _ in responses:
            statuses.append(st)
            if len(statuses) == 2:
                assoc.send_c_cancel(7, query_model=model)
        assoc.release()
    assert statuses[-1].Status == 0xFE00
    assert pacs.events.cancels == 1
    assert pacs.events.instances_sent < 20


def test_directory_store_keeps_files_and_reloads(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "pacs", CT[:2])
    assert len(list((tmp_path / "pacs").glob("*.dcm"))) == 2
    again = DirectoryStore(tmp_path / "pacs")
    records = {r.sop_instance: r for r in again.records()}
    assert set(records) == {CT[0].sop_instance, CT[1].sop_instance}
    assert again.read(records[CT[1].sop_instance]) == CT[1].data
    del store


def test_synthetic_store_serves_generated_instances() -> None:
    study = samples.SyntheticStudy(3, rows=16, cols=16)
    with EmbeddedPacs(SyntheticStore(study)) as pacs:
        got, statuses = _get(pacs, query("STUDY", StudyInstanceUID=study.spec.study_uid))
    assert statuses[-1].Status == 0
    assert got == {study.instance(i).sop_instance: study.instance(i).data for i in range(3)}
