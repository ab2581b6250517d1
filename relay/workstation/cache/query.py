"""C-FIND answered from the cache's index, for when the link is down.

Records are built per level from the index (study attributes came from the PACS's own
C-FIND when the study was cached); matching follows PS3.4 C.2.2.2 closely enough for a
viewer's worklist: single values, UID lists, `*`/`?` wildcards, date and time ranges.
A key the index does not hold matches only when it is empty (universal matching).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Mapping

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from relay.workstation.cache.store import CachedStudy

__all__ = ["SERIES_KEYS", "STUDY_KEYS", "dicom_text", "find_matches", "matches"]

# What the fetcher asks the PACS for at the study level, kept in the (private) index.
STUDY_KEYS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "AccessionNumber", "StudyDescription", "ModalitiesInStudy", "ReferringPhysicianName",
    "StudyID", "NumberOfStudyRelatedInstances",
)  # fmt: skip
SERIES_KEYS = ("Modality", "SeriesNumber", "SeriesDescription", "StationName")
_IGNORED = {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle"}
_RANGED = {"DA", "TM", "DT"}


def dicom_text(value: object) -> str:
    """A DICOM value as C-FIND text: multiple values joined with a backslash."""
    if value is None or value == "":
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


def _records(study: CachedStudy, level: str) -> Iterator[dict[str, str]]:
    base = {**study.attrs, "StudyInstanceUID": study.uid}
    base["NumberOfStudyRelatedInstances"] = str(len(study.instances))
    if level in ("PATIENT", "STUDY"):
        yield base
        return
    by_series: dict[str, list[str]] = {}
    classes: dict[str, str] = {}
    for inst in study.instances.values():
        by_series.setdefault(inst.series, []).append(inst.sop_instance)
        classes[inst.sop_instance] = inst.sop_class
    for series, sops in by_series.items():
        srec = {**base, **study.series_attrs.get(series, {}), "SeriesInstanceUID": series}
        srec["NumberOfSeriesRelatedInstances"] = str(len(sops))
        if level == "SERIES":
            yield srec
            continue
        for sop in sops:
            yield {**srec, "SOPInstanceUID": sop, "SOPClassUID": classes[sop]}


def matches(record: Mapping[str, str], keyword: str, wanted: str, vr: str) -> bool:
    """Whether one record value matches one query value."""
    if wanted in ("", "*"):
        return True
    if keyword not in record:
        return False
    value = record[keyword]
    if vr == "UI":
        return value in wanted.split("\\")
    if vr in _RANGED and "-" in wanted:
        low, _, high = wanted.partition("-")
        return (not low or value >= low) and (not high or value[: len(high)] <= high)
    if keyword == "ModalitiesInStudy":
        return bool(set(value.split("\\")) & set(wanted.split("\\")))
    if "*" in wanted or "?" in wanted:
        return fnmatch.fnmatchcase(value.upper(), wanted.upper())
    return value.strip().upper() == wanted.strip().upper()


def find_matches(studies: list[CachedStudy], identifier: Dataset) -> list[Dataset]:
    """The match datasets for a C-FIND identifier over the complete cached studies."""
    level = str(identifier.get("QueryRetrieveLevel", "STUDY")).strip().upper()
    keys = [(e.keyword, e.VR, dicom_text(e.value)) for e in identifier
            if e.keyword and e.keyword not in _IGNORED]  # fmt: skip
    out: list[Dataset] = []
    seen_patients: set[str] = set()
    for study in studies:
        if not study.complete:
            continue
        for record in _records(study, level):
            if not all(matches(record, k, v, vr) for k, vr, v in keys):
                continue
            if level == "PATIENT":
                pid = record.get("PatientID", "")
                if pid in seen_patients:
                    continue
                seen_patients.add(pid)
            ds = Dataset()
            ds.QueryRetrieveLevel = level
            for keyword, _vr, _v in keys:
                setattr(ds, keyword, record.get(keyword, ""))
            out.append(ds)
    return out
