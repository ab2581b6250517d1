"""Progressive frames in OHIF (issue 14): headless Chromium shows a lower-resolution image
from an HTJ2K byte range before the lossless frame has been served.

The real DicomwebServer with the viewer as the workstation wires it (`progressive: true`,
the default) runs in this process on loopback; a small fake PACS in place of the relay
answers C-FIND and retrieves from the demo CT (the chain itself is test_ohif.py's). A
gate in front of the frames route lets only first-pass ranges (`bytes=0-N`) through and
holds every request that would deliver a frame's last byte. While it is closed the
canvas must show an image: that image can only come from a prefix. Then the gate opens,
the rest of each codestream is served, and the canvas still shows the (now lossless)
image. The order is read from the server's own record, not from sleeps.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pydicom.dataset import Dataset

from relay.dicom import rawds
from relay.dicom import status as st
from relay.dicom.codec import FinalResponse, Instance
from relay.ops.config import Address
from relay.workstation.dicomweb import viewer_routes
from relay.workstation.dicomweb.server import DicomwebServer
from relay.workstation.dicomweb.settings import DicomwebConfig
from relay.workstation.dicomweb.source import FindResult
from relay.workstation.viewer.install import installed_release
from relay.workstation.viewer.progressive import CHUNK_SIZE
from tests.browser.chromium import (
    canvas_digest,
    canvas_stats,
    chromium,
    require_chromium,
    shows_an_image,
    wait_for,
)
from tests.browser.conftest import VIEWER_DIR
from tests.interop.harness.tools import unavailable

pytestmark = [pytest.mark.interop, pytest.mark.slow]

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
SLICES = 4
_COUNTS = {"STUDY": "NumberOfStudyRelatedInstances", "SERIES": "NumberOfSeriesRelatedInstances"}
_LEVEL_UID = {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
              "IMAGE": "SOPInstanceUID"}  # fmt: skip


class FakePacs:
    """C-FIND and retrieve over a list of instances, as DicomSource answers them."""

    def __init__(self) -> None:
        from relay_dev import samples

        self.instances = [i for i in samples.demo_studies(ct_slices=SLICES, mr_slices=1)
                          if i.sop_class.endswith(".1.2")]  # fmt: skip
        self.datasets = [rawds.decode_dataset(i.data, i.transfer_syntax) for i in self.instances]

    async def find(self, identifier: Dataset, max_matches: int, *, skip: int = 0) -> FindResult:
        level = str(identifier.QueryRetrieveLevel)
        out: dict[str, Dataset] = {}
        for ds in self.datasets:
            if any(identifier.get(k) not in (None, "", ds.get(k)) for k in _LEVEL_UID.values()):
                continue
            key = str(ds.get(_LEVEL_UID[level]))
            match = out.setdefault(key, Dataset())
            match.QueryRetrieveLevel = level
            for elem in identifier:
                if elem.keyword and elem.keyword in ds and elem.keyword != "PixelData":
                    setattr(match, elem.keyword, ds.get(elem.keyword))
            if level in _COUNTS:
                setattr(match, _COUNTS[level], str(int(match.get(_COUNTS[level], 0)) + 1))
            if level == "STUDY":
                match.ModalitiesInStudy = ds.Modality
        found = list(out.values())
        page = found[skip : skip + max_matches]
        return FindResult(page, False, len(found) > skip + max_matches)

    async def retrieve(self, identifier: Dataset, outcome: list[FinalResponse] | None = None,
                       *, headers_only: bool = False) -> AsyncIterator[Instance]:  # fmt: skip
        sent = 0
        for inst, ds in zip(self.instances, self.datasets, strict=True):
            if ds.SeriesInstanceUID != identifier.SeriesInstanceUID:
                continue
            sent += 1
            msg = Instance(inst.sop_class, inst.sop_instance, inst.transfer_syntax, inst.data)
            if headers_only:
                from relay.dicom import headers_only as strip

                msg = strip.strip_instance(msg)
            yield msg
        if outcome is not None:
            outcome.append(FinalResponse(st.SUCCESS, completed=sent, failed=0))

    async def store(self, *args: Any) -> FinalResponse:
        return FinalResponse(st.SUCCESS)


@dataclass
class Served:
    sop: str
    range: str | None
    status: int
    content_range: str | None
    at: float

    @property
    def last_byte(self) -> bool:
        """This answer delivered the frame's last byte (the frame is complete)."""
        if self.content_range is None:
            return self.status == 200
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", self.content_range)
        return m is not None and int(m.group(2)) == int(m.group(3)) - 1


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Gate:
    """Lets first-pass ranges through; holds the rest until `opened` is set."""

    opened: asyncio.Event = field(default_factory=asyncio.Event)
    served: list[Served] = field(default_factory=list)
    held: int = 0  # requests waiting at the gate now

    def add(self, app: web.Application) -> None:
        @web.middleware
        async def gate(request: web.Request, handler: Handler) -> Any:
            m = re.search(r"/instances/([0-9.]+)/frames/\d+$", request.path)
            if m is None:
                return await handler(request)
            wanted = request.headers.get("Range")
            first_pass = wanted is not None and re.fullmatch(r"bytes=0-\d+", wanted) is not None
            if not first_pass and not self.opened.is_set():
                self.held += 1
                try:
                    await self.opened.wait()
                finally:
                    self.held -= 1
            response = await handler(request)
            self.served.append(Served(m.group(1), wanted, response.status,
                                      response.headers.get("Content-Range"),
                                      time.monotonic()))  # fmt: skip
            return response

        app.middlewares.append(gate)


Served_viewer = tuple[str, Gate, FakePacs, asyncio.AbstractEventLoop]


@pytest.fixture
def served_viewer(tmp_path: Path) -> Iterator[Served_viewer]:
    """The server on its own event loop in a thread (selenium blocks)."""
    require_chromium()
    if installed_release(VIEWER_DIR) is None:
        unavailable(f"no OHIF viewer in {VIEWER_DIR}: run `relay viewer install` (make install)")
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        gate = Gate()
        config = DicomwebConfig(Address("127.0.0.1", 0), viewer_dir=VIEWER_DIR, progressive=True)

        async def no_link(headers: Any) -> Any:
            raise OSError("no link")

        srv = DicomwebServer(config, no_link, extra_routes=[*viewer_routes(config), gate.add])
        pacs = FakePacs()
        srv.service.source = pacs  # type: ignore[assignment]
        srv.service.retriever.source = pacs  # type: ignore[assignment]
        if srv.service.headfirst is not None:
            srv.service.headfirst.source = lambda: pacs  # type: ignore[assignment,return-value]
        await srv.start()
        assert srv.address is not None
        stop = asyncio.Event()
        state.update(url=f"http://127.0.0.1:{srv.address.port}", gate=gate, pacs=pacs,
                     stop=stop, srv=srv)  # fmt: skip
        ready.set()
        await stop.wait()
        gate.opened.set()
        await srv.stop()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(30), "the server did not start"
    try:
        yield state["url"], state["gate"], state["pacs"], loop
    finally:
        loop.call_soon_threadsafe(state["stop"].set)
        thread.join(30)
        loop.close()


def test_the_viewer_shows_a_prefix_before_the_lossless_frame(
    served_viewer: Served_viewer, tmp_path: Path
) -> None:
    base, gate, pacs, loop = served_viewer
    study = str(pacs.datasets[0].StudyInstanceUID)
    with chromium(tmp_path / "profile", log=tmp_path / "chromedriver.log") as driver:
        started = time.monotonic()
        driver.get(f"{base}/viewer?StudyInstanceUIDs={study}")

        def partial_on_canvas() -> dict[str, int] | None:
            stats = canvas_stats(driver)
            return stats if shows_an_image(stats) else None

        # the gate is closed: only prefixes can have been served
        first = wait_for("a first-pass image on the canvas", partial_on_canvas, timeout=120)
        seen_first = time.monotonic()
        prefixes = [s for s in gate.served if s.status == 206]
        assert prefixes, gate.served
        assert not [s for s in gate.served if s.last_byte], "a whole frame was served early"
        for s in prefixes:
            assert s.range is not None and s.content_range is not None
            assert s.content_range.startswith(f"bytes 0-{CHUNK_SIZE - 1}/"), s
        lossy = canvas_digest(driver)
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "ohif-progressive-first.png"))
        wait_for("the viewer to ask for the rest", lambda: gate.held > 0, timeout=60)
        loop.call_soon_threadsafe(gate.opened.set)

        def rest_served() -> bool:
            return any(s.status == 206 and s.last_byte and s.range and not
                       s.range.startswith("bytes=0-") for s in gate.served)  # fmt: skip

        wait_for("the rest of a frame to be served", rest_served, timeout=60)

        def lossless_on_canvas() -> dict[str, int] | None:
            # the first pass replaced: other pixels, still an image
            changed = canvas_digest(driver) not in (None, lossy)
            return partial_on_canvas() if changed else None

        final = wait_for("the lossless image on the canvas", lossless_on_canvas, timeout=60)
        driver.save_screenshot(str(ARTIFACTS / "ohif-progressive-final.png"))
        severe = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]

    # per frame: its prefix was served before the rest was even asked for
    def is_prefix(p: Served) -> bool:
        return p.range is not None and p.range.startswith("bytes=0-") and not p.last_byte

    for rest in [s for s in gate.served if s.last_byte and s.range and s.range != "bytes=0-"]:
        before = [p for p in gate.served if p.sop == rest.sop and p.at < rest.at and is_prefix(p)]
        assert before, (rest, gate.served)
    assert shows_an_image(final), final
    total = {int(s.content_range.rpartition("/")[2]) for s in gate.served if s.content_range}
    print(f"\nfirst image after {seen_first - started:.2f} s from {CHUNK_SIZE} B prefixes of "
          f"codestreams of {sorted(total)} B; canvas first {first}, final {final}; "
          f"{len(gate.served)} frame answers")  # fmt: skip
    assert not [m for m in severe if re.search(r"/dicom-web\S* .*status of [45]\d\d", m)], severe
