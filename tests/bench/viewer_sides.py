"""The viewer benchmark's two servers for the same browser and the same viewer dist.

- `ViewerFront`: what the radiologist's PC serves when the PACS is reached directly
  (Orthanc's DICOMweb plugin across the WAN): the viewer's dist, locally, with an
  app-config for Orthanc (its documented OHIF settings), and `/dicom-web` passed through
  to the emulated link (same origin for the page, as with the relay; no CORS needed). The
  pass-through streams, so it adds a loopback hop and no buffering.
- `orthanc_dicomweb`: Orthanc with `libOrthancDicomWeb.so`, in a network namespace of its
  own (nothing but lo), holding the same study, reached through an NsForwarder.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import aiohttp
from aiohttp import web

from relay.workstation.viewer.site import ViewerSite
from tests.bench.procs import HOST, BenchError

DICOMWEB_PLUGIN: Final = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
#: What Orthanc's own OHIF plugin configures for its DICOMweb (orthanc-ohif,
#: app-config-system.js): no includefield in QIDO, bulk data through the single-part API.
ORTHANC_OPTIONS: Final[Mapping[str, Any]] = {
    "friendlyName": "Orthanc DICOMweb",
    "qidoSupportsIncludeField": False,
    "singlepart": "bulkdata",
    "acceptHeader": ["multipart/related; type=application/octet-stream; transfer-syntax=*"],
    "omitQuotationForMultipartRequest": True,
}
HOP_HEADERS: Final = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "upgrade"}
)


class ViewerFront:
    """The viewer dist + a streaming pass-through of /dicom-web to `upstream` (host:port),
    on a loop in a thread of its own."""

    def __init__(self, dist: Path, upstream_port: int, options: Mapping[str, Any]) -> None:
        self.dist = dist
        self.upstream = f"http://{HOST}:{upstream_port}"
        self.options = options
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="viewer-front")
        self._error: BaseException | None = None

    def __enter__(self) -> ViewerFront:
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            raise BenchError(f"the viewer front did not start: {self._error}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        connector = aiohttp.TCPConnector(limit=64)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as client:
            app = web.Application()

            async def passthrough(request: web.Request) -> web.StreamResponse:
                headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
                body = await request.read() if request.can_read_body else None
                url = self.upstream + request.path_qs
                async with client.request(
                    request.method, url, headers=headers, data=body
                ) as upstream:
                    response = web.StreamResponse(status=upstream.status)
                    for key, value in upstream.headers.items():
                        if key.lower() not in HOP_HEADERS:
                            response.headers[key] = value
                    await response.prepare(request)
                    async for chunk in upstream.content.iter_chunked(1 << 16):
                        await response.write(chunk)
                    await response.write_eof()
                    return response

            app.router.add_route("*", "/dicom-web/{tail:.*}", passthrough)
            app.router.add_route("*", "/dicom-web", passthrough)
            ViewerSite(self.dist, options=self.options).add_routes(app)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, HOST, 0)
            await site.start()
            self.port = runner.addresses[0][1]
            self._ready.set()
            await self._stop.wait()
            await runner.cleanup()


@contextlib.contextmanager
def orthanc_dicomweb(workdir: Path, instances: list[Any]) -> Iterator[int]:
    """Orthanc + DICOMweb plugin in its namespace, holding `instances` (EncodedInstance);
    yields the port on this loopback that reaches its HTTP server."""
    from tests.e2e.dicom_chain import NsForwarder
    from tests.interop.harness.netns import NetNS
    from tests.interop.harness.orthanc import Orthanc

    config = {
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "Full",
                     "SeriesMetadata": "Full"},
        "HttpCompressionEnabled": False,
        "KeepAlive": True,
        "HttpThreadsCount": 50,
    }  # fmt: skip
    with NetNS() as ns:
        orthanc = Orthanc(ns, workdir / "orthanc", config_overrides=config, start_timeout=60)
        forwarder = NsForwarder()
        try:
            orthanc.start()
            for instance in instances:
                orthanc.rest("POST", "/instances", body=instance.data)
            forwarder.target(ns, orthanc.http_port)
            yield forwarder.port
        finally:
            forwarder.close()
            orthanc.stop()
