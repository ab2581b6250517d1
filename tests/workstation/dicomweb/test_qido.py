"""QIDO-RS parameters -> C-FIND identifiers: matching keys, return keys, paging, refusals."""

from __future__ import annotations

import logging
import warnings

import pytest
from pydicom.dataset import Dataset

from relay.dicom import rawds
from relay.workstation.dicomweb.qido import MAX_LIMIT, MAX_OFFSET, QueryError, parse_query


def test_matching_parameters_by_keyword_and_by_tag() -> None:
    q = parse_query(
        "STUDY",
        [("PatientName", "DOE*"), ("StudyDate", "20240101-20240131"),
         ("00080061", "CT"), ("00100020", "PID1")],
        {},
    )  # fmt: skip
    ds = q.identifier
    assert ds.QueryRetrieveLevel == "STUDY"
    assert str(ds.PatientName) == "DOE*"
    assert ds.StudyDate == "20240101-20240131"
    assert ds.ModalitiesInStudy == "CT"
    assert ds.PatientID == "PID1"
    # the default return keys are asked for, empty (universal matching)
    assert "StudyInstanceUID" in ds and not ds.StudyInstanceUID
    assert "NumberOfStudyRelatedInstances" in ds
    assert not q.fuzzy and q.offset == 0 and q.limit == MAX_LIMIT
    rawds.encode_dataset(ds)  # encodes as a real identifier


def test_uids_from_the_path_and_uid_lists() -> None:
    q = parse_query("IMAGE", [("SOPInstanceUID", "1.2.3,1.2.4")],
                    {"StudyInstanceUID": "1.2", "SeriesInstanceUID": "1.2.9"})  # fmt: skip
    assert q.identifier.StudyInstanceUID == "1.2"
    assert q.identifier.SeriesInstanceUID == "1.2.9"
    assert list(q.identifier.SOPInstanceUID) == ["1.2.3", "1.2.4"]
    # instance level under a series: series and study attributes are not added
    assert "Modality" not in q.identifier and "PatientName" not in q.identifier


def test_top_level_instances_say_which_study_and_series() -> None:
    q = parse_query("IMAGE", [], {})
    assert "PatientName" in q.identifier and "Modality" in q.identifier


def test_includefield_adds_keys_and_all_widens() -> None:
    q = parse_query("STUDY", [("includefield", "00081030,IssuerOfPatientID")], {})
    assert "IssuerOfPatientID" in q.identifier
    q = parse_query("SERIES", [("includefield", "all")], {"StudyInstanceUID": "1.2"})
    assert "BodyPartExamined" in q.identifier and "PatientName" in q.identifier


def test_limit_and_offset_are_the_page_and_the_server_maximum_caps_the_limit() -> None:
    q = parse_query("STUDY", [("limit", "2"), ("offset", "1")], {})
    assert (q.limit, q.offset, q.at_maximum) == (2, 1, False)
    matches = [Dataset() for _ in range(5)]
    assert q.page(matches) == matches[1:3]
    # no limit, or one above the maximum: the maximum, and a cut there is to be told
    assert parse_query("STUDY", [], {}).at_maximum
    q = parse_query("STUDY", [("limit", str(MAX_LIMIT + 1))], {})
    assert (q.limit, q.at_maximum) == (MAX_LIMIT, True)
    # past the maximum with offset: what a client told of the cut asks next
    q = parse_query("STUDY", [("offset", str(MAX_LIMIT))], {})
    assert (q.offset, q.limit) == (MAX_LIMIT, MAX_LIMIT)
    assert parse_query("STUDY", [("offset", str(MAX_OFFSET))], {}).offset == MAX_OFFSET


def test_fuzzymatching_true_warns_that_matching_is_exact() -> None:
    assert parse_query("STUDY", [("fuzzymatching", "false")], {}).warnings == []
    q = parse_query("STUDY", [("fuzzymatching", "true")], {})
    assert q.fuzzy and q.warnings and q.warnings[0].startswith("299")


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ([("NoSuchKeyword", "x")], "NoSuchKeyword"),
        ([("FFFF0001", "x")], "FFFF0001"),
        ([("limit", "ten")], "limit"),
        ([("offset", str(MAX_OFFSET + 1))], "offset"),
        ([("limit", "1" * 10)], "limit"),
        ([("offset", "-1")], "offset"),
        ([("fuzzymatching", "maybe")], "fuzzymatching"),
        ([("StudyDate", "2024")], "StudyDate"),
        ([("StudyInstanceUID", "1.2.abc")], "StudyInstanceUID"),
        ([("includefield", "Bogus")], "Bogus"),
        ([("PatientName", "A"), ("PatientName", "B")], "PatientName"),
        ([("PatientName", "x" * 2000)], "PatientName"),
        ([("PatientName", "a\nb")], "PatientName"),
        ([("orderby", "PatientName")], "orderby"),
        ([("ReferencedStudySequence.StudyInstanceUID", "1")], "ReferencedStudySequence"),
        ([("limit", "1")] * 100, "limit"),
    ],
)
def test_malformed_queries_name_the_parameter(params: list[tuple[str, str]], named: str) -> None:
    with pytest.raises(QueryError) as info:
        parse_query("STUDY", params, {})
    assert named in info.value.param


def test_a_parameter_contradicting_the_path_is_refused() -> None:
    with pytest.raises(QueryError) as info:
        parse_query("SERIES", [("StudyInstanceUID", "1.3")], {"StudyInstanceUID": "1.2"})
    assert info.value.param == "StudyInstanceUID"


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ([("Rows", "abc")], "Rows"),
        ([("Rows", "70000")], "Rows"),
        ([("00280010", "abc")], "00280010"),
        ([("NumberOfFrames", "x")], "NumberOfFrames"),
        ([("SeriesNumber", "zz")], "SeriesNumber"),
        ([("SliceThickness", "thick")], "SliceThickness"),
        ([("StudyTime", "noon")], "StudyTime"),
        ([("AcquisitionDateTime", "2024-01")], "AcquisitionDateTime"),
        ([("PatientAge", "45")], "PatientAge"),
        ([("SmallestImagePixelValue", "-70000")], "SmallestImagePixelValue"),
        ([("ReferencedSeriesSequence", "x")], "ReferencedSeriesSequence"),
        ([("PixelData", "abc")], "PixelData"),
        ([("7FE00010", "abc")], "7FE00010"),
        ([("includefield", "PixelData")], "PixelData"),
        ([("60003000", "x")], "60003000"),
        ([("FrameIncrementPointer", "00181063")], "FrameIncrementPointer"),
    ],
)
def test_values_that_do_not_fit_their_vr_are_refused(
    params: list[tuple[str, str]], named: str
) -> None:
    """PS3.18 8.3.4.1: each matching value in its VR's form; no sequence or bulk data
    matching; no bulk data returned (else the identifier fails to encode later: 500)."""
    with pytest.raises(QueryError) as info:
        parse_query("IMAGE", params, {})
    assert named in info.value.param


def test_values_in_their_vr_form_make_an_identifier_that_encodes() -> None:
    q = parse_query(
        "IMAGE",
        [("Rows", "512"), ("SmallestImagePixelValue", "-5"), ("SeriesNumber", "3"),
         ("SliceThickness", "1.25"), ("StudyTime", "0800-1200"), ("PatientAge", "045Y"),
         ("AcquisitionDateTime", "20240101120000-"), ("StudyDate", "-20240131"),
         ("PatientName", "DO?E*"), ("Columns", ""), ("includefield", "ReferencedSeriesSequence")],
        {},
    )  # fmt: skip
    ds = q.identifier
    assert ds.Rows == 512 and ds.SmallestImagePixelValue == -5 and ds.Columns is None
    assert ds.StudyTime == "0800-1200" and ds.ReferencedSeriesSequence == []
    rawds.encode_dataset(ds)


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("PatientID", "A" * 65),  # LO: 64
        ("StudyDescription", "x" * 65),
        ("AccessionNumber", "A" * 17),  # SH: 16
        ("ModalitiesInStudy", "ct"),  # CS: upper case
        ("ModalitiesInStudy", "CT\\" + "A" * 17),  # each value within CS's 16
        ("PatientSex", "m"),
        ("PatientName", "A=B=C=D"),  # at most 3 component groups
        ("PatientName", "A^B^C^D^E^F"),  # at most 5 components
        ("PatientName", "X" * 65),  # 64 a component group
    ],
)
def test_text_values_beyond_their_vr_are_refused(param: str, value: str) -> None:
    """They were sent on to the PACS (which refuses them or never matches them), and
    pydicom logged the value."""
    with pytest.raises(QueryError) as info:
        parse_query("STUDY", [(param, value)], {})
    assert info.value.param == param


def test_wildcards_and_values_within_their_vr_log_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`CT*` is no code string (CS) by its form, but a C-FIND matches it (PS3.4
    C.2.2.2.4): it was sent, and pydicom logged `Invalid value for VR CS: 'CT*'` at
    WARNING, the value of a query in the log."""
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        q = parse_query(
            "STUDY",
            [("ModalitiesInStudy", "C*\\MR"), ("PatientSex", "?"), ("PatientName", "DOE^J*=A=B"),
             ("PatientID", "P" * 64), ("AccessionNumber", "*" + "A" * 16 + "*"),
             ("StudyDescription", "")],
            {},
        )  # fmt: skip
    assert [str(w.message) for w in warned] == [] and caplog.records == []
    ds = q.identifier
    assert ds.ModalitiesInStudy == ["C*", "MR"] and ds.PatientSex == "?"
    assert str(ds.PatientName) == "DOE^J*=A=B" and ds.PatientID == "P" * 64
    rawds.encode_dataset(ds)


ARABIC = str.maketrans("0123456789", "\u0660\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669")


@pytest.mark.parametrize(
    ("param", "value"),
    [("limit", "10"), ("offset", "5"), ("Rows", "512"), ("StudyDate", "20240101"),
     ("InstanceNumber", "7"), ("SliceThickness", "1.5"), ("PatientAge", "045Y"),
     ("StudyTime", "12"), ("SamplesPerPixel", "1"), ("ImagerPixelSpacing", "0.5"),
     ("EffectiveEchoTime", "1.5")],
)  # fmt: skip
def test_numbers_are_ascii_digits(param: str, value: str) -> None:
    """int(), float() and the regular expressions' \\d read every script's digits: a
    `limit` or `Rows` in Arabic-Indic digits was taken, a date went on to fail encoding
    (400 without saying why); now each is refused, naming the parameter."""
    parse_query("IMAGE", [(param, value)], {})  # in ASCII digits: taken
    with pytest.raises(QueryError) as info:
        parse_query("IMAGE", [(param, value.translate(ARABIC))], {})
    assert info.value.param == param and "cannot be sent" not in str(info.value)


@pytest.mark.parametrize(
    ("value", "sent"),
    [("CT,MR", ["CT", "MR"]), ("CT, MR,US", ["CT", "MR", "US"]), ("C*,MR", ["C*", "MR"]),
     ("CT", "CT")],
)  # fmt: skip
def test_a_comma_list_of_code_strings_is_the_c_finds_multiple_values(
    value: str, sent: list[str] | str
) -> None:
    """dicomweb-client and OHIF send a selection of modalities as `CT,MR`: since 734c6e0
    made code strings strict, the comma (no CS character) was a 400."""
    ds = parse_query("STUDY", [("ModalitiesInStudy", value)], {}).identifier
    assert ds.ModalitiesInStudy == sent
    rawds.encode_dataset(ds)


@pytest.mark.parametrize(
    ("param", "value", "says"),
    [("ModalitiesInStudy", "CT,,MR", "empty value"), ("ModalitiesInStudy", "CT,", "empty value"),
     ("ModalitiesInStudy", "CT,mr", "code string"), ("ModalitiesInStudy", "CT," + "A" * 17, "16"),
     ("Modality", "CT,MR", "one value only"), ("PatientSex", "M,F", "one value only")],
)  # fmt: skip
def test_each_value_of_a_comma_list_is_checked(param: str, value: str, says: str) -> None:
    """Each value as its VR says; a list where the attribute has one value (VM 1) or
    with an empty value is the client's 400, naming the parameter."""
    with pytest.raises(QueryError) as info:
        parse_query("SERIES" if param == "Modality" else "STUDY", [(param, value)], {})
    assert info.value.param == param and says in info.value.message


def test_a_comma_stays_text_where_a_value_may_hold_one() -> None:
    """Only code strings (which hold no comma) are split: a description or a name with a
    comma is one value, as it was."""
    ds = parse_query("STUDY", [("StudyDescription", "HEAD, NECK*"),
                               ("PatientName", "DOE, J*")], {}).identifier  # fmt: skip
    assert ds.StudyDescription == "HEAD, NECK*" and str(ds.PatientName) == "DOE, J*"
