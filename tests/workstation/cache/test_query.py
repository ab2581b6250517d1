"""C-FIND from the index and the worklist rules' relative dates."""

from __future__ import annotations

from datetime import date

import pytest
from pydicom.dataset import Dataset

from relay.workstation.cache.query import find_matches
from relay.workstation.cache.settings import resolve_dates
from relay.workstation.cache.store import CachedInstance, CachedStudy


def study(uid: str, name: str, day: str, complete: bool = True) -> CachedStudy:
    s = CachedStudy(uid=uid, attrs={"PatientName": name, "PatientID": name[:3],
                                    "StudyDate": day, "ModalitiesInStudy": "CT\\SR"},
                    complete=complete)  # fmt: skip
    s.instances = {f"{uid}.{n}": CachedInstance("1.2.3", f"{uid}.{n}", f"{uid}.9", "1.2", 1)
                   for n in range(3)}  # fmt: skip
    return s


def query(level: str, **keys: str | list[str]) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


STUDIES = [study("1.1", "DOE^JANE", "20240115"), study("1.2", "ROE^RICH", "20240301"),
           study("1.3", "DOE^JOHN", "20240101", complete=False)]  # fmt: skip


def test_study_level_matching() -> None:
    found = find_matches(STUDIES, query("STUDY", PatientName="DOE*", StudyInstanceUID=""))
    assert [m.StudyInstanceUID for m in found] == ["1.1"]  # 1.3 is not complete
    ranged = find_matches(STUDIES, query("STUDY", StudyDate="20240201-", StudyInstanceUID=""))
    assert [m.StudyInstanceUID for m in ranged] == ["1.2"]
    modality = find_matches(STUDIES, query("STUDY", ModalitiesInStudy="SR", PatientID=""))
    assert len(modality) == 2 and {m.PatientID for m in modality} == {"DOE", "ROE"}
    assert find_matches(STUDIES, query("STUDY", AccessionNumber="X1")) == []


def test_series_and_image_levels() -> None:
    series = find_matches(STUDIES, query("SERIES", StudyInstanceUID="1.1", SeriesInstanceUID="",
                                         NumberOfSeriesRelatedInstances=""))  # fmt: skip
    assert [(s.SeriesInstanceUID, s.NumberOfSeriesRelatedInstances) for s in series] == [
        ("1.1.9", 3)
    ]
    images = find_matches(STUDIES, query("IMAGE", StudyInstanceUID="1.1", SOPInstanceUID=""))
    assert sorted(i.SOPInstanceUID for i in images) == ["1.1.0", "1.1.1", "1.1.2"]


@pytest.mark.parametrize(
    ("text", "want"),
    [("today", "20260310"), ("yesterday", "20260309"), ("today-3d", "20260307"),
     ("-7d..today", "20260303-20260310"), ("20240101..today", "20240101-20260310")],
)  # fmt: skip
def test_relative_dates(text: str, want: str) -> None:
    assert resolve_dates(text, date(2026, 3, 10)) == want


def test_a_bad_date_is_refused() -> None:
    with pytest.raises(ValueError, match="not a date"):
        resolve_dates("next tuesday", date(2026, 3, 10))


def test_multiple_values_in_a_query() -> None:
    found = find_matches(STUDIES, query("STUDY", StudyInstanceUID=["1.2", "1.1"]))
    assert sorted(m.StudyInstanceUID for m in found) == ["1.1", "1.2"]
    mods = find_matches(STUDIES, query("STUDY", ModalitiesInStudy=["MR", "SR"], PatientID=""))
    assert len(mods) == 2
