"""The viewer inside the workstation's DICOMweb server (the real DicomwebServer on
loopback, wired as the workstation wires it: `viewer_routes(config)`): same listener, same
Host/Origin guards, DICOMweb routes still first, and a missing viewer costs no DICOMweb."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relay.ops.config import Address
from relay.workstation.dicomweb import viewer_routes
from relay.workstation.dicomweb.server import DicomwebServer
from relay.workstation.dicomweb.settings import DicomwebConfig
from relay.workstation.viewer.install import install_viewer
from tests.workstation.viewer.tarballs import INDEX, make_tarball, release_for


def install(tmp_path: Path) -> Path:
    tgz = make_tarball(tmp_path / "app.tgz", [("package/dist/app.js", b"console.log(1)")])
    return install_viewer(tmp_path / "dist", release=release_for(tgz), tarball=tgz)[0]


async def no_link(headers: Any) -> Any:
    raise OSError("no link")


async def started(config: DicomwebConfig) -> DicomwebServer:
    server = DicomwebServer(config, no_link, extra_routes=viewer_routes(config))
    await server.start()
    return server


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[str, int]]:
    config = DicomwebConfig(Address("127.0.0.1", 0), viewer_dir=install(tmp_path))
    srv = await started(config)
    assert srv.address is not None
    try:
        yield f"http://127.0.0.1:{srv.address.port}", srv.address.port
    finally:
        await srv.stop()


async def fetch(url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as r:
        return r.status, dict(r.headers), await r.read()


async def test_the_viewer_and_its_config_on_the_dicomweb_listener(
    server: tuple[str, int],
) -> None:
    base, port = server
    status, headers, body = await fetch(base + "/")
    assert status == 200 and body == INDEX
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    status, headers, body = await fetch(base + "/viewer?StudyInstanceUIDs=1.2.3")
    assert status == 200 and body == INDEX  # the SPA's route
    status, headers, body = await fetch(f"http://localhost:{port}/app-config.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    assert b'window.location.origin + "/dicom-web"' in body
    status, headers, body = await fetch(base + "/app.js")
    assert status == 200 and body == b"console.log(1)"
    # DICOMweb routes are still DICOMweb's: a bad UID is its 400, not the page
    status, _, body = await fetch(base + "/dicom-web/studies/not-a-uid/metadata")
    assert status == 400 and b"not a UID" in body
    status, _, body = await fetch(base + "/dicom-web/no-such-thing")
    assert status == 404 and body != INDEX


@pytest.mark.parametrize(
    "headers",
    [
        {"Host": "rebound.example.com"},  # DNS rebinding: a foreign name for 127.0.0.1
        {"Host": "rebound.example.com:{port}"},
        {"Host": "127.0.0.1:{other}"},
        {"Origin": "http://evil.example"},  # another site's page
    ],
)
async def test_the_listeners_guards_cover_the_viewer(
    server: tuple[str, int], headers: dict[str, str]
) -> None:
    base, port = server
    filled = {k: v.format(port=port, other=port + 1) for k, v in headers.items()}
    for path in ("/", "/app-config.js", "/app.js", "/viewer"):
        status, answer, body = await fetch(base + path, **filled)
        assert status == 403, (path, filled)
        assert body != INDEX and b"window.config" not in body
        assert "Access-Control-Allow-Origin" not in answer


async def test_every_answer_says_nosniff_and_the_page_cannot_be_framed(
    server: tuple[str, int],
) -> None:
    base, _ = server
    status, headers, _ = await fetch(base + "/viewer?StudyInstanceUIDs=1.2.3")
    assert status == 200 and "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    cases: list[tuple[str, dict[str, str], int]] = [
        ("/", {"Host": "rebound.example.com"}, 403),  # the guard's refusals
        ("/dicom-web/studies", {"Sec-Fetch-Site": "cross-site"}, 403),
        ("/missing.js", {}, 404),  # the site's
        ("/dicom-web/no-such-thing", {}, 404),
        ("/dicom-web/studies/not-a-uid/metadata", {}, 400),  # DICOMweb's
        ("/app.js", {}, 200),
    ]
    for path, extra, expected in cases:
        status, headers, _ = await fetch(base + path, **extra)
        assert status == expected, path
        assert headers.get("X-Content-Type-Options") == "nosniff", path
        assert "Access-Control-Allow-Origin" not in headers


async def test_a_missing_viewer_leaves_dicomweb_working(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    where = tmp_path / "not-installed"
    with caplog.at_level(logging.WARNING, logger="relay.workstation.viewer"):
        srv = await started(DicomwebConfig(Address("127.0.0.1", 0), viewer_dir=where))
    try:
        assert [r for r in caplog.records if "relay viewer install" in r.getMessage()]
        status, _, body = await fetch(f"http://127.0.0.1:{srv.address.port}/")  # type: ignore[union-attr]
        assert status == 503 and b"relay viewer install" in body
        # DICOMweb is there: it answers (the link is down: 502 naming it), not the page
        status, _, body = await fetch(f"{srv.url}/studies")
        assert status in (502, 503, 504) and b"relay viewer install" not in body
    finally:
        await srv.stop()


async def test_viewer_false_serves_no_page(tmp_path: Path) -> None:
    config = DicomwebConfig(Address("127.0.0.1", 0), viewer=False, viewer_dir=install(tmp_path))
    assert viewer_routes(config) == []
    srv = await started(config)
    try:
        status, _, body = await fetch(f"http://127.0.0.1:{srv.address.port}/")  # type: ignore[union-attr]
        assert status == 404 and body != INDEX
    finally:
        await srv.stop()
