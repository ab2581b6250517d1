"""Another web site cannot make the radiologist's browser start retrievals: headless
Chromium opens a page on a foreign site (http://localhost:P, another host than the
workstation's 127.0.0.1) whose `<img>` and `fetch(no-cors)` point at the workstation's
DICOMweb. Chromium sends them with `Sec-Fetch-Site: cross-site` and no Origin on the
`<img>`; the server refuses both (403) and asks nothing of the PACS. The same address
typed into the browser is answered.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from relay.ops.config import Address
from relay.workstation.dicomweb.server import DicomwebServer
from relay.workstation.dicomweb.settings import DicomwebConfig
from tests.browser.chromium import chromium, require_chromium, wait_for
from tests.workstation.dicomweb.test_server import CT, SERIES, STUDY, ScriptedSource

pytestmark = [pytest.mark.interop]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    """Every request the DICOMweb server answered: path, Sec-Fetch-Site, status."""

    requests: list[tuple[str, str, int]] = field(default_factory=list)

    def add(self, app: web.Application) -> None:
        @web.middleware
        async def record(request: web.Request, handler: Handler) -> Any:
            response = await handler(request)
            site = request.headers.get("Sec-Fetch-Site", "")
            self.requests.append((request.path, site, response.status))
            return response

        app.middlewares.insert(0, record)  # outside the guard: sees its refusals too


@dataclass
class Servers:
    dicomweb: str
    page: str
    seen: Seen
    source: ScriptedSource


@pytest.fixture
def servers() -> Iterator[Servers]:
    """The DICOMweb server and a foreign site's page, on one event loop in a thread."""
    require_chromium()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        seen = Seen()

        async def no_link(headers: Any) -> Any:
            raise OSError("no link")

        srv = DicomwebServer(DicomwebConfig(Address("127.0.0.1", 0)), no_link,
                             extra_routes=[seen.add])  # fmt: skip
        source = ScriptedSource()
        srv.service.source = source  # type: ignore[assignment]
        srv.service.retriever.source = source  # type: ignore[assignment]
        await srv.start()
        assert srv.address is not None
        dicomweb = f"http://127.0.0.1:{srv.address.port}/dicom-web"
        frame = f"{dicomweb}/studies/{STUDY}/series/{SERIES}/instances/{CT[0].sop_instance}"
        html = (
            f'<html><body><img id="a" src="{frame}/frames/1/rendered">'
            f'<script>fetch("{dicomweb}/studies/{STUDY}/series/{SERIES}", {{mode: "no-cors"}})'
            ".catch(() => {});</script></body></html>"
        )

        async def page(request: web.Request) -> web.Response:
            return web.Response(text=html, content_type="text/html")

        site = web.Application()
        site.router.add_get("/", page)
        runner = web.AppRunner(site)
        await runner.setup()
        tcp = web.TCPSite(runner, "127.0.0.1", 0)
        await tcp.start()
        port = tcp._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        stop = asyncio.Event()
        state.update(servers=Servers(dicomweb, f"http://localhost:{port}/", seen, source),
                     stop=stop)  # fmt: skip
        ready.set()
        await stop.wait()
        await runner.cleanup()
        await srv.stop()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(30), "the servers did not start"
    try:
        yield state["servers"]
    finally:
        loop.call_soon_threadsafe(state["stop"].set)
        thread.join(30)
        loop.close()


def test_another_sites_page_cannot_start_retrievals(servers: Servers, tmp_path: Path) -> None:
    with chromium(tmp_path / "profile", log=tmp_path / "chromedriver.log") as driver:
        driver.get(servers.page)

        def both_refused() -> list[tuple[str, str, int]] | None:
            got = [r for r in servers.seen.requests if r[1] == "cross-site"]
            return got if len(got) >= 2 else None

        refused = wait_for("the page's two requests", both_refused, timeout=30)
        assert {status for _, _, status in refused} == {403}, servers.seen.requests
        assert servers.source.retrieves == 0  # nothing was asked of the PACS

        driver.get(f"{servers.dicomweb}/studies")  # typed in: Sec-Fetch-Site none
        typed = wait_for(
            "the typed address",
            lambda: [r for r in servers.seen.requests if r[1] == "none"] or None,
            timeout=30,
        )
        assert typed[0][2] == 200, servers.seen.requests
