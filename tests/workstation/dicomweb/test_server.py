"""The DICOMweb server over real HTTP on loopback, with a scripted DICOM source in place of
the relay (the real chain is tests/e2e/test_dicomweb_e2e.py): guards, limits, errors,
single-flight retrieval, the holding bound, and STOW's response document."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from pydicom.dataset import Dataset

from relay.dicom import headers_only as headers_only_
from relay.dicom import rawds
from relay.dicom import status as st
from relay.dicom.codec import FinalResponse, Instance
from relay.ops.config import Address
from relay.proto import Priority
from relay.workstation.dicomweb import media, part10
from relay.workstation.dicomweb.server import DicomwebServer
from relay.workstation.dicomweb.settings import DicomwebConfig
from relay.workstation.dicomweb.source import FindResult, UpstreamError
from relay_dev import samples

INSTANCES = samples.demo_studies(ct_slices=3, mr_slices=2)
CT = [i for i in INSTANCES if i.sop_class.endswith(".1.2")]
STUDY = str(rawds.decode_dataset(CT[0].data, CT[0].transfer_syntax).StudyInstanceUID)
SERIES = str(rawds.decode_dataset(CT[0].data, CT[0].transfer_syntax).SeriesInstanceUID)


class ScriptedSource:
    """What DicomSource answers, from a list of instances; counts retrievals; can be down."""

    def __init__(self) -> None:
        self.retrieves = 0
        self.down = False
        self.release = asyncio.Event()
        self.release.set()
        self.stored: list[tuple[str, bytes]] = []
        self.store_status = st.SUCCESS
        self.final: FinalResponse | None = None  # the retrieve's final (default: success)
        # headers-only retrievals (headfirst.py): counted apart, held by their own event
        self.header_retrieves = 0
        self.header_release = asyncio.Event()
        self.header_release.set()
        self.header_final: FinalResponse | None = None
        self.header_error: UpstreamError | None = None
        self.old_agent = False  # ignore headers_only: send whole instances
        self.header_sent = 0
        self.ahead: list[tuple[str, Priority | None]] = []  # IMAGE-level retrievals
        self.missing: set[str] = set()  # series the PACS has no instance of (yet)
        self.syntax: dict[str, str] = {}  # SOP Instance UID -> the syntax it is sent as

    async def find(self, identifier: Dataset, max_matches: int, *, skip: int = 0) -> FindResult:
        if self.down:
            raise UpstreamError(502, "the PACS is unreachable: connection refused")
        level = identifier.QueryRetrieveLevel
        out = []
        for inst in CT:
            ds = rawds.decode_dataset(inst.data, inst.transfer_syntax)
            if identifier.get("StudyInstanceUID") not in (None, "", ds.StudyInstanceUID):
                continue
            match = Dataset()
            match.QueryRetrieveLevel = level
            match.StudyInstanceUID = ds.StudyInstanceUID
            match.SeriesInstanceUID = ds.SeriesInstanceUID
            match.SeriesNumber = ds.SeriesNumber
            if level == "STUDY":
                match.PatientID = ds.PatientID
                match.NumberOfStudyRelatedInstances = str(len(CT))
            out.append(match)
            if level != "IMAGE":
                break
        return FindResult(out[skip : skip + max_matches], False, len(out) > skip + max_matches)

    async def retrieve(
        self,
        identifier: Dataset,
        outcome: list[FinalResponse] | None = None,
        *,
        headers_only: bool = False,
        priority: Priority | None = None,
    ) -> AsyncIterator[Instance]:
        if identifier.QueryRetrieveLevel == "IMAGE":  # one instance, ahead of its series
            self.ahead.append((str(identifier.SOPInstanceUID), priority))
            for inst in CT:
                if inst.sop_instance == identifier.SOPInstanceUID:
                    yield Instance(inst.sop_class, inst.sop_instance, inst.transfer_syntax,
                                   inst.data)  # fmt: skip
            return
        if headers_only:
            self.header_retrieves += 1
        else:
            self.retrieves += 1
        if self.down:
            raise UpstreamError(502, "the PACS is unreachable: connection refused")
        release, final = self.release, self.final
        if headers_only:
            release, final = self.header_release, self.header_final
        sent = 0
        for inst in CT:
            ds = rawds.decode_dataset(inst.data, inst.transfer_syntax)
            series = str(ds.SeriesInstanceUID)
            if series != identifier.SeriesInstanceUID or series in self.missing:
                continue
            await release.wait()
            if headers_only and self.header_error is not None:
                raise self.header_error
            sent += 1
            ts = self.syntax.get(inst.sop_instance, inst.transfer_syntax)
            msg = Instance(inst.sop_class, inst.sop_instance, ts, inst.data)
            if headers_only and not self.old_agent:
                msg = headers_only_.strip_instance(msg)  # what the agent does
            if headers_only:
                self.header_sent += 1
            yield msg
        if outcome is not None:
            outcome.append(final or FinalResponse(st.SUCCESS, completed=sent, failed=0))

    async def store(self, sop_class: str, sop_instance: str, ts: str, data: bytes) -> FinalResponse:
        if self.down:
            raise UpstreamError(502, "relay link unavailable")
        self.stored.append((sop_instance, data))
        return FinalResponse(self.store_status)


@contextlib.asynccontextmanager
async def scripted(
    config: DicomwebConfig | None = None,
) -> AsyncIterator[tuple[DicomwebServer, ScriptedSource]]:
    """A started DicomwebServer whose DICOM side is a ScriptedSource (no relay link)."""

    async def no_link(headers: Any) -> Any:
        raise OSError("no link")

    srv = DicomwebServer(config or DicomwebConfig(Address("127.0.0.1", 0)), no_link)
    source = ScriptedSource()
    srv.service.source = source  # type: ignore[assignment]
    srv.service.retriever.source = source  # type: ignore[assignment]
    await srv.start()
    try:
        yield srv, source
    finally:
        await srv.stop()


@pytest.fixture
async def server() -> AsyncIterator[tuple[DicomwebServer, ScriptedSource]]:
    config = DicomwebConfig(Address("127.0.0.1", 0), max_upload=4 * 1024 * 1024,
                            hold_size=4 * 1024 * 1024, headers_first=True)  # fmt: skip
    async with scripted(config) as both:
        yield both


async def get(url: str, **kwargs: Any) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as session, session.get(url, **kwargs) as r:
        return r.status, dict(r.headers), await r.read()


def parts(headers: dict[str, str], body: bytes) -> list[tuple[str, bytes]]:
    import email
    import email.policy

    head = f"Content-Type: {headers['Content-Type']}\r\n\r\n".encode()
    msg = email.message_from_bytes(head + body, policy=email.policy.HTTP)
    out = []
    for p in msg.iter_parts():
        payload = p.get_payload(decode=True)
        assert isinstance(payload, bytes)
        out.append((str(p["Content-Type"]), payload))
    return out


async def test_qido_answers_dicom_json(server: tuple[DicomwebServer, ScriptedSource]) -> None:
    srv, _ = server
    status, headers, body = await get(f"{srv.url}/studies/{STUDY}/series/{SERIES}/instances")
    assert status == 200 and headers["Content-Type"].startswith("application/dicom+json")
    assert len(json.loads(body)) == len(CT)
    status, _, body = await get(f"{srv.url}/studies?PatientName=X&limit=abc")
    assert status == 400 and b"limit" in body
    status, _, body = await get(f"{srv.url}/studies?StudyInstanceUID=1.99")
    assert status == 204 and body == b""  # no match


async def test_a_series_is_retrieved_once_for_concurrent_requests(
    server: tuple[DicomwebServer, ScriptedSource],
) -> None:
    srv, source = server
    source.release.clear()
    url = f"{srv.url}/studies/{STUDY}/series/{SERIES}"
    tasks = [asyncio.ensure_future(get(url)) for _ in range(4)]
    tasks.append(asyncio.ensure_future(get(f"{url}/metadata")))
    await asyncio.sleep(0.2)
    source.release.set()
    results = await asyncio.gather(*tasks)
    assert source.retrieves == 1
    for status, headers, body in results[:4]:
        assert status == 200
        got = parts(headers, body)
        assert [p[part10.split(p)[1] :] for _, p in got] == [i.data for i in CT]
        assert all(ct.startswith("application/dicom; transfer-syntax=") for ct, _ in got)
    assert len(json.loads(results[4][2])) == len(CT)


class SlowMissingCache:
    """A cache that takes its time to say it does not have the series."""

    def plan(self, identifier: Dataset) -> None:
        import time

        time.sleep(0.2)

    def offline(self) -> bool:
        return False


async def test_requests_arriving_during_the_cache_lookup_join_the_same_flight(
    server: tuple[DicomwebServer, ScriptedSource],
) -> None:
    srv, source = server
    srv.service.retriever.cache = SlowMissingCache()  # type: ignore[assignment]
    url = f"{srv.url}/studies/{STUDY}/series/{SERIES}/metadata"
    results = await asyncio.gather(*(get(url) for _ in range(3)))
    assert [r[0] for r in results] == [200] * 3
    assert source.retrieves == 1


async def test_frames_bulk_and_rendered(server: tuple[DicomwebServer, ScriptedSource]) -> None:
    srv, _ = server
    inst = f"{srv.url}/studies/{STUDY}/series/{SERIES}/instances/{CT[0].sop_instance}"
    ohif = {"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}
    status, headers, body = await get(f"{inst}/frames/1", headers=ohif)
    assert status == 200
    [(ctype, frame)] = parts(headers, body)
    ds = rawds.decode_dataset(CT[0].data, CT[0].transfer_syntax)
    assert frame == ds.PixelData
    assert "transfer-syntax=1.2.840.10008.1.2.1" in ctype.replace('"', "")
    assert (await get(f"{inst}/frames/2", headers=ohif))[0] == 404
    assert (await get(f"{inst}/frames/x"))[0] == 400
    status, headers, body = await get(f"{inst}/bulk/7FE00010")
    assert status == 200 and parts(headers, body)[0][1] == ds.PixelData
    status, headers, body = await get(f"{inst}/rendered", headers={"Accept": "image/png"})
    assert status == 200 and headers["Content-Type"] == "image/png" and body[:4] == b"\x89PNG"
    status, _, _ = await get(f"{inst}/rendered", headers={"Accept": "image/gif"})
    assert status == 406


async def test_unknown_things_are_404_and_a_pacs_down_is_502_with_the_reason(
    server: tuple[DicomwebServer, ScriptedSource],
) -> None:
    srv, source = server
    assert (await get(f"{srv.url}/studies/{STUDY}/series/1.2.3"))[0] == 404
    assert (await get(f"{srv.url}/studies/1.2.3/metadata"))[0] == 404
    assert (await get(f"{srv.url}/studies/{STUDY}/series/{SERIES}/instances/1.2.3"))[0] == 404
    assert (await get(f"{srv.url}/studies/not-a-uid"))[0] == 400
    source.down = True
    status, _, body = await get(f"{srv.url}/studies")
    assert status == 502 and b"unreachable" in body
    assert (await get(f"{srv.url}/studies/{STUDY}/series/9.9.9"))[0] == 502


async def test_dns_rebinding_cross_origin_and_long_queries_are_refused(
    server: tuple[DicomwebServer, ScriptedSource],
) -> None:
    srv, source = server
    port = srv.address.port  # type: ignore[union-attr]
    status, headers, _ = await get(f"{srv.url}/studies", headers={"Host": f"evil.example:{port}"})
    assert status == 403
    status, headers, _ = await get(f"{srv.url}/studies", headers={"Origin": "http://evil.example"})
    assert status == 403 and "Access-Control-Allow-Origin" not in headers
    status, headers, _ = await get(
        f"{srv.url}/studies", headers={"Origin": f"http://localhost:{port}"}
    )
    assert status == 200 and "Access-Control-Allow-Origin" not in headers
    # an <img> or a link on another site: no Origin, but the browser says where from
    frame = f"{srv.url}/studies/{STUDY}/series/{SERIES}/instances/{CT[0].sop_instance}/frames/1"
    retrieves = source.retrieves
    assert (await get(frame, headers={"Sec-Fetch-Site": "cross-site"}))[0] == 403
    # same-site: another web app on localhost or 127.0.0.1, on another port
    assert (await get(frame, headers={"Sec-Fetch-Site": "same-site"}))[0] == 403
    assert (await get(f"{srv.url}/studies", headers={"Sec-Fetch-Site": "same-site"}))[0] == 403
    assert source.retrieves == retrieves  # nothing was asked of the PACS
    for ours in ("same-origin", "none", "SAME-ORIGIN"):
        assert (await get(f"{srv.url}/studies", headers={"Sec-Fetch-Site": ours}))[0] == 200
    assert (await get(f"{srv.url}/studies?PatientName={'A' * 9000}"))[0] in (400, 414)
    assert (await get(f"{srv.url}/studies", headers={"X-Big": "x" * 10000}))[0] == 400
    assert (await get(f"http://127.0.0.1:{port}/"))[0] == 404  # no listing, no viewer here


def stow_body(files: list[bytes], boundary: str = "stowb") -> bytes:
    out = b"".join(media.part_head(boundary, "application/dicom") + f for f in files)
    return out + media.closing(boundary)


async def post(url: str, body: bytes, boundary: str = "stowb") -> tuple[int, bytes]:
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    async with aiohttp.ClientSession() as s, s.post(url, data=body, headers=headers) as r:
        return r.status, await r.read()


async def test_stow_stores_and_answers_with_the_response_document(
    server: tuple[DicomwebServer, ScriptedSource],
) -> None:
    srv, source = server
    files = [part10.wrap(i.sop_class, i.sop_instance, i.transfer_syntax, i.data) for i in CT]
    status, body = await post(f"{srv.url}/studies", stow_body(files))
    assert status == 200, body
    doc = Dataset.from_json(json.loads(body))
    referenced = [x.ReferencedSOPInstanceUID for x in doc.ReferencedSOPSequence]
    assert referenced == [i.sop_instance for i in CT]
    assert [d for _, d in source.stored] == [i.data for i in CT]
    # one bad part among good ones: 202 with a FailedSOPSequence
    status, body = await post(f"{srv.url}/studies", stow_body([files[0], b"not dicom"]))
    assert status == 202 and "FailedSOPSequence" in Dataset.from_json(json.loads(body))
    # the study in the URL must be the instances' study: 409 when none is
    status, body = await post(f"{srv.url}/studies/1.2.3", stow_body([files[0]]))
    assert status == 409
    source.store_status = st.STORE_OUT_OF_RESOURCES
    assert (await post(f"{srv.url}/studies", stow_body([files[0]])))[0] == 409
    source.down = True
    status, body = await post(f"{srv.url}/studies", stow_body([files[0]]))
    assert status == 502 and b"relay link unavailable" in body


async def post_chunked(url: str, body: bytes) -> tuple[int, bytes, str]:
    """As `post`, without a Content-Length (the server counts the bytes as they come),
    and the answer's Warning header."""

    async def chunks() -> AsyncIterator[bytes]:
        for at in range(0, len(body), 1 << 20):
            yield body[at : at + (1 << 20)]

    headers = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=stowb'}
    async with aiohttp.ClientSession() as s, s.post(url, data=chunks(), headers=headers) as r:
        return r.status, await r.read(), r.headers.get("Warning", "")


@pytest.mark.parametrize(
    ("bad", "status", "text"),
    [
        (media.part_head("stowb", "text/plain") + b"hello", 415, "application/dicom"),
        (media.part_head("stowb", "application/dicom") + b"\0" * (5 << 20), 413, "max_upload"),
    ],
    ids=["not-dicom", "too-large"],
)
async def test_stow_refused_part_way_still_reports_what_was_stored(
    server: tuple[DicomwebServer, ScriptedSource], bad: bytes, status: int, text: str
) -> None:
    """A request that goes wrong after an instance was stored: 202 with that instance and
    a failure for the rest (never a 4xx that says nothing was stored), the reason in a
    Warning header; before any was stored, the 4xx itself."""
    srv, source = server
    good = media.part_head("stowb", "application/dicom") + part10.wrap(
        CT[0].sop_class, CT[0].sop_instance, CT[0].transfer_syntax, CT[0].data
    )
    got, answer, warning = await post_chunked(
        f"{srv.url}/studies", good + bad + media.closing("stowb")
    )
    assert got == 202, answer
    assert warning.startswith("299 ") and text in warning
    doc = Dataset.from_json(json.loads(answer))
    assert [x.ReferencedSOPInstanceUID for x in doc.ReferencedSOPSequence] == [CT[0].sop_instance]
    assert len(doc.FailedSOPSequence) == 1
    assert [d for _, d in source.stored] == [CT[0].data]
    got, answer, _ = await post_chunked(f"{srv.url}/studies", bad + good + media.closing("stowb"))
    assert got == status and text.encode() in answer
    assert len(source.stored) == 1  # nothing more stored


async def test_an_instance_in_a_syntax_not_accepted_cuts_the_answer(
    server: tuple[DicomwebServer, ScriptedSource],
) -> None:
    """The Accept header allows Explicit VR Little Endian; the series' second instance
    is in another syntax: the answer is cut there, never completed without it."""
    srv, source = server
    source.syntax[CT[1].sop_instance] = "1.2.840.10008.1.2.4.80"  # JPEG-LS, as stored
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1'
    url = f"{srv.url}/studies/{STUDY}/series/{SERIES}"
    async with aiohttp.ClientSession() as s, s.get(url, headers={"Accept": accept}) as r:
        assert r.status == 200  # the first instance was acceptable, and went
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()


async def test_frames_asked_twice_are_refused(
    server: tuple[DicomwebServer, ScriptedSource],
) -> None:
    srv, _ = server
    url = f"{srv.url}/studies/{STUDY}/series/{SERIES}/instances/{CT[0].sop_instance}/frames"
    async with aiohttp.ClientSession() as s, s.get(f"{url}/1,1") as r:
        assert r.status == 400 and "twice" in await r.text()


async def test_stow_beyond_max_upload_is_413(server: tuple[DicomwebServer, ScriptedSource]) -> None:
    srv, source = server
    big = b"\0" * (5 * 1024 * 1024)
    status, body = await post(f"{srv.url}/studies", stow_body([big]))
    assert status == 413 and b"max_upload" in body
    assert source.stored == []

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
        yield media.part_head("stowb", "application/dicom")
        for _ in range(5):
            yield b"\0" * (1024 * 1024)
        yield media.closing("stowb")

    headers = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=stowb'}
    async with aiohttp.ClientSession() as s, s.post(f"{srv.url}/studies", data=chunks(),
                                                    headers=headers) as r:  # fmt: skip
        assert r.status == 413
    assert source.stored == []


async def test_a_series_larger_than_the_holding_area_fails_507(
    server: tuple[DicomwebServer, ScriptedSource],
) -> None:
    srv, _ = server
    srv.service.retriever.hold_size = len(CT[0].data) + 10  # holds one instance, not three
    url = f"{srv.url}/studies/{STUDY}/series/{SERIES}"
    # the first instance was already sent: the answer is cut, never completed
    for what in (url, f"{url}/metadata"):
        with pytest.raises(aiohttp.ClientPayloadError):
            await get(what)
    assert srv.service.retriever.flights == {}  # failed flights are forgotten
    assert srv.service.retriever.held <= srv.service.retriever.hold_size


async def test_a_drain_refuses_new_connections_and_lets_a_retrieval_finish(
    server: tuple[DicomwebServer, ScriptedSource],
) -> None:
    """Stopping the workstation: the series a browser is receiving still comes whole
    (stop() alone would cancel its retrieval: 503), new connections are refused."""
    srv, source = server
    source.release.clear()
    url = f"{srv.url}/studies/{STUDY}/series/{SERIES}"
    answer = asyncio.ensure_future(get(url))
    for _ in range(500):  # the request is in (not a fixed sleep: a busy machine), its
        if srv.service.in_progress:  # retrieval waits for the PACS
            break
        await asyncio.sleep(0.02)
    assert srv.service.in_progress == 1
    drained = asyncio.ensure_future(srv.drain(10.0))
    assert srv._runner is not None
    for _ in range(500):  # the listener closed
        if not srv._runner.sites:
            break
        await asyncio.sleep(0.02)
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(f"{srv.url}/studies?PatientName=X")
    assert not drained.done()
    source.release.set()
    status, headers, body = await asyncio.wait_for(answer, 10)
    await asyncio.wait_for(drained, 5)
    assert status == 200
    assert [p[part10.split(p)[1] :] for _, p in parts(headers, body)] == [i.data for i in CT]


async def test_a_drain_cancels_what_is_left_when_the_grace_runs_out(
    server: tuple[DicomwebServer, ScriptedSource],
) -> None:
    srv, source = server
    source.release.clear()
    answer = asyncio.ensure_future(get(f"{srv.url}/studies/{STUDY}/series/{SERIES}"))
    await asyncio.sleep(0.2)
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(srv.drain(0.3), 10)
    assert asyncio.get_running_loop().time() - started < 3
    with contextlib.suppress(aiohttp.ClientError):
        status, _, _ = await asyncio.wait_for(answer, 10)
        assert status != 200  # never a whole answer
