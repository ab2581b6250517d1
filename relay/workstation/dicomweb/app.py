"""The DICOMweb routes (aiohttp): QIDO-RS, WADO-RS and STOW-RS under /dicom-web.

`build_app(service, extra_routes=...)` makes the whole web application: the guards
(Host, Origin, query length) and the metrics as middlewares for every route, DICOMweb
under PREFIX, and whatever `extra_routes` callables add (the viewer at `/`; see the
package docstring). Handlers parse, ask `DicomwebService` (the operations), and write;
multipart answers are written instance by instance as the series arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.multipart import BodyPartReader, MultipartReader
from aiohttp.web_protocol import RequestPayloadError
from pydicom.dataset import Dataset

from relay.dicom import rawds
from relay.dicom import status as st
from relay.dicom.pace import MIN_REQUEST_RATE
from relay.dicom.uids import is_uid
from relay.workstation.dicomweb import byterange, dicomjson, frames, htj2k, media, part10, qido
from relay.workstation.dicomweb.codestreams import CodestreamCache
from relay.workstation.dicomweb.guard import (
    allowed_origins,
    fetch_allowed,
    host_allowed,
    security_headers,
)
from relay.workstation.dicomweb.headfirst import HeadFirst
from relay.workstation.dicomweb.metrics import DicomwebMetrics
from relay.workstation.dicomweb.qido import QueryError, parse_query
from relay.workstation.dicomweb.retrieve import Retriever, SeriesFlight, SeriesItem, decode
from relay.workstation.dicomweb.settings import DEFAULT_TIMEOUT, MAX_QUERY
from relay.workstation.dicomweb.source import DicomSource, UpstreamError
from relay.workstation.dicomweb.stowpace import UploadPace, UploadStalled, UploadTooSlow

__all__ = ["PREFIX", "DicomwebService", "build_app"]

log = logging.getLogger(__name__)

PREFIX: Final = "/dicom-web"
DICOM_JSON: Final = "application/dicom+json"
INSTANCE_PARTS: Final = ("application/dicom",)  # what a WADO-RS instance part can be
# The 406s of an Accept no answer could ever meet, sent before anything is retrieved.
NO_INSTANCE_ANSWER: Final = (
    'instances are answered as multipart/related; type="application/'
    'dicom" in their stored transfer syntax (or transfer-syntax=*)'
)
BULK_PARTS: Final = ("application/octet-stream",)  # what a bulk data part is
NO_BULK_ANSWER: Final = (
    'bulk data is answered as multipart/related; type="application/octet-stream": '
    "uncompressed values in Explicit VR Little Endian, compressed pixel data per frame "
    "as stored (or transfer-syntax=*)"
)
NO_FRAMES_ANSWER: Final = (
    "frames are answered as stored or as HTJ2K: multipart/related of "
    "application/octet-stream or an image type, or one image/jphc"
)
MAX_STOW_PARTS: Final = 10_000
# Query parameters about the answer, not the match (PS3.18 8.3.3): `accept` is _accept's,
# `charset` is UTF-8 whatever it asks (DICOM JSON is UTF-8); not attributes to match on.
ANSWER_PARAMS: Final = frozenset({"accept", "charset"})
_PLUS_READ_AS_SPACE: Final = re.compile(r"(?<=[\w.*-]) (?=[\w.*-])")
# Requests in progress at once (503 beyond). A browser opens at most 6 HTTP/1.1
# connections to one host (the viewer may be open as 127.0.0.1 and as localhost: 12),
# however many requests OHIF queues (viewer/site.py maxNumRequests): viewing never nears it.
MAX_REQUESTS: Final = 64
RETRY_AFTER: Final = 1  # s: the Retry-After of a 503 (busy)
# STOW-RS parts checked at once (in threads): each may inflate a deflated dataset up to
# max_upload bytes, so this bounds that memory; the other requests keep a core.
STOW_CHECKS: Final = 2
# STOW-RS requests received at once (503 + Retry-After beyond): each holds a part of up to
# max_upload bytes in memory (and its dataset's copy while checked), so 64 requests at
# once could hold 64 times that; a viewer or dicomweb-client stores one request at a time.
STOW_UPLOADS: Final = 2
STOW_WRONG_STUDY: Final = 0xA900  # FailureReason: not of the study in the URL (PS3.18)
# What the STOW check reads from each dataset's top level (rawds.check_instance).
_STOW_CAPTURE: Final = {0x00080016: "sop_class", 0x00080018: "sop_instance",
                        0x0020000D: "study"}  # fmt: skip
KEY_SERVICE: Final = web.AppKey("dicomweb", object)
#: An upload answered without `100 Continue` (stow_expect): its refusal, decided from its
#: headers. Its client sends no body, so that answer closes the connection (`_unsent_body`):
#: kept open, the client's next request was read as the refused body and never answered.
KEY_REFUSED_UNSENT: Final = web.RequestKey("refused_unsent", web.Response)
ExtraRoutes = Callable[[web.Application], None]
T = TypeVar("T")


@dataclass
class DicomwebService:
    """What the handlers use: the operations, the series flights, the limits, the metrics.

    `allowed_hosts` is filled in once the listening port is known."""

    source: DicomSource
    retriever: Retriever
    metrics: DicomwebMetrics
    max_upload: int
    allowed_hosts: frozenset[str] = frozenset()
    base_url: str = ""  # http://127.0.0.1:PORT/dicom-web once listening
    # HTJ2K encodings and rendered frames at once (CPU-bound, in threads): the other
    # requests keep a core
    encoders: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(2))
    frames_encoded: int = 0
    # encoded frames kept for a viewer's next byte range (codestreams.py), bounded
    codestreams: CodestreamCache = field(default_factory=CodestreamCache)
    frame_ranges: int = 0  # 206 answers with one byte range of a codestream
    frames_whole: int = 0  # bare codestreams answered whole (no Range)
    frame_ranges_refused: int = 0  # 416
    headfirst: HeadFirst | None = None  # series metadata from headers (headfirst.py)
    stow_checks: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(STOW_CHECKS))
    stow_uploads: int = 0  # STOW-RS requests being received (at most STOW_UPLOADS)
    max_requests: int = MAX_REQUESTS
    # s an answer waits for the client to take it, and an upload for its next bytes (config)
    write_timeout: float = DEFAULT_TIMEOUT
    # bytes a second an upload must average after its first write_timeout (stowpace.py)
    stow_min_rate: float = MIN_REQUEST_RATE
    in_progress: int = 0  # requests being handled (answers being written included)
    requests_refused: int = 0  # 503: max_requests in progress


# -- middlewares ------------------------------------------------------------------------


def _text(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message + "\n", content_type="text/plain")


def _guard_refusal(request: web.Request, service: DicomwebService) -> web.Response | None:
    """The guard's refusal of a request (guard.py), or None: it may go on."""
    if not host_allowed(request.headers.get("Host"), service.allowed_hosts):
        return _text(403, "Host header does not name this workstation's loopback address")
    origin = request.headers.get("Origin")
    if origin is not None and origin.lower() not in allowed_origins(service.allowed_hosts):
        return _text(403, "cross-origin requests are not allowed")
    if request.path.startswith(PREFIX) and not fetch_allowed(request.headers.get("Sec-Fetch-Site")):
        return _text(403, "requests from other web sites are not allowed")
    if len(request.query_string) > MAX_QUERY:
        return _text(414, f"query string longer than {MAX_QUERY} characters")
    return None


def _guard(service: DicomwebService) -> Any:
    @web.middleware
    async def guard(request: web.Request, handler: Callable[..., Awaitable[Any]]) -> Any:
        refused = _guard_refusal(request, service)
        return refused if refused is not None else await handler(request)

    return guard


async def _secured(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every answer of the listener gets guard.security_headers,
    the refusals and aiohttp's own error pages included (a middleware would miss those
    raised as exceptions)."""
    security_headers(response.headers)


async def _unsent_body(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the answer to an upload refused before its body was sent
    (`KEY_REFUSED_UNSENT`) closes the connection, whoever gives it (the guard, the
    handler, `_bounded`): what the client sends next is not that body (RFC 9110 10.1.1)."""
    if KEY_REFUSED_UNSENT in request:
        response.force_close()  # the connection ends after this answer ...
        response.headers["Connection"] = "close"  # ... and it says so (set before the hook)


def _bounded(service: DicomwebService) -> Any:
    """At most `service.max_requests` requests in progress (503 beyond, with Retry-After):
    memory, threads and agent streams stay bounded whatever a local client sends."""

    @web.middleware
    async def bounded(request: web.Request, handler: Callable[..., Awaitable[Any]]) -> Any:
        if service.in_progress >= service.max_requests:
            service.requests_refused += 1
            return _busy(f"more than {service.max_requests} requests in progress")
        service.in_progress += 1
        try:
            response = await handler(request)
            if not response.prepared:  # a whole body (frames, bulk, rendered, JSON)
                await _send_whole(request, response)
            return response
        finally:
            service.in_progress -= 1

    return bounded


async def _send_whole(request: web.Request, response: web.StreamResponse) -> None:
    """Send an answer that is not streamed (headers and body) here, within the write
    timeout, as `_write` does for streamed ones: left to aiohttp after the handler, a
    client that stops reading a large frames or bulk answer held its connection and the
    body's memory for ever, uncounted in `max_requests`."""
    try:
        async with asyncio.timeout(_service(request).write_timeout):
            await response.prepare(request)
            await response.write_eof()
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()
        raise ConnectionResetError("the client stopped reading") from None


def _busy(message: str, retry_after: int = RETRY_AFTER) -> web.Response:
    response = _text(503, message)
    response.headers["Retry-After"] = str(retry_after)
    return response


def _metered(service: DicomwebService) -> Any:
    @web.middleware
    async def metered(request: web.Request, handler: Callable[..., Awaitable[Any]]) -> Any:
        started = time.monotonic()
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "other"
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            service.metrics.observe(route, status, time.monotonic() - started)

    return metered


# -- helpers ----------------------------------------------------------------------------


def _uid(request: web.Request, name: str) -> str:
    value = request.match_info[name]
    if not is_uid(value):
        raise web.HTTPBadRequest(text=f"{name}: not a UID\n")
    return value


def _service(request: web.Request) -> DicomwebService:
    service = request.app[KEY_SERVICE]
    assert isinstance(service, DicomwebService)
    return service


def _upstream(exc: UpstreamError) -> web.Response:
    """The answer to a failed operation: its reason goes to the client (the local viewer)
    but never to a log: it may quote the PACS's ErrorComment, which may name a patient.
    Log `exc.http_status` and a fixed text instead. 503 (busy, offline) says when to try
    again: the error's own `retry_after` if it knows (offline: the next reconnect)."""
    if exc.http_status == 503:
        return _busy(exc.reason, exc.retry_after or RETRY_AFTER)
    return _text(exc.http_status, exc.reason)


def _host(request: web.Request) -> str:
    """Our host as the client named it (checked: a loopback name), for a Warning's agent."""
    return request.headers.get("Host", "") or "dmz-relay"


def _base(request: web.Request) -> str:
    """Our DICOMweb root as the client named it (the Host was checked: a loopback name),
    with our own address when the client left the port out."""
    host = request.headers.get("Host", "")
    if host.rpartition(":")[2].isdigit():
        return f"http://{host}{PREFIX}"
    return _service(request).base_url


async def _write(request: web.Request, response: web.StreamResponse, data: bytes | None) -> None:
    """Write part of a streamed answer (None: its end). A client that reads nothing for
    `write_timeout` seconds loses its connection: its handler, and the series memory the
    answer holds (counted against hold_size meanwhile), must not wait forever."""
    try:
        async with asyncio.timeout(_service(request).write_timeout):
            if data is None:
                await response.write_eof()
            else:
                await response.write(data)
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()
        raise ConnectionResetError("the client stopped reading") from None


async def _head_answered(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """A HEAD's streamed answer ends with its headers (the GET's status and Content-Type):
    aiohttp sends no chunked framing for HEAD, so each part written would go out raw
    after them, and a keep-alive client would read it as its next answer."""
    await _write(request, response, None)
    return response


def _accept(request: web.Request) -> list[media.MediaRange]:
    """The request's Accept: the `accept` query parameter (PS3.18 8.3.3.1) in place of
    the header when given: a viewer that cannot set the header (cornerstone's loader
    always sends `transfer-syntax=*`) asks for HTJ2K by URL. A `+` left unencoded in it
    (`application/dicom+json`) was read as a space, which no media range has between
    two characters of a token: it is put back."""
    given = request.query.get("accept")
    try:
        if given:
            return media.parse_accept(_PLUS_READ_AS_SPACE.sub("+", given))
        return media.parse_accept(request.headers.get("Accept"))
    except media.AcceptTooLong as exc:
        raise web.HTTPBadRequest(text=f"{exc}\n") from None


def _not_json(request: web.Request) -> web.Response | None:
    """The 406 for a QIDO-RS or metadata request that does not accept DICOM JSON, before
    anything is asked of the PACS; None: JSON it is."""
    if media.accepts_json(_accept(request)):
        return None
    return _text(406, "answered as application/dicom+json only (no XML)")


def _json_response(body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=json.dumps(body).encode(), content_type=DICOM_JSON,
                        headers=headers)  # fmt: skip


async def _series_of_study(service: DicomwebService, study: str) -> list[str]:
    ident = Dataset()
    ident.QueryRetrieveLevel = "SERIES"
    ident.StudyInstanceUID = study
    ident.SeriesInstanceUID = None
    ident.SeriesNumber = None
    found = await service.source.find(ident, qido.MAX_LIMIT)
    if found.truncated:  # never a study answered as complete without some of its series
        raise UpstreamError(507, f"the study has more than {qido.MAX_LIMIT} series: not "
                                 "answered whole (retrieve it series by series)")  # fmt: skip
    uids = [str(ds.get("SeriesInstanceUID", "") or "") for ds in found.matches]

    def number(ds: Dataset) -> int:
        try:
            return int(ds.get("SeriesNumber") or 0)
        except (TypeError, ValueError):
            return 0

    order = sorted(range(len(uids)), key=lambda i: number(found.matches[i]))
    return [uids[i] for i in order if is_uid(uids[i])]


async def _flights(
    service: DicomwebService, study: str, series: str | None
) -> AsyncIterator[SeriesFlight]:
    uids = [series] if series is not None else await _series_of_study(service, study)
    for uid in uids:
        yield await service.retriever.series(study, uid)


async def _instances(
    service: DicomwebService, study: str, series: str | None, sop: str | None
) -> AsyncGenerator[SeriesItem, None]:
    async for flight in _flights(service, study, series):
        if sop is not None:
            item = await flight.get(sop)
            if item is not None:
                yield item
            return
        # closed at once when the answer ends: the flight counts its readers' memory
        async with contextlib.aclosing(flight.instances()) as items:
            async for item in items:
                yield item


async def _in_thread(slots: asyncio.Semaphore, work: Callable[..., T], *args: Any) -> T:
    """`work(*args)` in a worker thread, holding one of `slots` until the thread ends:
    a handler cancelled (its client gone) stops waiting, but the thread runs on, and
    releasing its slot then would let more than the bound run at once (each HTJ2K
    encoding or STOW check may hold a large buffer)."""
    await slots.acquire()
    try:
        running = asyncio.ensure_future(asyncio.to_thread(work, *args))
    except BaseException:
        slots.release()
        raise
    running.add_done_callback(_released(slots))
    return await asyncio.shield(running)


def _released(slots: asyncio.Semaphore) -> Callable[[asyncio.Future[Any]], None]:
    def done(running: asyncio.Future[Any]) -> None:
        slots.release()
        if not running.cancelled():
            running.exception()  # retrieved: no warning when nobody waits any more

    return done


async def _first(it: AsyncIterator[SeriesItem]) -> SeriesItem | None:
    try:
        return await it.__anext__()
    except StopAsyncIteration:
        return None


def _what(series: str | None, sop: str | None) -> str:
    return "instance" if sop else "series" if series else "study"


# -- QIDO-RS ------------------------------------------------------------------------------


def _qido(level: str, path_uids: Iterable[tuple[str, str]]) -> Any:
    async def handler(request: web.Request) -> web.StreamResponse:
        service = _service(request)
        uids = {keyword: _uid(request, name) for name, keyword in path_uids}
        refused = _not_json(request)
        if refused is not None:
            return refused
        params = [(k, v) for k, v in request.query.items() if k not in ANSWER_PARAMS]
        try:
            query = parse_query(level, params, uids)
        except QueryError as exc:
            return _text(400, str(exc))
        try:
            found = await service.source.find(query.identifier, query.limit, skip=query.offset)
        except UpstreamError as exc:
            return _upstream(exc)
        headers: dict[str, str] = {}
        warnings = list(query.warnings)
        if found.from_cache:
            warnings.append('299 relay "answered from the cache: the relay link is down"')
        if found.truncated and query.at_maximum:
            warnings.append(f"299 {_host(request)} {qido.CUT_WARNING}")
        if warnings:
            headers["Warning"] = ", ".join(warnings)
        page = found.matches
        if not page:
            return web.Response(status=204, headers=headers)
        body = await asyncio.to_thread(dicomjson.to_json_list, page)
        return _json_response(body, headers)

    return handler


# -- WADO-RS -----------------------------------------------------------------------------


def _retrieve(with_series: bool, with_sop: bool) -> Any:
    async def handler(request: web.Request) -> web.StreamResponse:
        service = _service(request)
        study = _uid(request, "study")
        series = _uid(request, "series") if with_series else None
        sop = _uid(request, "instance") if with_sop else None
        ranges = _accept(request)
        if not media.negotiable(ranges, True, INSTANCE_PARTS):  # before any retrieval
            return _text(406, NO_INSTANCE_ANSWER)
        it = _instances(service, study, series, sop)
        try:  # closed at once, whatever happens: a flight counts its readers' memory
            return await _answer_instances(request, it, ranges, series, sop)
        finally:
            await it.aclose()

    return handler


async def _answer_instances(
    request: web.Request,
    it: AsyncIterator[SeriesItem],
    ranges: list[media.MediaRange],
    series: str | None,
    sop: str | None,
) -> web.StreamResponse:
    """The WADO-RS multipart answer, instance by instance as `it` brings them (each one's
    bytes loaded before its part begins: a cached file that cannot be read cuts it)."""
    try:
        first = await _first(it)
        data = await first.load() if first is not None else b""
    except UpstreamError as exc:
        return _upstream(exc)
    if first is None:
        return _text(404, f"no such {_what(series, sop)}")
    try:
        part = media.negotiate(ranges, True, INSTANCE_PARTS, first.transfer_syntax)
    except media.AcceptError as exc:
        return _text(406, str(exc))
    boundary = media.new_boundary()
    response = web.StreamResponse(headers={"Content-Type": media.multipart_type(boundary, part)})
    response.enable_chunked_encoding()
    await response.prepare(request)
    if request.method == "HEAD":
        return await _head_answered(request, response)
    item: SeriesItem | None = first
    while item is not None:
        if item is not first:
            try:  # the first instance's syntax was accepted; each must be
                media.negotiate(ranges, True, INSTANCE_PARTS, item.transfer_syntax)
            except media.AcceptError:
                log.warning("an instance in %s, which the client did not accept: answer "
                            "cut", item.transfer_syntax)  # fmt: skip
                response.force_close()
                raise ConnectionResetError("transfer syntax not accepted") from None
        ctype = media.part_type_with_ts(part, item.transfer_syntax)
        await _write(request, response, media.part_head(boundary, ctype))
        wrapped = part10.wrap(item.sop_class, item.sop_instance, item.transfer_syntax, data)
        await _write(request, response, wrapped)
        del wrapped
        try:
            item = await _first(it)
            data = await item.load() if item is not None else b""
        except UpstreamError as exc:
            # Nothing half-received is served as complete: no closing delimiter.
            log.warning("retrieval failed mid-answer (%d)", exc.http_status)  # _upstream
            response.force_close()
            raise ConnectionResetError("failed mid-answer") from None  # no reason: logged
    await _write(request, response, media.closing(boundary))
    await _write(request, response, None)
    return response


def _metadata_of(
    item: SeriesItem, data: bytes, base: str, study: str, series: str
) -> dict[str, Any]:
    ds = decode(data, item.transfer_syntax)
    url = f"{base}/studies/{study}/series/{series}/instances/{item.sop_instance}"
    return dicomjson.to_json(ds, bulk_base=url)


async def _headers_first(
    service: DicomwebService, study: str, series: str, base: str
) -> web.Response | None:
    """A series' metadata from its headers-only retrieval, if that completes before the
    series flight ends; None: answer from the flight (cached, held, or headers failed)."""
    headfirst = service.headfirst
    if headfirst is None:
        return None
    try:
        flight = await service.retriever.series(study, series)
    except UpstreamError:
        return None  # the flight path answers with the same error
    await flight.decided()
    if flight.done:
        return None  # from the cache, or held
    headers = headfirst.start(study, series)
    if headers is None:
        return None
    waits = [asyncio.ensure_future(headers.wait()), asyncio.ensure_future(flight.finished())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
    if not headers.complete:
        return None
    items = list(headers.items)

    def docs() -> bytes:
        return json.dumps([_metadata_of(i, i.data, base, study, series) for i in items]).encode()

    body = await asyncio.to_thread(docs)
    headfirst.answered += 1
    return web.Response(body=body, content_type=DICOM_JSON)


def _metadata(with_series: bool, with_sop: bool) -> Any:
    async def handler(request: web.Request) -> web.StreamResponse:
        service = _service(request)
        study = _uid(request, "study")
        series = _uid(request, "series") if with_series else None
        sop = _uid(request, "instance") if with_sop else None
        refused = _not_json(request)
        if refused is not None:
            return refused
        base = _base(request)
        if series is not None and sop is None:
            early = await _headers_first(service, study, series, base)
            if early is not None:
                return early
        response: web.StreamResponse | None = None
        try:
            async for flight in _flights(service, study, series):
                items: AsyncIterator[SeriesItem] | list[SeriesItem]
                if sop is not None:
                    found = await flight.get(sop)
                    items = [found] if found is not None else []
                else:
                    items = flight.instances()
                async for item in _aiter(items):
                    data = await item.load()
                    doc = await asyncio.to_thread(_metadata_of, item, data, base, study,
                                                  flight.series)  # fmt: skip
                    del data
                    if response is None:
                        response = web.StreamResponse(headers={"Content-Type": DICOM_JSON})
                        response.enable_chunked_encoding()
                        await response.prepare(request)
                        if request.method == "HEAD":
                            return await _head_answered(request, response)
                        await _write(request, response, b"[")
                    else:
                        await _write(request, response, b",")
                    await _write(request, response, json.dumps(doc).encode())
        except UpstreamError as exc:
            if response is None:
                return _upstream(exc)
            log.warning("metadata failed mid-answer (%d)", exc.http_status)  # _upstream
            response.force_close()
            raise ConnectionResetError("failed mid-answer") from None  # no reason: logged
        if response is None:
            return _text(404, f"no such {_what(series, sop)}")
        await _write(request, response, b"]")
        await _write(request, response, None)
        return response

    return handler


async def _aiter(
    items: AsyncIterator[SeriesItem] | list[SeriesItem],
) -> AsyncIterator[SeriesItem]:
    if isinstance(items, list):
        for item in items:
            yield item
    else:
        async for item in items:
            yield item


async def _one(request: web.Request, *, viewport: bool = False) -> SeriesItem | web.Response:
    """The request's instance; `viewport`: the viewer shows it now, so it may be
    retrieved ahead of its series (retrieve.py, jump ahead)."""
    service = _service(request)
    study, series, sop = (_uid(request, n) for n in ("study", "series", "instance"))
    try:
        flight = await service.retriever.series(study, series)
        if viewport:
            item = await service.retriever.instance(flight, sop)
        else:
            item = await flight.get(sop)
    except UpstreamError as exc:
        return _upstream(exc)
    if item is None:
        return _text(404, "no such instance")
    return item


async def _decoded(item: SeriesItem) -> Dataset | web.Response:
    """The item's dataset (its bytes loaded: read from the cache if need be), or the 502."""
    try:
        data = await item.load()
    except UpstreamError as exc:
        return _upstream(exc)
    return await asyncio.to_thread(decode, data, item.transfer_syntax, item.fragments)


async def frames_handler(request: web.Request) -> web.StreamResponse:
    try:
        numbers = frames.frame_numbers(request.match_info["frames"])
    except ValueError as exc:
        return _text(400, f"frames: {exc}")
    ranges = _accept(request)
    if not htj2k.satisfiable(ranges, one_frame=len(numbers) == 1):  # before any retrieval
        return _text(406, NO_FRAMES_ANSWER)
    item = await _one(request, viewport=byterange.first_chunk(request.headers.get("Range")))
    if isinstance(item, web.Response):
        return item
    ds = await _decoded(item)
    if isinstance(ds, web.Response):
        return ds
    # Uncompressed pixel data (big endian and encapsulated uncompressed included) comes out
    # of get_frames as little-endian values: served as Explicit VR LE, or HTJ2K from them.
    served = frames.frame_syntax(item.transfer_syntax)
    native = frames.uncompressed(item.transfer_syntax)
    try:
        frames.check(ds, item.transfer_syntax)
        choice = htj2k.choose(ranges, media.frame_media_type(served), served, native,
                              htj2k.encodable(ds), one_frame=len(numbers) == 1)  # fmt: skip
    except (frames.Unservable, media.AcceptError) as exc:
        return _text(406, str(exc))
    if choice.encode_to is not None and len(numbers) > htj2k.MAX_FRAMES:
        return _text(400, f"frames: at most {htj2k.MAX_FRAMES} per HTJ2K request")
    service = _service(request)
    if choice.single and choice.encode_to is not None:
        key = (item.sop_instance, numbers[0], choice.encode_to)

        async def encode() -> bytes:
            [raw] = await asyncio.to_thread(frames.get_frames, ds, item.transfer_syntax,
                                            numbers)  # fmt: skip
            [stream] = await _in_thread(service.encoders, htj2k.encode_frames, ds, [raw])
            service.frames_encoded += 1
            return stream

        try:
            codestream = await service.codestreams.obtain(key, encode)
        except frames.FrameError as exc:
            return _text(404, str(exc))
        except frames.Unservable as exc:
            return _text(406, str(exc))
        except htj2k.Unsupported as exc:
            return _text(406, f"cannot serve HTJ2K: {exc}")
        return _codestream_answer(request, service, codestream, choice.encode_to)

    def cut() -> list[bytes]:
        return frames.get_frames(ds, item.transfer_syntax, numbers)

    try:
        chunks = await asyncio.to_thread(cut)
    except frames.FrameError as exc:
        return _text(404, str(exc))
    except frames.Unservable as exc:
        return _text(406, str(exc))
    ts = served
    if choice.encode_to is not None:
        try:
            chunks = await _in_thread(service.encoders, htj2k.encode_frames, ds, chunks)
        except htj2k.Unsupported as exc:
            return _text(406, f"cannot serve HTJ2K: {exc}")
        service.frames_encoded += len(chunks)
        ts = choice.encode_to
    boundary = media.new_boundary()
    part = choice.part_type
    ctype = media.part_type_with_ts(part, ts)
    head = media.part_head(boundary, ctype)
    body = b"".join([*(piece for chunk in chunks for piece in (head, chunk)),
                     media.closing(boundary)])  # fmt: skip
    return web.Response(body=body,
                        headers={"Content-Type": media.multipart_type(boundary, part)})  # fmt: skip


def _codestream_answer(request: web.Request, service: DicomwebService, codestream: bytes,
                       syntax: str) -> web.Response:  # fmt: skip
    """One frame's bare codestream: the whole (200) or the one byte range asked (206),
    416 for a range past its end (byterange.py)."""
    total = len(codestream)
    headers = {
        "Content-Type": media.part_type_with_ts(htj2k.MEDIA_TYPE, syntax),
        "Accept-Ranges": "bytes",
        "ETag": '"' + hashlib.blake2b(codestream, digest_size=12).hexdigest() + '"',
        "Vary": "Accept",
    }
    try:
        wanted = byterange.parse_range(request.headers.get("Range"), total)
    except byterange.Unsatisfiable:
        service.frame_ranges_refused += 1
        return web.Response(status=416, text=f"the frame has {total} bytes\n",
                            headers={"Content-Range": f"bytes */{total}"})  # fmt: skip
    if wanted is None:
        service.frames_whole += 1
        return web.Response(body=codestream, headers=headers)
    first, last = wanted
    service.frame_ranges += 1
    headers["Content-Range"] = byterange.content_range(first, last, total)
    return web.Response(status=206, body=codestream[first : last + 1], headers=headers)


async def bulk_handler(request: web.Request) -> web.StreamResponse:
    text = request.match_info["tag"]
    if len(text) != 8 or any(c not in "0123456789abcdefABCDEF" for c in text):
        return _text(400, "tag: expected 8 hex digits")
    ranges = _accept(request)
    if not media.negotiable(ranges, True, BULK_PARTS):  # before any retrieval
        return _text(406, NO_BULK_ANSWER)
    item = await _one(request)
    if isinstance(item, web.Response):
        return item
    tag = int(text, 16)
    try:  # the syntax the parts are in, now that the stored one is known
        part = media.negotiate(ranges, True, BULK_PARTS, _bulk_syntax(tag, item.transfer_syntax))
    except media.AcceptError as exc:
        return _text(406, str(exc))
    ds = await _decoded(item)
    if isinstance(ds, web.Response):
        return ds
    try:
        values = await asyncio.to_thread(_bulk_parts, ds, item.transfer_syntax, tag)
    except (frames.FrameError, frames.Unservable) as exc:
        return _text(406, f"cannot serve the bulk data exactly: {exc}")
    if values is None:
        return _text(404, "no such bulk data")
    boundary = media.new_boundary()
    body = b"".join([*(piece for ctype, value in values
                       for piece in (media.part_head(boundary, ctype), value)),
                     media.closing(boundary)])  # fmt: skip
    return web.Response(body=body, headers={"Content-Type": media.multipart_type(boundary, part)})


def _bulk_syntax(tag: int, ts: str) -> str:
    """The transfer syntax a bulk value is answered in (`_bulk_parts`): Explicit VR LE
    for uncompressed values, compressed Pixel Data as stored."""
    return frames.frame_syntax(ts) if tag == dicomjson.PIXEL_DATA else media.EXPLICIT_LE


def _bulk_parts(ds: Dataset, ts: str, tag: int) -> list[tuple[str, frames.Octets]] | None:
    """A bulk value's parts (content type, bytes) as PS3.18 8.7.3.3 has them: uncompressed
    data little endian (Pixel Data in one part, Explicit VR LE), compressed Pixel Data one
    part per frame in its stored syntax, without fragment delimiters; None: no such value."""
    value = dicomjson.bulk_value(ds, tag)
    if value is None:
        return None
    octets = "application/octet-stream"
    if tag != dicomjson.PIXEL_DATA:
        return [(octets, frames.little_endian(ds, tag, value, ts))]
    if frames.uncompressed(ts):
        ctype = media.part_type_with_ts(octets, frames.frame_syntax(ts))
        return [(ctype, frames.native_pixels(ds, ts))]
    count = int(ds.get("NumberOfFrames", 1) or 1)
    ctype = media.part_type_with_ts(octets, ts)
    return [(ctype, f) for f in frames.get_frames(ds, ts, list(range(1, count + 1)))]


def _render_type(request: web.Request) -> str | None:
    """image/jpeg or image/png from the Accept header (JPEG for anything); None: 406."""
    from relay.workstation.dicomweb import render

    ranges = _accept(request)
    for r in media.acceptable(ranges):
        if r.type in render.FORMATS:
            named: tuple[str, ...] = (r.type,)
        elif r.type in ("*/*", "image/*"):
            named = ("image/jpeg", "image/png")
        else:
            continue
        for media_type in named:
            if media.quality(ranges, media_type) > 0:  # `image/jpeg;q=0, */*`: PNG
                return media_type
    return None


async def _pick_frame(
    request: web.Request, level: str, frame_in_path: bool
) -> tuple[SeriesItem, int] | web.Response:
    """The instance and frame a rendered answer shows: the one named (instance, frame),
    else the middle image of the series, else of the study's first series with one."""
    from relay.workstation.dicomweb import thumbs

    if level == "instance":
        number = 1
        if frame_in_path:
            try:
                numbers = frames.frame_numbers(request.match_info["frames"])
            except ValueError as exc:
                return _text(400, f"frames: {exc}")
            if len(numbers) != 1:
                return _text(400, "frames: one frame is rendered at a time")
            number = numbers[0]
        item = await _one(request)
        return item if isinstance(item, web.Response) else (item, number)
    service = _service(request)
    study = _uid(request, "study")
    series = _uid(request, "series") if level == "series" else None
    tried = 0
    try:
        async for flight in _flights(service, study, series):
            images: list[tuple[SeriesItem, int, int]] = []
            async with contextlib.aclosing(flight.instances()) as items:
                async for item in items:  # one instance's bytes at a time (a cached series)
                    data = await item.load()
                    found = await asyncio.to_thread(thumbs.image_of, data, item.transfer_syntax)
                    if found is not None:
                        images.append((item, *found))
            chosen = thumbs.middle_frame(images)
            if chosen is not None:
                return chosen
            tried += 1
            if tried >= thumbs.MAX_SERIES_TRIED:
                break
    except UpstreamError as exc:
        return _upstream(exc)
    if tried == 0:
        return _text(404, f"no such {level}")
    return _text(404, f"the {level} has no image to render")


def _rendered(level: str, frame_in_path: bool = False, thumbnail: bool = False) -> Any:
    async def handler(request: web.Request) -> web.StreamResponse:
        from relay.workstation.dicomweb import render, thumbs

        try:
            size = render.viewport(request.query.get("viewport"))
        except ValueError as exc:
            return _text(400, f"viewport: {exc}")
        try:
            jpeg_quality = render.quality(request.query.get("quality"))
        except ValueError as exc:
            return _text(400, f"quality: {exc}")
        if size is None and thumbnail:
            size = thumbs.DEFAULT_THUMBNAIL
        chosen = _render_type(request)
        if chosen is None:
            return _text(406, "rendered frames are image/jpeg or image/png")
        picked = await _pick_frame(request, level, frame_in_path)
        if isinstance(picked, web.Response):
            return picked
        item, number = picked
        ds = await _decoded(item)
        if isinstance(ds, web.Response):
            return ds
        try:  # CPU-bound: at most as many at once as HTJ2K encodings, sharing their slots
            body = await _in_thread(_service(request).encoders, render.render_frame, ds,
                                    number, chosen, size, jpeg_quality)  # fmt: skip
        except render.RenderError as exc:
            return _text(404 if "past the last" in str(exc) else 406, str(exc))
        return web.Response(body=body, content_type=chosen)

    return handler


# -- STOW-RS ------------------------------------------------------------------------------


class _TooLarge(Exception):
    pass


async def _read_part(part: BodyPartReader, budget: list[int], pace: UploadPace) -> bytes:
    """A part's bytes, each read within the upload's pace (a client that stops sending,
    or trickles, must not hold its request and an upload slot for ever)."""
    out = bytearray()
    while chunk := await pace.read(lambda: part.read_chunk(256 * 1024)):
        budget[0] -= len(chunk)
        if budget[0] < 0:
            raise _TooLarge
        out += chunk
    return bytes(out)


def _check_stow_part(
    dataset: bytes, ts: str, sop_class: str, sop_instance: str, *, study: str | None, limit: int
) -> int | None:
    """None if the part may be stored, else its FailureReason (PS3.18 10.5.3.1): one walk
    of the dataset (a deflated one inflated once, within `limit`) checks its structure and
    SOP UIDs and finds its study. CPU-bound: run in a thread."""
    try:
        seen = rawds.check_instance(dataset, ts, sop_class, sop_instance,
                                    max_inflated=limit, capture=_STOW_CAPTURE)  # fmt: skip
    except rawds.InflatedTooLarge:
        return st.STORE_OUT_OF_RESOURCES
    except Exception:
        return st.STORE_CANNOT_UNDERSTAND
    if study is not None and seen.get("study", "") != study:
        return STOW_WRONG_STUDY
    return None


async def _check_part(
    service: DicomwebService,
    dataset: bytes,
    ts: str,
    sop_class: str,
    sop_instance: str,
    *,
    study: str | None,
) -> int | None:
    """_check_stow_part off the event loop, at most STOW_CHECKS at once (each may inflate
    up to max_upload bytes)."""
    check = functools.partial(_check_stow_part, dataset, ts, sop_class, sop_instance,
                              study=study, limit=service.max_upload)  # fmt: skip
    return await _in_thread(service.stow_checks, check)


def _short(exc: Exception) -> str:
    """An exception's text for an answer: one line, at most 200 characters (aiohttp's
    header errors quote the offending line)."""
    text = str(exc).replace("\r", " ").replace("\n", " ")
    return text if len(text) <= 200 else text[:200] + "..."


def _is_dicom_part(content_type: str) -> bool:
    """A part of DICOM (PS3.18 10.5: `application/dicom`, parameters aside): the prefix
    test took `application/dicom+json` and `+xml` metadata parts for Part 10 files."""
    return content_type.split(";", 1)[0].strip().lower() == "application/dicom"


def _stow_item(sop_class: str, sop_instance: str, **extra: Any) -> Dataset:
    ds = Dataset()
    ds.ReferencedSOPClassUID = sop_class
    ds.ReferencedSOPInstanceUID = sop_instance
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return ds


def _stow_refusal(request: web.Request, service: DicomwebService) -> web.Response | None:
    """An upload's refusal from its request line and headers alone (nothing of its body
    read), or None."""
    if "study" in request.match_info and not is_uid(request.match_info["study"]):
        return _text(400, "study: not a UID")
    if service.stow_uploads >= STOW_UPLOADS:
        return _busy(f"more than {STOW_UPLOADS} uploads (STOW-RS) at once")
    length = request.content_length
    if length is not None and length > service.max_upload:
        return _text(413, f"upload larger than dicomweb.max_upload ({service.max_upload} bytes)")
    ctype = request.headers.get("Content-Type", "")
    if not ctype.lower().startswith("multipart/related"):
        return _text(415, 'STOW-RS takes multipart/related; type="application/dicom"')
    return None


async def stow_expect(request: web.Request) -> None:
    """`Expect: 100-continue` (curl's uploads over 1 MB): `100 Continue` only to an upload
    that will be taken. One refused from its headers gets the refusal alone (the handler
    answers it), and the client sends no body; aiohttp's default said 100 Continue to
    every upload, and then read and discarded the refused body for up to 10 s."""
    if request.version != HttpVersion11:
        return  # no 100 Continue in HTTP/1.0
    expect = request.headers.get("Expect", "")
    if expect.lower() != "100-continue":
        raise web.HTTPExpectationFailed(text=f"Expect: only 100-continue, got {expect[:40]!r}\n")
    service = _service(request)
    refused = _guard_refusal(request, service)
    if refused is None:
        refused = _stow_refusal(request, service)
    if refused is None:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # as aiohttp's: the answer has not begun
    else:  # answered as decided here (no body comes), and the connection closed
        request[KEY_REFUSED_UNSENT] = refused


async def stow_handler(request: web.Request) -> web.StreamResponse:
    service = _service(request)
    refused = request.get(KEY_REFUSED_UNSENT)  # no 100 Continue: the client sends no body
    if refused is None:
        refused = _stow_refusal(request, service)
    if refused is not None:
        return refused
    service.stow_uploads += 1
    try:
        return await _stow(request, service)
    finally:
        service.stow_uploads -= 1


async def _stow(request: web.Request, service: DicomwebService) -> web.StreamResponse:
    study = _uid(request, "study") if "study" in request.match_info else None
    try:
        reader = MultipartReader(request.headers, request.content)
    except (AssertionError, ValueError) as exc:
        return _text(400, f"Content-Type: {exc}")
    budget = [service.max_upload]
    body = request.content  # its bytes so far: the pace's count (stowpace.py)
    pace = UploadPace(service.write_timeout, service.stow_min_rate,
                      arrived=lambda: body.total_bytes)  # fmt: skip
    referenced: list[Dataset] = []
    failed: list[Dataset] = []
    upstream: list[str] = []
    parts = 0

    def refuse_rest(code: int, text: str, reason: int) -> web.StreamResponse:
        """The request goes wrong part way: before anything was stored, `code`; after,
        what was stored and failed so far (202), the rest refused in a Warning header."""
        if not referenced:
            return _text(code, text)
        failed.append(_stow_item("", "", FailureReason=reason))
        return _stow_answer(request, study, referenced, failed, warning=text)

    try:
        while True:
            part = await pace.read(reader.next)
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                return refuse_rest(
                    400, "nested multipart bodies are not supported", st.STORE_CANNOT_UNDERSTAND
                )
            parts += 1
            if parts > MAX_STOW_PARTS:
                return refuse_rest(
                    413, f"more than {MAX_STOW_PARTS} parts", st.STORE_OUT_OF_RESOURCES
                )
            if not _is_dicom_part(part.headers.get("Content-Type", "application/dicom")):
                return refuse_rest(
                    415, "only application/dicom parts are accepted", st.STORE_CANNOT_UNDERSTAND
                )
            data = await _read_part(part, budget, pace)
            try:
                meta, offset = part10.split(data)
            except part10.Part10Error as exc:
                failed.append(_stow_item("", "", FailureReason=st.STORE_CANNOT_UNDERSTAND))
                log.info("STOW part refused: %s", exc)
                continue
            sop_class, sop_instance = meta[0x00020002], meta[0x00020003]
            ts = meta[0x00020010]
            dataset = data[offset:]
            refused = await _check_part(service, dataset, ts, sop_class, sop_instance, study=study)
            if refused is not None:
                failed.append(_stow_item(sop_class, sop_instance, FailureReason=refused))
                continue
            try:
                final = await service.source.store(sop_class, sop_instance, ts, dataset)
            except UpstreamError as exc:
                upstream.append(exc.reason)
                failed.append(_stow_item(sop_class, sop_instance,
                                         FailureReason=st.STORE_OUT_OF_RESOURCES))  # fmt: skip
                continue
            status = st.for_store(final.status)
            if status == st.SUCCESS or 0xB000 <= status <= 0xBFFF:
                extra: dict[str, Any] = {}
                if status != st.SUCCESS:
                    extra["WarningReason"] = status
                referenced.append(_stow_item(sop_class, sop_instance, **extra))
            else:
                if final.status in (st.PACS_UNREACHABLE, st.PACS_NO_RESPONSE, st.LINK_LOST):
                    upstream.append(final.comment or f"status 0x{final.status:04X}")
                failed.append(_stow_item(sop_class, sop_instance, FailureReason=status))
    except _TooLarge:
        too_large = f"upload larger than dicomweb.max_upload ({service.max_upload} bytes)"
        return refuse_rest(413, too_large, st.STORE_OUT_OF_RESOURCES)
    except (UploadStalled, UploadTooSlow) as exc:
        slow = isinstance(exc, UploadTooSlow)
        service.metrics.cut_upload("too_slow" if slow else "stalled")
        cut = str(exc) if slow else f"the upload stalled: {exc}"
        answer = refuse_rest(408, cut, st.STORE_OUT_OF_RESOURCES)
        # the connection ends after the answer: what is left of the body is never read as
        # a request (aiohttp reads and drops it for at most its lingering time, 10 s)
        answer.force_close()
        return answer
    except (ValueError, HttpProcessingError) as exc:  # aiohttp's part header parser: the latter
        return refuse_rest(400, f"malformed multipart body: {_short(exc)}",
                           st.STORE_CANNOT_UNDERSTAND)  # fmt: skip
    except RequestPayloadError as exc:  # the body itself: a Content-Encoding that does not
        # decode, a broken chunked framing (it was a 500); the rest cannot be read
        answer = refuse_rest(400, f"malformed request body: {_short(exc)}",
                             st.STORE_CANNOT_UNDERSTAND)  # fmt: skip
        answer.force_close()
        return answer
    if not referenced and not failed:
        return _text(400, "no instances in the request")
    if not referenced and failed and len(upstream) == len(failed):
        return _text(502, f"the PACS could not be reached: {upstream[0]}")
    return _stow_answer(request, study, referenced, failed)


def _stow_answer(
    request: web.Request,
    study: str | None,
    referenced: list[Dataset],
    failed: list[Dataset],
    warning: str = "",
) -> web.Response:
    """PS3.18 10.5.3: 200 all stored, 202 some, 409 none; the store instances response."""
    doc = Dataset()
    if study is not None:
        doc.RetrieveURL = f"{_base(request)}/studies/{study}"
    if referenced:
        doc.ReferencedSOPSequence = referenced
    if failed:
        doc.FailedSOPSequence = failed
    status_code = 200 if not failed else 202 if referenced else 409
    body = dicomjson.to_json(doc)
    headers = {"Warning": f'299 dmz-relay "{warning}"'} if warning else None
    return web.Response(status=status_code, body=json.dumps(body).encode(),
                        content_type=DICOM_JSON, headers=headers)  # fmt: skip


# -- the application ------------------------------------------------------------------------


def _routes(app: web.Application) -> None:
    s = f"{PREFIX}/studies/{{study}}"
    se = f"{s}/series/{{series}}"
    i = f"{se}/instances/{{instance}}"
    get = app.router.add_get
    get(f"{PREFIX}/studies", _qido("STUDY", ()))
    get(f"{PREFIX}/series", _qido("SERIES", ()))
    get(f"{PREFIX}/instances", _qido("IMAGE", ()))
    get(f"{s}/series", _qido("SERIES", (("study", "StudyInstanceUID"),)))
    get(f"{s}/instances", _qido("IMAGE", (("study", "StudyInstanceUID"),)))
    get(f"{se}/instances", _qido("IMAGE", (("study", "StudyInstanceUID"),
                                            ("series", "SeriesInstanceUID"))))  # fmt: skip
    get(s, _retrieve(False, False))
    get(se, _retrieve(True, False))
    get(i, _retrieve(True, True))
    get(f"{s}/metadata", _metadata(False, False))
    get(f"{se}/metadata", _metadata(True, False))
    get(f"{i}/metadata", _metadata(True, True))
    get(f"{i}/frames/{{frames}}", frames_handler)
    get(f"{i}/bulk/{{tag}}", bulk_handler)
    for base, level in ((s, "study"), (se, "series"), (i, "instance")):
        get(f"{base}/rendered", _rendered(level))
        get(f"{base}/thumbnail", _rendered(level, thumbnail=True))
    get(f"{i}/frames/{{frames}}/rendered", _rendered("instance", frame_in_path=True))
    get(f"{i}/frames/{{frames}}/thumbnail", _rendered("instance", True, thumbnail=True))
    app.router.add_post(f"{PREFIX}/studies", stow_handler, expect_handler=stow_expect)
    app.router.add_post(s, stow_handler, expect_handler=stow_expect)


def build_app(
    service: DicomwebService, extra_routes: Iterable[ExtraRoutes] = ()
) -> web.Application:
    """The web application: guards and metrics on every route, DICOMweb under PREFIX,
    then each of `extra_routes(app)` (the viewer)."""
    app = web.Application(
        middlewares=[_metered(service), _bounded(service), _guard(service)],  # refusals counted
        client_max_size=1024 * 1024,  # non-streamed bodies; STOW streams within max_upload
    )
    app[KEY_SERVICE] = service
    app.on_response_prepare.append(_secured)
    app.on_response_prepare.append(_unsent_body)
    _routes(app)
    for add in extra_routes:
        add(app)
    return app
