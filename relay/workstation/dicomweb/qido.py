"""QIDO-RS query parameters -> one C-FIND identifier (sans-I/O; PS3.18 section 8.3.4).

A query becomes a study-root C-FIND at the level of the URL: the matching keys from the
parameters (attribute keywords or tags: `PatientName=DOE*`, `0020000D=1.2.3`), the
URL's own UIDs, and universal keys for the attributes to return (the level's defaults
from PS3.18 table 6.7.1-2, plus `includefield`). `limit` and `offset` are applied to
the matches here (C-FIND does not page). Fuzzy matching is off unless asked for; the
PACS's C-FIND has no fuzzy mode we can ask for, so `fuzzymatching=true` is answered
without it, with a `Warning: 299` header as PS3.18 says.

Every refusal is a `QueryError` naming the parameter (the HTTP layer answers 400).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from pydicom import config
from pydicom.datadict import dictionary_VM, dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from relay.dicom import rawds

__all__ = [
    "CUT_WARNING",
    "LEVEL_KEYS",
    "MAX_LIMIT",
    "MAX_OFFSET",
    "Query",
    "QueryError",
    "parse_query",
]

MAX_LIMIT: Final = 10_000  # matches in one answer (a larger or absent limit is cut to it)
# matches an `offset` may pass over: they are counted as the PACS sends them, not kept
MAX_OFFSET: Final = 1_000_000
MAX_ASKED: Final = 999_999_999  # the largest limit taken (and cut to MAX_LIMIT)
# PS3.18 8.3.4.4: the Warning of an answer the server's maximum cut (with its host)
CUT_WARNING: Final = ('"The number of results exceeded the maximum supported by the server. '
                      'Additional results can be requested."')  # fmt: skip
MAX_PARAMS: Final = 64
MAX_VALUE: Final = 1024  # characters in one parameter's value

STUDY_KEYS: Final = (
    "StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
    "ReferringPhysicianName", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyID", "StudyDescription", "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)  # fmt: skip
SERIES_KEYS: Final = (
    "Modality", "SeriesDescription", "SeriesNumber", "SeriesInstanceUID",
    "NumberOfSeriesRelatedInstances", "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime", "StudyInstanceUID",
)  # fmt: skip
INSTANCE_KEYS: Final = (
    "SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns", "BitsAllocated",
    "NumberOfFrames", "SeriesInstanceUID", "StudyInstanceUID",
)  # fmt: skip
LEVEL_KEYS: Final = {"STUDY": STUDY_KEYS, "SERIES": SERIES_KEYS, "IMAGE": INSTANCE_KEYS}
# `includefield=all`: C-FIND cannot ask for "everything", so these widen each level.
ALL_EXTRA: Final = {
    "STUDY": ("IssuerOfPatientID", "OtherPatientIDs", "InstitutionName", "StudyComments"),
    "SERIES": ("SeriesDate", "SeriesTime", "BodyPartExamined", "ProtocolName", "StationName",
               "Laterality", "InstitutionName"),
    "IMAGE": ("ImageType", "AcquisitionNumber", "ContentDate", "ContentTime",
              "PhotometricInterpretation", "SamplesPerPixel", "BitsStored", "PixelSpacing",
              "SliceThickness", "ImagePositionPatient", "ImageOrientationPatient",
              "WindowCenter", "WindowWidth"),
}  # fmt: skip
_TAG_RE: Final = re.compile(r"[0-9A-Fa-f]{8}")
_UID_RE: Final = re.compile(r"[0-9.]{1,64}")
_DATE_RE: Final = re.compile(r"(\d{8})?-?(\d{8})?", re.ASCII)
# VRs of bulk data: never a matching key nor a return key (a C-FIND has none)
_BULK_VRS: Final = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_INT_RANGES: Final = {
    "US": (0, 0xFFFF), "SS": (-0x8000, 0x7FFF), "UL": (0, 0xFFFFFFFF),
    "SL": (-0x80000000, 0x7FFFFFFF), "UV": (0, 2**64 - 1), "SV": (-(2**63), 2**63 - 1),
}  # fmt: skip
_BINARY_NUMBERS: Final = frozenset({*_INT_RANGES, "FL", "FD"})
_TM: Final = r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?"
_DT: Final = r"\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?"
# Text VRs with a fixed form (PS3.5 table 6.2-1): the form, and how a refusal names it.
# Dates, times and datetimes may be ranges (PS3.4 C.2.2.2.5); wildcards are for text.
_TEXT_FORMS: Final = {
    "DA": (re.compile(r"\d{8}|\d{8}-(\d{8})?|-\d{8}", re.ASCII),
           "a date YYYYMMDD or a range YYYYMMDD-YYYYMMDD"),
    "TM": (re.compile(rf"{_TM}|{_TM}-({_TM})?|-{_TM}", re.ASCII),
           "a time HHMMSS[.F] or a range"),
    "DT": (re.compile(rf"{_DT}|{_DT}-({_DT})?|-{_DT}", re.ASCII),
           "a datetime YYYYMMDDHHMMSS[.F][+ZZZZ] or a range"),
    "AS": (re.compile(r"\d{3}[DWMY]", re.ASCII), "an age such as 045Y"),
    "IS": (re.compile(r" *[+-]?\d{1,11} *", re.ASCII), "a whole number (IS)"),
    "DS": (re.compile(r" *[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)? *", re.ASCII),
           "a decimal number (DS)"),
}  # fmt: skip
# Characters a value may have at most, by VR (PS3.5 table 6.2-1; PN: per component
# group); dates, times and datetimes are bounded by their forms (ranges are longer).
_MAX_CHARS: Final = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "PN": 64, "IS": 12, "DS": 16,
                     "ST": 1024, "LT": 10240}  # fmt: skip
_SINGLE_VALUED: Final = frozenset({"ST", "LT", "UT", "UR"})  # a backslash is text in these
# CS: upper case letters, digits, space and underscore, and the wildcards * and ?
_CS_RE: Final = re.compile(r"[A-Z0-9 _*?]*")
MatchValue = str | int | float | None


class QueryError(ValueError):
    """A malformed query: `param` names the parameter (the answer is 400)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


@dataclass
class Query:
    level: str  # STUDY | SERIES | IMAGE
    identifier: Dataset
    limit: int = MAX_LIMIT
    offset: int = 0
    fuzzy: bool = False
    warnings: list[str] = field(default_factory=list)
    # the server's maximum is the limit (none asked, or more than MAX_LIMIT): an answer it
    # cuts says so (CUT_WARNING); one the client's own limit cuts does not (PS3.18 8.3.4.4)
    at_maximum: bool = True

    def page(self, matches: list[Dataset]) -> list[Dataset]:
        """What the answer holds of all the `matches` (DicomSource.find pages as they come)."""
        return matches[self.offset : self.offset + self.limit]


def _keyword(param: str) -> str:
    """An attribute keyword from a parameter name (a keyword or 8 hex digits) that names
    an attribute a C-FIND identifier can carry (no bulk data: its VR is not binary)."""
    if _TAG_RE.fullmatch(param):
        keyword = keyword_for_tag(Tag(int(param, 16)))
        if not keyword or tag_for_keyword(keyword) is None:  # repeating groups: no keyword
            raise QueryError(param, "unknown attribute tag")
    elif "." in param:
        raise QueryError(param, "sequence matching is not supported")
    elif tag_for_keyword(param) is None:
        raise QueryError(param, "unknown attribute keyword")
    else:
        keyword = param
    if _vrs(keyword) & _BULK_VRS:
        raise QueryError(param, "bulk data (a binary VR) cannot be queried or returned")
    return str(keyword)


def _vrs(keyword: str) -> set[str]:
    """The attribute's possible VRs ("US or SS" is two)."""
    return set(dictionary_VR(keyword).split(" or "))


def _int(param: str, value: str, hi: int) -> int:
    if not (value.isascii() and value.isdigit()) or len(value) > 9:
        raise QueryError(param, f"expected a whole number, got {value[:40]!r}")
    n = int(value)
    if n > hi:
        raise QueryError(param, f"must be at most {hi}")
    return n


def _check_value(param: str, keyword: str, value: str) -> MatchValue:
    """The matching value for the identifier, checked against the attribute's VR as
    PS3.4 C.2.2.2 matches it (PS3.18 8.3.4.1): UID lists; date, time and datetime ranges;
    wildcards only in text VRs; numbers for the numeric VRs. Empty: universal matching."""
    if "\x00" in value or any(ord(c) < 0x20 for c in value):
        raise QueryError(param, "control characters are not allowed")
    vrs = _vrs(keyword)
    vr = next(iter(vrs))
    if vr == "SQ":
        raise QueryError(param, "sequence matching is not supported")
    if vr == "AT":
        raise QueryError(param, "matching on an attribute tag value is not supported")
    if vr == "UI":
        uids = [u.strip() for u in value.replace("\\", ",").split(",")]
        for uid in uids:
            if not _UID_RE.fullmatch(uid):
                raise QueryError(param, "expected UIDs (digits and dots) separated by commas")
        return "\\".join(uids)
    if vrs <= _BINARY_NUMBERS:
        return _binary_number(param, vrs, value)
    if vr == "CS" and "," in value:
        value = _code_list(param, keyword, value)
    if vr == "DA" and value in ("", "*"):
        return value
    pattern = _TEXT_FORMS.get(vr)
    if pattern is not None and value and not pattern[0].fullmatch(value):
        raise QueryError(param, f"expected {pattern[1]}, got {value[:40]!r}")
    _check_text(param, vr, value)
    return value


def _code_list(param: str, keyword: str, value: str) -> str:
    """A comma list of code strings (`ModalitiesInStudy=CT,MR`, as dicomweb-client and
    OHIF send a selection) as the C-FIND's multiple values (`CT\\MR`). PS3.18 8.3.4.1
    defines comma lists for UID List Matching only, but a code string holds no comma, so
    the list cannot be read otherwise (Orthanc's QIDO-RS takes it too); only attributes
    of several values (VM 1-n) take one: a VM 1 attribute has nothing to match it against.
    How the PACS matches several values (any, or all: PS3.4 C.2.2.2.8) is its own."""
    if dictionary_VM(keyword) == "1":
        raise QueryError(param, "one value only: a comma list is for attributes of "
                                "several values (such as ModalitiesInStudy)")  # fmt: skip
    items = [item.strip() for item in value.split(",")]
    if not all(items):
        raise QueryError(param, "an empty value in a comma list")
    return "\\".join(items)


def _check_text(param: str, vr: str, value: str) -> None:
    """Each value of a text VR within its VR's length and, for CS and PN, its form: a
    value the PACS's C-FIND would refuse or never match is the client's 400 (pydicom
    sent it on, and logged it: `Invalid value for VR CS: '...'`)."""
    values = [value] if vr in _SINGLE_VALUED else value.split("\\")
    for one in values:
        if vr == "CS" and not _CS_RE.fullmatch(one):
            raise QueryError(param, "a code string is upper case letters, digits, space and _")
        groups = one.split("=") if vr == "PN" else [one]
        if len(groups) > 3:
            raise QueryError(param, "a person name has at most 3 component groups")
        for group in groups:
            if vr == "PN" and group.count("^") > 4:
                raise QueryError(param, "a person name has at most 5 components")
            # `*` matches any run, so it is not counted: OHIF asks for `*{text}*`, and
            # a whole 16-character accession number so asked is 18 characters
            if len(group) - group.count("*") > _MAX_CHARS.get(vr, MAX_VALUE):
                raise QueryError(param, f"longer than its VR ({vr}) allows: "
                                        f"{_MAX_CHARS[vr]} characters")  # fmt: skip


def _binary_number(param: str, vrs: set[str], value: str) -> int | float | None:
    """A US/SS/UL/SL/UV/SV (whole) or FL/FD value, within its VR's range; None for ""."""
    if not value:
        return None
    if vrs <= {"FL", "FD"}:
        try:
            if not value.isascii():  # float() reads other scripts' digits too
                raise ValueError(value)
            number = float(value)
        except ValueError:
            raise QueryError(param, f"expected a number, got {value[:40]!r}") from None
        if not math.isfinite(number):
            raise QueryError(param, "expected a finite number")
        return number
    if not re.fullmatch(r"[+-]?\d{1,20}", value, re.ASCII):
        raise QueryError(param, f"expected a whole number, got {value[:40]!r}")
    whole = int(value)
    lo = min(_INT_RANGES[v][0] for v in vrs)
    hi = max(_INT_RANGES[v][1] for v in vrs)
    if not lo <= whole <= hi:
        raise QueryError(param, f"must be between {lo} and {hi}")
    return whole


def _field_keywords(param: str, value: str) -> list[str]:
    out = []
    for raw in value.split(","):
        item = raw.strip()
        if item:
            out.append(_keyword(item) if item != "all" else "all")
    return out


def parse_query(
    level: str,
    params: Iterable[tuple[str, str]],
    uids: Mapping[str, str],
) -> Query:
    """The C-FIND for a QIDO-RS request at `level`, with `uids` from the URL path."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    query = Query(level, identifier, limit=MAX_LIMIT)
    wanted: list[str] = list(LEVEL_KEYS[level])
    if level != "STUDY" and "StudyInstanceUID" not in uids:
        wanted += STUDY_KEYS  # /series and /instances: say which study
    if level == "IMAGE" and "SeriesInstanceUID" not in uids:
        wanted += SERIES_KEYS
    matching: dict[str, MatchValue] = {}
    for seen, (param, value) in enumerate(params, 1):
        if seen > MAX_PARAMS:
            raise QueryError(param, f"more than {MAX_PARAMS} query parameters")
        if len(value) > MAX_VALUE:
            raise QueryError(param, f"value longer than {MAX_VALUE} characters")
        if param == "limit":
            asked = _int(param, value, MAX_ASKED)
            query.limit, query.at_maximum = min(asked, MAX_LIMIT), asked > MAX_LIMIT
        elif param == "offset":
            query.offset = _int(param, value, MAX_OFFSET)
        elif param == "fuzzymatching":
            if value not in ("true", "false"):
                raise QueryError(param, "expected true or false")
            query.fuzzy = value == "true"
            if query.fuzzy:
                query.warnings.append('299 relay "fuzzymatching not supported; exact matching"')
        elif param == "includefield":
            for kw in _field_keywords(param, value):
                if kw == "all":
                    wanted += [*STUDY_KEYS, *ALL_EXTRA["STUDY"]]
                    wanted += [*SERIES_KEYS, *ALL_EXTRA["SERIES"]] if level != "STUDY" else []
                    wanted += [*INSTANCE_KEYS, *ALL_EXTRA["IMAGE"]] if level == "IMAGE" else []
                else:
                    wanted.append(kw)
        elif param == "orderby":
            raise QueryError(param, "ordering is not supported")
        else:
            keyword = _keyword(param)
            if keyword in matching:
                raise QueryError(param, "given twice")
            matching[keyword] = _check_value(param, keyword, value)
    for keyword, value in uids.items():
        if keyword in matching and matching[keyword] != value:
            raise QueryError(keyword, "contradicts the UID in the URL")
        matching[keyword] = value
    for keyword in dict.fromkeys(wanted):
        if keyword not in matching and keyword != "QueryRetrieveLevel":
            setattr(identifier, keyword, None if dictionary_VR(keyword) != "SQ" else [])
    for keyword, match in matching.items():
        vr = dictionary_VR(keyword)
        if _vrs(keyword) == {"US", "SS"}:
            vr = "SS" if isinstance(match, int) and match < 0 else "US"
        # checked above, and wildcards (`CT*`) are not the VR's form: pydicom's own check
        # would log the value (a query's value may name a patient)
        identifier.add(DataElement(Tag(keyword), vr, match,
                                   validation_mode=config.IGNORE))  # fmt: skip
    _check_encodes(identifier)
    return query


def _check_encodes(identifier: Dataset) -> None:
    """A backstop behind the VR checks: an identifier that cannot be encoded is the
    client's bad query (400), not a failure later on the way to the agent."""
    try:
        rawds.encode_dataset(identifier)
    except Exception as exc:
        raise QueryError("query", f"cannot be sent as a C-FIND identifier "
                                  f"({type(exc).__name__})") from None  # fmt: skip
