"""Accept negotiation of the DICOM JSON answers (QIDO-RS, WADO-RS metadata) over real
HTTP: what is not JSON is 406 before anything is asked of the PACS, and the `accept`
query parameter (PS3.18 8.3.3.1) is the Accept, not an attribute to match on."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from relay.workstation.dicomweb.media import MAX_ACCEPT
from relay.workstation.dicomweb.server import DicomwebServer
from tests.workstation.dicomweb.test_server import CT, SERIES, STUDY, ScriptedSource, get, scripted

XML = "application/dicom+xml"
MULTIPART_XML = 'multipart/related; type="application/dicom+xml"'


@pytest.fixture
async def served() -> AsyncIterator[tuple[DicomwebServer, ScriptedSource]]:
    async with scripted() as both:
        yield both


@pytest.mark.parametrize("accept", [XML, MULTIPART_XML, "text/html",
                                    "application/dicom+json;q=0, text/html",
                                    "application/dicom+json;q=0, */*"])  # fmt: skip
async def test_what_does_not_accept_json_is_406_and_asks_nothing_of_the_pacs(
    served: tuple[DicomwebServer, ScriptedSource], accept: str
) -> None:
    srv, source = served
    asked: list[str] = []
    find = source.find

    async def counted(identifier: object, max_matches: int, *, skip: int = 0) -> object:
        asked.append("find")
        return await find(identifier, max_matches, skip=skip)  # type: ignore[arg-type]

    source.find = counted  # type: ignore[method-assign,assignment]
    series = f"{srv.url}/studies/{STUDY}/series/{SERIES}"
    for url in (f"{srv.url}/studies", f"{series}/metadata", f"{srv.url}/studies/{STUDY}/metadata"):
        status, _, body = await get(url, headers={"Accept": accept})
        assert status == 406, (url, body)
        status, _, _ = await get(f"{url}?accept={accept.replace(' ', '%20')}")
        assert status == 406, url
    assert asked == [] and source.retrieves == 0


@pytest.mark.parametrize("accept", [None, "application/dicom+json", "application/json",
                                    "text/html, */*;q=0.8"])  # fmt: skip
async def test_json_or_anything_is_answered(
    served: tuple[DicomwebServer, ScriptedSource], accept: str | None
) -> None:
    srv, _ = served
    headers = {"Accept": accept} if accept else {}
    status, _, body = await get(f"{srv.url}/studies/{STUDY}/series/{SERIES}/metadata",
                                headers=headers)  # fmt: skip
    assert status == 200 and len(json.loads(body)) == len(CT)
    status, _, body = await get(f"{srv.url}/studies", headers=headers)
    assert status == 200 and len(json.loads(body)) == 1


async def test_the_accept_and_charset_parameters_are_no_matching_keys(
    served: tuple[DicomwebServer, ScriptedSource],
) -> None:
    srv, _ = served
    status, _, body = await get(f"{srv.url}/studies?accept=application/dicom%2Bjson"
                                "&charset=utf-8&PatientID=*")  # fmt: skip
    assert status == 200, body
    assert len(json.loads(body)) == 1
    # its + left unencoded (a space once decoded) still names DICOM JSON
    status, _, body = await get(f"{srv.url}/studies?accept=application/dicom+json")
    assert status == 200, body


def _counting_finds(source: ScriptedSource) -> list[str]:
    asked: list[str] = []
    find = source.find

    async def counted(identifier: object, max_matches: int, *, skip: int = 0) -> object:
        asked.append("find")
        return await find(identifier, max_matches, skip=skip)  # type: ignore[arg-type]

    source.find = counted  # type: ignore[method-assign,assignment]
    return asked


DICOM_PART = 'multipart/related; type="application/dicom"'


@pytest.mark.parametrize("accept", [
    "application/dicom+json", MULTIPART_XML, "text/html, image/*",
    f"{DICOM_PART}; q=0, */*",  # the most specific range refuses what */* would take
])  # fmt: skip
async def test_an_accept_no_instance_answer_can_meet_is_406_before_any_retrieval(
    served: tuple[DicomwebServer, ScriptedSource], accept: str
) -> None:
    srv, source = served
    asked = _counting_finds(source)
    series = f"{srv.url}/studies/{STUDY}/series/{SERIES}"
    inst = f"{series}/instances/{CT[0].sop_instance}"
    for url in (f"{srv.url}/studies/{STUDY}", series, inst):
        status, _, body = await get(url, headers={"Accept": accept})
        assert status == 406, (url, body)
    assert asked == [] and source.retrieves == 0 and source.ahead == []


@pytest.mark.parametrize("accept", [
    "application/dicom+json", "text/html", "multipart/*;q=0, */*",
    'multipart/related; type="image/png"',
])  # fmt: skip
async def test_an_accept_no_frames_answer_can_meet_is_406_before_any_retrieval(
    served: tuple[DicomwebServer, ScriptedSource], accept: str
) -> None:
    srv, source = served
    frame = f"{srv.url}/studies/{STUDY}/series/{SERIES}/instances/{CT[0].sop_instance}/frames/1"
    status, _, body = await get(frame, headers={"Accept": accept, "Range": "bytes=0-99"})
    assert status == 406, body
    assert source.retrieves == 0 and source.ahead == []


async def test_an_accept_some_stored_syntax_meets_is_still_answered(
    served: tuple[DicomwebServer, ScriptedSource],
) -> None:
    """What could be answered for some syntax is retrieved and negotiated as before:
    answered when the series is stored so, 406 (after the retrieval) when not."""
    srv, source = served
    series = f"{srv.url}/studies/{STUDY}/series/{SERIES}"
    ts = CT[0].transfer_syntax
    as_stored = {"Accept": f"{DICOM_PART}; transfer-syntax={ts}"}
    status, headers, _ = await get(series, headers=as_stored)
    assert status == 200 and 'type="application/dicom"' in headers["Content-Type"]
    jpeg = "1.2.840.10008.1.2.4.50"
    status, _, _ = await get(series, headers={"Accept": f"{DICOM_PART}; transfer-syntax={jpeg}"})
    assert status == 406
    refused = f"{DICOM_PART}; transfer-syntax={ts}; q=0, {DICOM_PART}"
    assert (await get(series, headers={"Accept": refused}))[0] == 406
    assert source.retrieves == 1  # one flight, held: the later requests joined it


async def test_a_rendered_type_refused_with_q0_is_not_answered(
    served: tuple[DicomwebServer, ScriptedSource],
) -> None:
    srv, _ = served
    inst = f"{srv.url}/studies/{STUDY}/series/{SERIES}/instances/{CT[0].sop_instance}"
    status, headers, _ = await get(f"{inst}/rendered", headers={"Accept": "image/jpeg;q=0, */*"})
    assert status == 200 and headers["Content-Type"] == "image/png"
    refused = "image/*;q=0, */*"
    assert (await get(f"{inst}/rendered", headers={"Accept": refused}))[0] == 406


async def test_an_accept_of_more_ranges_than_are_read_is_400_saying_so(
    served: tuple[DicomwebServer, ScriptedSource],
) -> None:
    """Ranges past media.MAX_ACCEPT were dropped: DICOM JSON named 33rd was 406, "no
    XML", though the client asked for it; now the bound is the answer."""
    srv, source = served
    many = ", ".join([*(f"text/x-{i}" for i in range(MAX_ACCEPT)), "application/dicom+json"])
    instance = f"{srv.url}/studies/{STUDY}/series/{SERIES}/instances/{CT[0].sop_instance}"
    for url in (f"{srv.url}/studies", f"{instance}/metadata", f"{instance}/frames/1"):
        status, _, body = await get(url, headers={"Accept": many})
        assert status == 400 and body == f"Accept: more than {MAX_ACCEPT} media ranges\n".encode()
    status, _, _ = await get(f"{srv.url}/studies?accept={many.replace('+', '%2B')}")
    assert status == 400
    assert source.retrieves == 0
    fewer = ", ".join([*(f"text/x-{i}" for i in range(MAX_ACCEPT - 1)), "application/dicom+json"])
    status, _, _ = await get(f"{srv.url}/studies", headers={"Accept": fewer + ", , "})
    assert status == 200  # empty items are no ranges
