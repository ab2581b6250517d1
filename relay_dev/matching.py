"""C-FIND attribute matching (PS3.4 C.2.2.2) over instance headers, for the embedded PACS.

Supports what viewers send: universal (empty) matching, single values, wildcards * and ? on
strings (case-insensitive for person names), lists of UIDs, and date/time ranges. Levels are
PATIENT, STUDY, SERIES and IMAGE; matching is relational (a key of any level may narrow the
result), which is what tolerant PACS do, and computed attributes (number of related
instances, modalities in study...) are filled in.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from pydicom.dataset import Dataset

LEVELS: Final = ("PATIENT", "STUDY", "SERIES", "IMAGE")
UNIQUE_KEY: Final = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
_SKIP: Final = {"QueryRetrieveLevel", "SpecificCharacterSet"}
_RANGE_VRS: Final = {"DA", "TM", "DT"}


@dataclass(frozen=True)
class Record:
    """One stored instance as the matcher sees it."""

    sop_class: str
    sop_instance: str
    transfer_syntax: str
    header: Dataset  # the instance without pixel data
    size: int = 0


class QueryError(ValueError):
    """An identifier the matcher cannot use (bad level, missing key)."""


def _values(record: Record, keyword: str) -> str:
    value = record.header.get(keyword, "")
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def _match_value(pattern: str, value: str, vr: str) -> bool:
    if vr == "UI":
        return value in {p.strip() for p in pattern.split("\\")}
    if vr in _RANGE_VRS and "-" in pattern:
        low, _, high = pattern.partition("-")
        v = value.strip()
        if not v:
            return False
        return (not low or v >= low.strip()) and (not high or v <= high.strip())
    if "\\" in pattern and vr not in ("PN",):
        return any(_match_value(p, value, vr) for p in pattern.split("\\"))
    if "*" in pattern or "?" in pattern:
        regex = fnmatch.translate(pattern)
        flags = re.IGNORECASE if vr == "PN" else 0
        return re.match(regex, value, flags) is not None
    if vr == "PN":
        return pattern.strip().upper() == value.strip().upper()
    return pattern.strip() == value.strip()


def matches(record: Record, identifier: Dataset) -> bool:
    for elem in identifier:
        keyword = elem.keyword
        if not keyword or keyword in _SKIP or elem.VR == "SQ":
            continue
        pattern = "" if elem.value is None else str(elem.value)
        if isinstance(elem.value, (list, tuple)) or type(elem.value).__name__ == "MultiValue":
            pattern = "\\".join(str(v) for v in elem.value)
        if not pattern or pattern == "*":
            continue
        if _COMPUTED.get(keyword):
            continue
        if not _match_value(pattern, _values(record, keyword), elem.VR):
            return False
    return True


def level_of(identifier: Dataset) -> str:
    level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
    if level not in LEVELS:
        raise QueryError(f"bad Query/Retrieve Level {level!r}")
    return level


def select(records: Iterable[Record], identifier: Dataset) -> list[Record]:
    """The instances that a retrieve identifier designates (C-GET, C-MOVE)."""
    level = level_of(identifier)
    key = UNIQUE_KEY[level]
    if not str(identifier.get(key, "")).strip():
        raise QueryError(f"{key} is required to retrieve at {level} level")
    return [r for r in records if matches(r, identifier)]


def find(records: Sequence[Record], identifier: Dataset) -> list[Dataset]:
    """C-FIND responses: one identifier per matching entity at the query level."""
    level = level_of(identifier)
    key = UNIQUE_KEY[level]
    groups: dict[str, list[Record]] = {}
    for r in records:
        if matches(r, identifier):
            groups.setdefault(_values(r, key), []).append(r)
    wanted = _pattern(identifier.get("ModalitiesInStudy"))
    out = []
    for members in groups.values():
        if wanted and level in ("PATIENT", "STUDY"):
            # Computed at the study: a study matches if any of its series has one of them.
            present = {_values(r, "Modality") for r in members}
            if not present & set(wanted.split("\\")):
                continue
        out.append(_response(identifier, level, members, records))
    return out


def _pattern(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)  # type: ignore[attr-defined]
    return str(value)


_COMPUTED: Final = {
    "NumberOfPatientRelatedStudies": True,
    "NumberOfPatientRelatedSeries": True,
    "NumberOfPatientRelatedInstances": True,
    "NumberOfStudyRelatedSeries": True,
    "NumberOfStudyRelatedInstances": True,
    "NumberOfSeriesRelatedInstances": True,
    "ModalitiesInStudy": True,
    "SOPClassesInStudy": True,
    "AvailableTransferSyntaxUID": True,
    "RetrieveAETitle": True,
    "InstanceAvailability": True,
}


def _response(
    identifier: Dataset, level: str, members: list[Record], everything: Sequence[Record]
) -> Dataset:
    first = members[0]
    rsp = Dataset()
    if "SpecificCharacterSet" in first.header:
        rsp.SpecificCharacterSet = first.header.SpecificCharacterSet
    for elem in identifier:
        keyword = elem.keyword
        if not keyword or keyword in ("SpecificCharacterSet",):
            continue
        if keyword == "QueryRetrieveLevel":
            rsp.QueryRetrieveLevel = level
            continue
        if keyword in _COMPUTED:
            value = _computed(keyword, level, members, everything)
            if value is not None:
                setattr(rsp, keyword, value)
            else:
                rsp.add_new(elem.tag, elem.VR, None)
            continue
        if keyword in first.header and elem.VR != "SQ":
            rsp.add(first.header[keyword])
        else:
            rsp.add_new(elem.tag, elem.VR, None)
    return rsp


def _computed(
    keyword: str, level: str, members: list[Record], everything: Sequence[Record]
) -> object:
    def distinct(kw: str, rs: Iterable[Record]) -> list[str]:
        return sorted({_values(r, kw) for r in rs if _values(r, kw)})

    if keyword.endswith("RelatedInstances"):
        return len(members)
    if keyword.endswith("RelatedSeries"):
        return len(distinct("SeriesInstanceUID", members))
    if keyword == "NumberOfPatientRelatedStudies":
        return len(distinct("StudyInstanceUID", members))
    if keyword == "ModalitiesInStudy":
        return distinct("Modality", members)
    if keyword == "SOPClassesInStudy":
        return sorted({r.sop_class for r in members})
    if keyword == "AvailableTransferSyntaxUID" and level == "IMAGE":
        return members[0].transfer_syntax
    if keyword == "InstanceAvailability":
        return "ONLINE"
    return None
