"""OHIF in headless Chromium against the real chain: the embedded PACS with the demo
studies, `relay gateway|agent|workstation` over real TLS on loopback, the workstation
serving the viewer and its DICOMweb.

The study list must show both demo studies (QIDO-RS through the relay); the CT opened in
the viewer must put an image on the viewport's canvas (WADO-RS metadata and frames
through the relay, fetched progressively in byte ranges): many grey levels over a wide
range, read from the canvas itself. The screenshot is kept in tests/browser/artifacts/
(git-ignored); its path is printed.
"""

from __future__ import annotations

import http.client
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.workstation.viewer.install import installed_release
from relay.workstation.viewer.pin import OHIF
from tests.browser.chromium import (
    canvas_stats,
    chromium,
    require_chromium,
    shows_an_image,
    wait_for,
)
from tests.browser.conftest import VIEWER_DIR
from tests.e2e.dicom_chain import DicomChain, PacsProcess, running_dicom_chain
from tests.interop.harness.tools import unavailable

pytestmark = [pytest.mark.interop, pytest.mark.slow]

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DicomChain, int]]:
    require_chromium()
    if installed_release(VIEWER_DIR) is None:
        unavailable(f"no OHIF viewer in {VIEWER_DIR}: run `relay viewer install` (make install)")
    tmp = tmp_path_factory.mktemp("browser")
    pacs = PacsProcess(tmp / "pacs", data="demo").start()
    chain = DicomChain(
        tmp,
        pacs.port,
        ws_extra=f"dicomweb: {{listen: '{HOST}:0', viewer: true, viewer_dir: '{VIEWER_DIR}', "
        "progressive: true}\n",
    )
    chain.reporters["dicomweb"] = ("ws1", "dicomweb")
    try:
        with running_dicom_chain(chain):
            yield chain, chain.ports["dicomweb"]
    finally:
        pacs.stop()


def demo_uids() -> dict[str, str]:
    from relay_dev.demo import study_uids
    from relay_dev.samples import demo_studies

    return study_uids(demo_studies())


def get(port: int, path: str, host: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        conn.request("GET", path, headers={"Host": host})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_the_viewer_is_served_on_loopback_only_by_name(chain: tuple[DicomChain, int]) -> None:
    _, port = chain
    status, body = get(port, "/", f"{HOST}:{port}")
    assert status == 200 and b"<!doctype html>" in body.lower()
    status, body = get(port, "/app-config.js", f"localhost:{port}")
    assert status == 200 and b'window.location.origin + "/dicom-web"' in body
    for host in (f"evil.example:{port}", "attacker.test", f"{HOST}:{port + 1}"):
        status, body = get(port, "/", host)  # DNS rebinding: a page under a foreign name
        assert status in (400, 403, 421), (host, status)
        assert b"<!doctype html>" not in body.lower()


def test_ohif_lists_the_demo_studies_and_shows_the_ct(
    chain: tuple[DicomChain, int], tmp_path: Path
) -> None:
    dicom_chain, port = chain
    uids = demo_uids()
    base = f"http://{HOST}:{port}"
    with chromium(tmp_path / "profile", log=tmp_path / "chromedriver.log") as driver:
        driver.get(base + "/")
        wait_for(
            "the study list to show both demo studies",
            lambda: all(name in driver.page_source for name in ("DOE", "ROE")),
            timeout=90,
        )
        assert "CT CHEST ABDOMEN PELVIS" in driver.page_source
        driver.get(f"{base}/viewer?StudyInstanceUIDs={uids['CT']}")

        def image_on_canvas() -> dict[str, int] | None:
            stats = canvas_stats(driver)
            return stats if shows_an_image(stats) else None

        stats = wait_for("the CT on the viewport's canvas", image_on_canvas, timeout=120)
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "ohif-ct.png"
        driver.save_screenshot(str(shot))
        print(f"\nscreenshot of OHIF {OHIF.version} showing the CT: {shot}")
        severe = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert stats["distinct"] >= 32 and stats["max"] - stats["min"] >= 64, stats
    # through the whole chain the viewer loaded progressively (dicomweb.progressive turned
    # on above): byte ranges of HTJ2K frames were served (tests/browser/test_progressive.py
    # has the order of first pass and lossless)
    assert dicom_chain.metric("ws", "relay_dicomweb_frame_ranges_total") > 0
    assert shot.stat().st_size > 10_000
    assert not [m for m in severe if re.search(r"/dicom-web\S* .*status of 5\d\d", m)], severe
