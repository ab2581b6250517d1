"""The OHIF viewer at `/` of the workstation's DICOMweb listener.

Static files from the installed dist (relay.workstation.viewer.install), with:
- our own MIME table (Windows' registry maps .js to text/plain on some PCs, and a
  browser refuses such a module; .wasm must be application/wasm to stream-compile);
- `app-config.js` generated, pointing the viewer at this listener's own DICOMweb;
- the SPA's routes (/viewer?StudyInstanceUIDs=..., /local ...) answered with index.html,
  while a missing asset (a name with a suffix) is a plain 404;
- no directory listing, no path outside the dist (`..`, drive letters, backslashes and
  anything the resolved path does not keep inside the root are 404);
- COOP/COEP (same-origin, require-corp): cross-origin isolation lets OHIF's workers use
  SharedArrayBuffer, and nothing of another origin can be embedded;
- HTML (the page, the install page) with guard.HTML_CSP: `frame-ancestors 'none'`, so
  no other site can frame the viewer (clickjacking); the listener adds nosniff and it to
  every answer, this site's 404s included;
- without a dist: one log line at start and, for every page, a 503 saying how to install
  it. DICOMweb works either way;
- `on_open`: called with the request when the viewer's page is served for a `/viewer`
  route (the warm-up: relay.workstation.viewer.warmup).

The Host check (DNS rebinding) and the loopback binding are the listener's, not ours.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from aiohttp import web

from relay.workstation.dicomweb.guard import HTML_CSP
from relay.workstation.viewer.install import default_viewer_dir, installed_release

__all__ = ["MIME_TYPES", "ViewerSite", "app_config_js"]

log = logging.getLogger(__name__)

MIME_TYPES: Mapping[str, str] = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".webmanifest": "application/manifest+json",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".ico": "image/x-icon",
    ".webp": "image/webp",
    ".woff": "font/woff",
    ".woff2": "font/woff2",
    ".ttf": "font/ttf",
    ".otf": "font/otf",
    ".txt": "text/plain; charset=utf-8",
    ".xml": "application/xml",
    ".onnx": "application/octet-stream",
    ".gz": "application/gzip",
}
FALLBACK_TYPE = "application/octet-stream"
SECURITY_HEADERS: Mapping[str, str] = {
    "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
HTML_HEADERS: Mapping[str, str] = {"Content-Security-Policy": HTML_CSP}  # no framing
NO_CACHE = {"Cache-Control": "no-cache"}  # index.html and app-config.js: always fresh
BAD_CHARACTERS = frozenset('\\:*?"<>|\0')
MAX_PATH = 1024

INSTALL_HINT = "relay viewer install"

MISSING_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>DMZ Relay: viewer not installed</title>
</head><body style="font-family: sans-serif; max-width: 40em; margin: 3em auto">
<h1>The OHIF viewer is not installed</h1>
<p>This workstation has no viewer in <code>{directory}</code>. Install it with</p>
<pre>{hint}</pre>
<p>then reload this page (no restart needed). DICOMweb at <code>{prefix}</code> works
without it.</p>
</body></html>
"""


def data_source(prefix: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The OHIF DICOMweb data source for our server (roots filled in by the page)."""
    configuration: dict[str, Any] = {
        "friendlyName": "DMZ Relay",
        "name": "relay",
        "qidoSupportsIncludeField": True,
        "supportsReject": False,
        "supportsFuzzyMatching": False,
        "supportsWildcard": True,
        "imageRendering": "wadors",
        "thumbnailRendering": "wadors",
        "enableStudyLazyLoad": True,
        "staticWado": False,
        "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
        "omitQuotationForMultipartRequest": True,
    }
    configuration.update(options or {})
    return {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "relay",
        "configuration": configuration,
    }


def app_config_js(prefix: str = "/dicom-web", options: Mapping[str, Any] | None = None) -> str:
    """OHIF's `window.config`: one DICOMweb source at this page's origin + `prefix`.

    The origin is the page's own (the listener checked the Host), so the file is the same
    whatever port the workstation got. `options` override data-source keys (the benchmark
    points the same viewer at Orthanc's plugin with Orthanc's quirks).
    """
    source = data_source(prefix, options)
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "maxNumberOfWebWorkers": 3,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "groupEnabledModesFirst": True,
        "maxNumRequests": {"interaction": 100, "thumbnail": 5, "prefetch": 25},
        "showErrorDetails": "always",
        "investigationalUseDialog": {"option": "never"},
        # load the whole series of what is on screen, not only the slices looked at
        "studyPrefetcher": {
            "enabled": True,
            "displaySetsCount": 2,
            "maxNumPrefetchRequests": 10,
            "order": "closest",
        },
        "defaultDataSourceName": source["sourceName"],
        "dataSources": [source],
    }
    return (
        "/* Generated by the DMZ Relay workstation: OHIF reads this listener's DICOMweb. */\n"
        f"window.config = {json.dumps(config, indent=2)};\n"
        "(function () {\n"
        f"  var root = window.location.origin + {json.dumps(prefix)};\n"
        "  var c = window.config.dataSources[0].configuration;\n"
        "  c.qidoRoot = c.qidoRoot || root;\n"
        "  c.wadoRoot = c.wadoRoot || root;\n"
        "  c.wadoUriRoot = c.wadoUriRoot || root;\n"
        "})();\n"
    )


def content_type(name: str) -> str:
    return MIME_TYPES.get(PurePosixPath(name).suffix.lower(), FALLBACK_TYPE)


class ViewerSite:
    """Serves one dist directory; `dist` None or not installed: the install page."""

    def __init__(
        self,
        dist: Path | None,
        *,
        prefix: str = "/dicom-web",
        options: Mapping[str, Any] | None = None,
        on_open: Callable[[web.Request], None] | None = None,
    ) -> None:
        self.dist = dist
        self.on_open = on_open
        self.prefix = prefix.rstrip("/")
        self.config_js = app_config_js(self.prefix, options).encode()
        self._root: Path | None = None
        if dist is not None and installed_release(dist) is not None:
            self._root = dist.resolve()
        else:
            log.warning(
                "viewer: no OHIF viewer installed in %s; DICOMweb works, the viewer page "
                "says to run `%s`",
                dist,
                INSTALL_HINT,
            )

    def add_routes(self, app: web.Application) -> None:
        """Register last: a catch-all for GET/HEAD below the app's other routes."""
        app.router.add_get("/{tail:.*}", self.handle)  # and HEAD

    @property
    def installed(self) -> bool:
        return self._root is not None or self._refresh()

    def _refresh(self) -> bool:
        """A viewer installed while running is picked up (the page says: reload)."""
        if self.dist is not None and installed_release(self.dist) is not None:
            self._root = self.dist.resolve()
            log.info("viewer: OHIF viewer found in %s", self.dist)
        return self._root is not None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path == self.prefix or path.startswith(self.prefix + "/"):
            raise web.HTTPNotFound(text="no such DICOMweb resource\n")
        if not self.installed:
            return self._missing()
        if path == "/app-config.js":
            return self._bytes(self.config_js, "text/javascript; charset=utf-8", NO_CACHE)
        file = self._resolve(path)
        if file is not None:
            return self._file(file)
        if PurePosixPath(path).suffix:  # an asset that is not there
            raise web.HTTPNotFound(text="not found\n")
        index = self._resolve("/index.html")
        if index is None:  # removed under us
            return self._missing()
        if self.on_open is not None and (path == "/viewer" or path.startswith("/viewer/")):
            self.on_open(request)
        return self._file(index)

    def _resolve(self, path: str) -> Path | None:
        """The file `path` names inside the root, or None (also for anything unsafe)."""
        root = self._root
        if root is None or len(path) > MAX_PATH:
            return None
        parts = [p for p in path.split("/") if p]
        if not parts:
            parts = ["index.html"]
        for part in parts:
            if part in (".", "..") or part.startswith(".") or BAD_CHARACTERS & set(part):
                return None
        candidate = root.joinpath(*parts)
        try:
            resolved = candidate.resolve()
        except (OSError, RuntimeError):
            return None
        if not resolved.is_relative_to(root) or not resolved.is_file():
            return None
        return resolved

    def _file(self, file: Path) -> web.StreamResponse:
        headers = dict(SECURITY_HEADERS)
        headers["Content-Type"] = content_type(file.name)
        if headers["Content-Type"].startswith("text/html"):
            headers.update(HTML_HEADERS)
        if file.name == "index.html":
            headers.update(NO_CACHE)
        return web.FileResponse(file, headers=headers)

    def _bytes(self, body: bytes, kind: str, extra: Mapping[str, str]) -> web.Response:
        headers = dict(SECURITY_HEADERS)
        headers.update(extra)
        headers["Content-Type"] = kind
        return web.Response(body=body, headers=headers)

    def _missing(self) -> web.Response:
        hint = INSTALL_HINT
        if self.dist is not None and self.dist != default_viewer_dir():
            hint += f' --dir "{self.dist}"'
        page = MISSING_PAGE.format(
            directory=html.escape(str(self.dist)),
            hint=html.escape(hint),
            prefix=html.escape(self.prefix),
        )
        headers = dict(SECURITY_HEADERS)
        headers.update(NO_CACHE)
        headers.update(HTML_HEADERS)
        return web.Response(status=503, text=page, content_type="text/html", headers=headers)
