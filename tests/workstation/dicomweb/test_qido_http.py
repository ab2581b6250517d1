"""QIDO-RS over real HTTP: a malformed matching value is the client's 400 with the
parameter named, never a 500 from the identifier failing to encode on its way out; an
answer the server's maximum cuts says so (PS3.18 8.3.4.4) and `offset` gets the rest; a
study with more series than that is never answered as complete."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from relay.dicom import rawds
from relay.dicom import status as st
from relay.dicom.codec import (
    DicomLimits,
    FinalResponse,
    MessageCodec,
    Pending,
    Request,
    read_message,
    write_message,
)
from relay.net.bytestream import ByteStream, pipe
from relay.ops.config import Address
from relay.workstation.dicomweb import qido
from relay.workstation.dicomweb.server import DicomwebServer
from relay.workstation.dicomweb.settings import DicomwebConfig
from relay.workstation.dicomweb.source import DicomSource, FindResult
from relay_dev import matching, samples
from relay_dev.pacs import MemoryStore
from tests.workstation.dicomweb.test_server import STUDY, ScriptedSource, get, scripted

EXPLICIT_LE = "1.2.840.10008.1.2.1"


@pytest.mark.parametrize(
    "query",
    ["Rows=abc", "NumberOfFrames=x", "ReferencedSeriesSequence=x", "PixelData=abc",
     "00280010=abc", "includefield=PixelData", "SeriesNumber=zz"],
)  # fmt: skip
async def test_a_malformed_value_is_400_naming_the_parameter(query: str) -> None:
    async def no_link(headers: Any) -> Any:
        raise OSError("no link")  # the real DicomSource: it encodes the identifier

    srv = DicomwebServer(DicomwebConfig(Address("127.0.0.1", 0)), no_link)
    await srv.start()
    try:
        async with aiohttp.ClientSession() as s, s.get(f"{srv.url}/studies?{query}") as r:
            text = await r.text()
            assert r.status == 400, text
            name, _, value = query.partition("=")
            assert text.startswith(value if name == "includefield" else name)
        async with aiohttp.ClientSession() as s, s.get(f"{srv.url}/studies?Rows=512") as r:
            assert r.status == 502  # well formed: on to the (absent) link
    finally:
        await srv.stop()


SERIES_IN_STUDY = 7
MAXIMUM = 5  # qido.MAX_LIMIT for these tests: 7 series are more than one answer holds


def _series_match(n: int) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.2.1143.9.{n}"
    ds.SeriesNumber = n
    return ds


@pytest.fixture
async def many_series(
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[DicomwebServer, ScriptedSource]]:
    """A study of SERIES_IN_STUDY series, with MAX_LIMIT at MAXIMUM."""
    monkeypatch.setattr(qido, "MAX_LIMIT", MAXIMUM)
    async with scripted() as (srv, source):

        async def find(identifier: Dataset, max_matches: int, *, skip: int = 0) -> FindResult:
            found = [_series_match(n) for n in range(1, SERIES_IN_STUDY + 1)]
            page = found[skip : skip + max_matches]
            return FindResult(page, False, len(found) > skip + max_matches)

        source.find = find  # type: ignore[method-assign]
        yield srv, source


async def _series_page(srv: DicomwebServer, query: str = "") -> tuple[list[int], str | None]:
    status, headers, body = await get(f"{srv.url}/studies/{STUDY}/series{query}")
    assert status == 200, body
    numbers = [doc["00200011"]["Value"][0] for doc in json.loads(body)]
    return numbers, headers.get("Warning")


async def test_a_series_list_cut_at_the_maximum_says_so_and_offset_gets_the_rest(
    many_series: tuple[DicomwebServer, ScriptedSource],
) -> None:
    srv, _ = many_series
    assert srv.address is not None
    numbers, warning = await _series_page(srv)
    assert numbers == [1, 2, 3, 4, 5]
    assert warning == f"299 127.0.0.1:{srv.address.port} {qido.CUT_WARNING}"
    assert "Additional results can be requested" in warning
    numbers, warning = await _series_page(srv, f"?offset={MAXIMUM}")
    assert numbers == [6, 7] and warning is None  # the rest, complete
    numbers, warning = await _series_page(srv, "?limit=100")  # above the maximum: cut too
    assert numbers == [1, 2, 3, 4, 5] and warning is not None
    numbers, warning = await _series_page(srv, "?limit=3&offset=2")  # the client's own page
    assert numbers == [3, 4, 5] and warning is None


async def test_a_study_with_more_series_than_the_maximum_is_not_answered_as_complete(
    many_series: tuple[DicomwebServer, ScriptedSource],
) -> None:
    srv, source = many_series
    for what in ("", "/metadata"):
        status, _, body = await get(f"{srv.url}/studies/{STUDY}{what}")
        assert status == 507 and f"more than {MAXIMUM} series".encode() in body, what
    assert source.retrieves == 0


def _agent_sending(codec: MessageCodec, matches: int, seen: list[Request]) -> Any:
    """An open_stream whose far end is an agent answering a C-FIND with `matches` series."""

    async def agent(end: ByteStream) -> None:
        request = await read_message(end, codec)
        assert isinstance(request, Request)
        seen.append(request)
        for n in range(1, matches + 1):
            match = rawds.encode_dataset(_series_match(n))
            await write_message(end, codec, Pending(transfer_syntax=EXPLICIT_LE, dataset=match))
        await write_message(end, codec, FinalResponse(st.SUCCESS))

    async def open_stream(headers: dict[str, str]) -> ByteStream:
        near, far = pipe(headers)
        asyncio.get_running_loop().create_task(agent(far))
        return near

    return open_stream


@pytest.mark.parametrize(
    ("skip", "limit", "numbers", "truncated"),
    [(0, 3, [1, 2, 3], True), (3, 3, [4, 5, 6], True), (5, 3, [6, 7], False),
     (7, 3, [], False), (0, 7, [1, 2, 3, 4, 5, 6, 7], False)],
)  # fmt: skip
async def test_the_source_passes_over_skip_matches_and_keeps_a_page(
    skip: int, limit: int, numbers: list[int], truncated: bool
) -> None:
    codec = MessageCodec(DicomLimits())
    seen: list[Request] = []
    source = DicomSource(_agent_sending(codec, SERIES_IN_STUDY, seen), codec, timeout=10.0)
    found = await source.find(_series_match(0), limit, skip=skip)
    assert [int(ds.SeriesNumber) for ds in found.matches] == numbers
    assert found.truncated is truncated and len(seen) == 1


def _pacs_answering(codec: MessageCodec, store: MemoryStore, seen: list[Dataset]) -> Any:
    """An open_stream whose far end answers a C-FIND as the embedded PACS matches it."""

    async def agent(end: ByteStream) -> None:
        request = await read_message(end, codec)
        assert isinstance(request, Request)
        identifier = rawds.decode_dataset(request.dataset, request.transfer_syntax)
        seen.append(identifier)
        for match in matching.find(store.records(), identifier):
            pending = Pending(transfer_syntax=EXPLICIT_LE, dataset=rawds.encode_dataset(match))
            await write_message(end, codec, pending)
        await write_message(end, codec, FinalResponse(st.SUCCESS))

    async def open_stream(headers: dict[str, str]) -> ByteStream:
        near, far = pipe(headers)
        asyncio.get_running_loop().create_task(agent(far))
        return near

    return open_stream


def _study_of(inst: samples.EncodedInstance) -> str:
    return str(rawds.decode_dataset(inst.data, inst.transfer_syntax).StudyInstanceUID)


async def test_dicomweb_clients_comma_list_of_modalities_reaches_the_pacs_as_values() -> None:
    """dicomweb-client (as OHIF's study list) asks `ModalitiesInStudy=CT,MR`: a 400 since
    734c6e0; now the PACS gets CT and MR as the two values of the key, and matches them."""
    ct = samples.make_study(1, modality="CT", rows=8, cols=8, seed=71)
    mr = samples.make_study(1, modality="MR", rows=8, cols=8, seed=72)
    seen: list[Dataset] = []
    codec = MessageCodec(DicomLimits())
    srv = DicomwebServer(DicomwebConfig(Address("127.0.0.1", 0)),
                         _pacs_answering(codec, MemoryStore(ct + mr), seen))  # fmt: skip
    await srv.start()
    try:
        client = DICOMwebClient(srv.url)

        def studies(modalities: str) -> set[str]:
            found = client.search_for_studies(search_filters={"ModalitiesInStudy": modalities})
            return {doc["0020000D"]["Value"][0] for doc in found}

        ct_study, mr_study = (str(_study_of(s[0])) for s in (ct, mr))
        both = await asyncio.to_thread(studies, "CT,MR")
        assert both == {ct_study, mr_study}
        assert list(seen[-1].ModalitiesInStudy) == ["CT", "MR"]
        assert await asyncio.to_thread(studies, "MR,PT") == {mr_study}
    finally:
        await srv.stop()
