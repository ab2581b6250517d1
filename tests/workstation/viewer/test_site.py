"""The viewer's static site on a real loopback listener: types, SPA fallback, confinement,
the generated app-config and the page that says how to install a missing viewer."""

from __future__ import annotations

import html
import json
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from relay.workstation.viewer.install import install_viewer
from relay.workstation.viewer.site import ViewerSite, app_config_js
from tests.workstation.viewer.tarballs import INDEX, make_tarball, release_for

ASSETS = [
    ("package/dist/app.bundle.1.js", b"console.log(1)"),
    ("package/dist/worker.mjs", b"export {}"),
    ("package/dist/codec.wasm", b"\0asm\1\0\0\0"),
    ("package/dist/style.css", b"body{}"),
    ("package/dist/assets/logo.svg", b"<svg/>"),
    ("package/dist/app-config.js", b"window.config = {upstream: true};"),
    ("package/dist/font.woff2", b"wOF2"),
    ("package/dist/blob.unknownext", b"?"),
]


def installed_dist(tmp_path: Path) -> Path:
    tgz = make_tarball(tmp_path / "app.tgz", ASSETS)
    (tmp_path / "secret.txt").write_text("outside the dist")
    return install_viewer(tmp_path / "dist", release=release_for(tgz), tarball=tgz)[0]


async def no_studies(request: web.Request) -> web.Response:
    return web.json_response([])


async def serve(site: ViewerSite) -> TestServer:
    app = web.Application()
    app.router.add_get("/dicom-web/studies", no_studies)
    site.add_routes(app)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


@pytest.fixture
async def http(tmp_path: Path) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    server = await serve(ViewerSite(installed_dist(tmp_path)))
    async with aiohttp.ClientSession() as session:
        yield session, str(server.make_url("/"))
    await server.close()


@pytest.mark.parametrize(
    ("path", "kind", "body"),
    [
        ("/", "text/html; charset=utf-8", INDEX),
        ("/index.html", "text/html; charset=utf-8", INDEX),
        ("/app.bundle.1.js", "text/javascript; charset=utf-8", b"console.log(1)"),
        ("/worker.mjs", "text/javascript; charset=utf-8", b"export {}"),
        ("/codec.wasm", "application/wasm", b"\0asm\1\0\0\0"),
        ("/style.css", "text/css; charset=utf-8", b"body{}"),
        ("/assets/logo.svg", "image/svg+xml", b"<svg/>"),
        ("/font.woff2", "font/woff2", b"wOF2"),
        ("/blob.unknownext", "application/octet-stream", b"?"),
        # the SPA's own routes get the page; the router in it takes over
        ("/viewer", "text/html; charset=utf-8", INDEX),
        ("/viewer/", "text/html; charset=utf-8", INDEX),
        ("/viewer?StudyInstanceUIDs=1.2.3", "text/html; charset=utf-8", INDEX),
        ("/assets", "text/html; charset=utf-8", INDEX),  # a directory: never a listing
        ("/assets/", "text/html; charset=utf-8", INDEX),
    ],
)
async def test_files_with_their_types(
    http: tuple[aiohttp.ClientSession, str], path: str, kind: str, body: bytes
) -> None:
    session, base = http
    async with session.get(base.rstrip("/") + path) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == kind
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
        assert "Access-Control-Allow-Origin" not in response.headers
        if kind.startswith("text/html"):  # no other site may frame the viewer
            assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
        assert await response.read() == body


@pytest.mark.parametrize(
    "path",
    [
        "/missing.js",  # an asset that is not there: 404, not the page
        "/assets/none.png",
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/assets/%2e%2e/%2e%2e/secret.txt",
        "/..%5csecret.txt",
        "/.relay-viewer.json",  # hidden files are not served
        "/C:%5cWindows%5cwin.ini",
        "/dicom-web/nothing-here",  # below the DICOMweb prefix: never the page
        "/dicom-web",
    ],
)
async def test_what_is_not_served(http: tuple[aiohttp.ClientSession, str], path: str) -> None:
    session, base = http
    async with session.get(base.rstrip("/") + path) as response:
        assert response.status == 404, path
        assert b"outside the dist" not in await response.read()


async def test_the_app_config_is_ours_and_points_at_our_dicomweb(
    http: tuple[aiohttp.ClientSession, str],
) -> None:
    session, base = http
    async with session.get(base + "app-config.js") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/javascript; charset=utf-8"
        assert response.headers["Cache-Control"] == "no-cache"
        text = await response.text()
    assert "upstream" not in text
    assert 'window.location.origin + "/dicom-web"' in text
    async with session.get(base + "dicom-web/studies") as response:  # other routes still win
        assert await response.json() == []
    async with session.head(base + "codec.wasm") as response:
        assert response.status == 200 and response.headers["Content-Length"] == "8"


def config_of(js: str) -> dict[str, Any]:
    match = re.search(r"window\.config = (\{.*?\n\});", js, re.S)
    assert match
    parsed: dict[str, Any] = json.loads(match.group(1))
    return parsed


def test_app_config_settings_for_a_dicomweb_server() -> None:
    config = config_of(app_config_js("/dicom-web"))
    [source] = config["dataSources"]
    c = source["configuration"]
    assert config["defaultDataSourceName"] == source["sourceName"]
    assert c["supportsFuzzyMatching"] is False
    assert c["imageRendering"] == c["thumbnailRendering"] == "wadors"
    assert c["enableStudyLazyLoad"] is True
    assert c["bulkDataURI"]["enabled"] is True
    assert c["omitQuotationForMultipartRequest"] is True
    assert "qidoRoot" not in c  # set from the page's origin
    other = config_of(app_config_js("/x", {"staticWado": True, "qidoRoot": "http://h/dw"}))
    assert other["dataSources"][0]["configuration"]["staticWado"] is True


async def test_a_missing_viewer_is_a_page_that_says_how_to_install_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    where = tmp_path / "nowhere"
    with caplog.at_level(logging.WARNING):
        site = ViewerSite(where)
    assert "relay viewer install" in caplog.text and "DICOMweb works" in caplog.text
    server = await serve(site)
    try:
        async with aiohttp.ClientSession() as session:
            for path in ("", "viewer", "app.bundle.1.js"):
                async with session.get(server.make_url("/" + path)) as response:
                    assert response.status == 503
                    page = await response.text()
                    assert html.escape(f'relay viewer install --dir "{where}"') in page
            async with session.get(server.make_url("/dicom-web/studies")) as response:
                assert response.status == 200  # DICOMweb does not need the viewer
            installed_dist(tmp_path)  # installed while running: picked up, no restart
            site.dist = tmp_path / "dist"
            async with session.get(server.make_url("/")) as response:
                assert response.status == 200 and await response.read() == INDEX
    finally:
        await server.close()
